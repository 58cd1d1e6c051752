"""fastacl.ops.pgd_step_: both paths against the canonical op sequence, the budget property, checks.

The Triton path runs through the interpreter here (tests/conftest.py), so shapes stay tiny.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastacl.ops import pgd_step as pgd_step_module
from fastacl.ops import pgd_step_, use_backend
from tests.conftest import relative_error

BACKENDS = ("torch", "triton")
# The Triton path runs on CUDA tensors where a GPU exists, else on CPU tensors (interpreter).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One ulp of a pixel value just below 1.0 is 2^-24; float32 eps (2^-23) bounds it with margin.
ULP = torch.finfo(torch.float32).eps


def canonical_linf(x_adv, grad, x_nat, eps, step_size):
    """docs/acl-air.md section 3, written out: the sequence pgd_step_ must equal bit for bit."""
    delta = x_adv - x_nat
    delta = delta + step_size * torch.sign(grad)
    delta = torch.clamp(delta, -eps, eps)
    return torch.clamp(x_nat + delta, 0, 1)


def canonical_l2(x_adv, grad, x_nat, eps, step_size):
    """The l2 form in float64 (the tolerance oracle): normalised step, rescale onto the ball."""
    x_adv, grad, x_nat = x_adv.double(), grad.double(), x_nat.double()
    norm = lambda t: t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
    delta = x_adv - x_nat + step_size * grad / norm(grad).clamp_min(1e-12)  # 0 grad: 0 step
    delta = delta * torch.clamp(eps / norm(delta), max=1.0)
    return torch.clamp(x_nat + delta, 0, 1)


def make_inputs(shape, eps, seed, dtype=torch.float32):
    """Clean images with exact 0s and 1s, a start up to 2 eps away (possibly outside the ball
    and [0, 1]), and a gradient with exact zeros and magnitudes over 12 decades."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(shape, generator=generator)
    x_nat = rand()
    x_nat[rand() < 0.1] = 0.0
    x_nat[rand() < 0.1] = 1.0
    x_adv = x_nat + 2 * eps * (2 * rand() - 1)
    scale = 10.0 ** (12 * rand() - 6)
    grad = torch.randn(shape, generator=generator) * scale * (rand() > 0.2)
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


SHAPES = [(1,), (41,), (2, 401), (3, 3, 7, 9), (4, 3, 32, 32)]


@pytest.fixture
def reference_must_not_run(monkeypatch):
    """Proves the Triton path ran: the reference raises if anything falls back to it."""
    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of the Triton kernel")

    monkeypatch.setattr(pgd_step_module, "pgd_step_reference_", fail)


def run_path(backend, x_adv, grad, x_nat, eps, step_size, norm, request):
    """pgd_step_ on one path; checks it updated x_adv in place; returns the result on the CPU."""
    device = "cpu"
    if backend == "triton":
        request.getfixturevalue("reference_must_not_run")
        device = TRITON_DEVICE
    x_adv, grad, x_nat = (t.to(device) for t in (x_adv, grad, x_nat))  # layouts preserved
    storage = x_adv.data_ptr()
    with use_backend(backend):
        out = pgd_step_(x_adv, grad, x_nat, eps, step_size, norm)
    assert out is x_adv and x_adv.data_ptr() == storage
    return x_adv.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linf_equals_canonical_sequence_exactly(backend, shape, request):
    eps, step_size = 8 / 255, 2 / 255
    x_adv, grad, x_nat = make_inputs(shape, eps, seed=sum(shape))
    expected = canonical_linf(x_adv, grad, x_nat, eps, step_size)
    actual = run_path(backend, x_adv, grad, x_nat, eps, step_size, "linf", request)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_linf_exact_in_other_layouts(backend, layout, request):
    eps, step_size = 8 / 255, 2 / 255
    x_adv, grad, x_nat = make_inputs((2, 3, 5, 6), eps, seed=3)
    expected = canonical_linf(x_adv, grad, x_nat, eps, step_size)
    if layout == "channels_last":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    else:  # no dense layout at all: the Triton path works on a copy and writes it back
        x_adv = x_adv.transpose(2, 3).contiguous().transpose(2, 3)
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
    actual = run_path(backend, x_adv, grad, x_nat, eps, step_size, "linf", request)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5), (3, 41), (2, 3, 7, 9), (2, 1500)], ids=str)
def test_l2_matches_float64_reference(backend, shape, request):
    # (2, 1500) spans two blocks of the l2 kernel's per-sample loop.
    eps, step_size = 0.5, 0.1
    x_adv, grad, x_nat = make_inputs(shape, eps / 8, seed=sum(shape))
    grad[0] = 0.0  # a zero gradient must give a zero step, not NaN
    expected = canonical_l2(x_adv, grad, x_nat, eps, step_size)
    actual = run_path(backend, x_adv, grad, x_nat, eps, step_size, "l2", request)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.filterwarnings("ignore:.*larger than eps")
@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_large_step_lands_on_the_sphere(backend, request):
    x_nat = torch.full((3, 2, 4, 4), 0.5)
    x_adv, grad = x_nat.clone(), torch.randn(3, 2, 4, 4)
    actual = run_path(backend, x_adv, grad, x_nat, 0.25, 1.0, "l2", request)
    norms = (actual - x_nat).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 0.25), rtol=1e-5, atol=0)


def _assert_in_budget(x_adv, x_nat, eps, norm):
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = x_adv.double() - x_nat.double()  # exact: the question is about the stored values
    if norm == "linf":
        assert delta.abs().max().item() <= eps + ULP
    else:
        sample_size = delta[0].numel()
        norms = delta.reshape(delta.shape[0], -1).norm(dim=1)
        assert norms.max().item() <= eps * (1 + 1e-5) + math.sqrt(sample_size) * ULP


budgets = dict(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),
    eps=st.floats(1e-3, 1.0),
    step_size=st.floats(1e-3, 1.0),
    norm=st.sampled_from(["linf", "l2"]),
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.filterwarnings("ignore:.*larger than eps")
@settings(max_examples=150, deadline=None)
@given(**budgets)
def test_result_in_eps_ball_and_unit_box_reference(shape, eps, step_size, norm, seed):
    x_adv, grad, x_nat = make_inputs(shape, eps, seed)
    with use_backend("torch"):
        pgd_step_(x_adv, grad, x_nat, eps, step_size, norm)
    _assert_in_budget(x_adv, x_nat, eps, norm)


@pytest.mark.filterwarnings("ignore:.*larger than eps")
@settings(max_examples=25, deadline=None)
@given(**budgets)
def test_result_in_eps_ball_and_unit_box_triton(shape, eps, step_size, norm, seed):
    x_adv, grad, x_nat = (t.to(TRITON_DEVICE) for t in make_inputs(shape, eps, seed))
    with use_backend("triton"):
        pgd_step_(x_adv, grad, x_nat, eps, step_size, norm)
    _assert_in_budget(x_adv, x_nat, eps, norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(backend, norm):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x_adv, grad, x_nat = (t.to(device) for t in make_inputs((2, 3, 4, 4), 8 / 255, seed=1))
    with use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastacl.pgd_step_.default, (x_adv, grad, x_nat, 8 / 255, 2 / 255, norm)
        )


def test_float64_keeps_the_reference_even_when_triton_is_forced():
    x_adv, grad, x_nat = make_inputs((2, 9), 8 / 255, seed=2, dtype=torch.float64)
    expected = canonical_linf(x_adv, grad, x_nat, 8 / 255, 2 / 255)
    with use_backend("triton"):
        pgd_step_(x_adv, grad, x_nat)
    assert torch.equal(x_adv, expected)


def test_empty_batch_is_a_no_op():
    x = torch.empty(0, 3, 4, 4)
    assert pgd_step_(x, x.clone(), x.clone()).shape == (0, 3, 4, 4)


@pytest.mark.parametrize(
    ("eps", "message"),
    [
        (8.0, r"in \(0, 1\], got 8.0: pixel values are in \[0, 1\], did you mean 8/255\?"),
        (0.0, r"eps must be in \(0, 1\], got 0.0"),
        (-0.03, r"eps must be in \(0, 1\], got -0.03"),
        (float("nan"), r"eps must be in \(0, 1\], got nan"),
    ],
)
def test_bad_eps_is_a_clear_error(eps, message):
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match=message):
        pgd_step_(x.clone(), x, x, eps=eps)


def test_other_bad_arguments_are_clear_errors():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps must be a finite number > 0 for norm='l2', got 0.0"):
        pgd_step_(x.clone(), x, x, eps=0.0, norm="l2")
    with pytest.raises(ValueError, match="step_size must be a finite number > 0, got 0.0"):
        pgd_step_(x.clone(), x, x, step_size=0.0)
    with pytest.raises(ValueError, match="unknown norm 'l1': expected one of linf, l2"):
        pgd_step_(x.clone(), x, x, norm="l1")
    with pytest.raises(ValueError, match=r"grad has shape \(2, 4\) but x_adv has \(2, 3\)"):
        pgd_step_(x.clone(), torch.rand(2, 4), x)
    with pytest.raises(ValueError, match="x_nat is torch.float64 on cpu but x_adv is torch.float3"):
        pgd_step_(x.clone(), x, x.double())
    with pytest.raises(ValueError, match="x_adv must be a floating-point tensor, got torch.uint8"):
        pgd_step_((x * 255).to(torch.uint8), x, x)


def test_step_larger_than_eps_only_warns():
    x_adv, grad, x_nat = make_inputs((2, 5), 8 / 255, seed=4)
    expected = canonical_linf(x_adv, grad, x_nat, 8 / 255, 10 / 255)
    with pytest.warns(UserWarning, match="step_size 0.0392.* is larger than eps 0.0313"):
        pgd_step_(x_adv, grad, x_nat, eps=8 / 255, step_size=10 / 255)
    assert torch.equal(x_adv, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_gpu_kernel_matches_fp32_reference(dtype, norm):
    # The kernel reads any float storage and computes in fp32, so it must equal the fp32
    # reference on the same (upcast) values, rounded once to the storage dtype.
    x_adv, grad, x_nat = (t.cuda().to(dtype) for t in make_inputs((64, 3, 32, 32), 8 / 255, 5))
    expected = x_adv.float()
    with use_backend("torch"):
        pgd_step_(expected, grad.float(), x_nat.float(), 8 / 255, 2 / 255, norm)
    with use_backend("triton"):
        pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255, norm)
    if norm == "linf":
        assert torch.equal(x_adv, expected.to(dtype))
    else:
        assert relative_error(x_adv, expected) < {torch.float32: 1e-6}.get(dtype, 1e-2)


# ---- the budget as a number, a 0-d tensor or per sample ---------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", ["vector", "broadcast"])
def test_a_per_sample_budget_is_each_sample_with_its_own_eps(norm, shape):
    g = torch.Generator().manual_seed(5)
    x_nat = torch.rand(5, 3, 7, 9, generator=g, dtype=torch.float64)
    grad = torch.randn(5, 3, 7, 9, generator=g, dtype=torch.float64)
    x_adv = (x_nat + 0.02 * torch.randn(5, 3, 7, 9, generator=g, dtype=torch.float64)).clamp(0, 1)
    budgets = torch.tensor([0.01, 0.02, 0.03, 0.05, 0.1], dtype=torch.float64)
    eps = budgets if shape == "vector" else budgets.view(5, 1, 1, 1)
    ours = pgd_step_(x_adv.clone(), grad, x_nat, eps=eps, step_size=0.01, norm=norm)
    for k in range(5):  # the same as k's image alone with its scalar budget
        alone = pgd_step_(x_adv[k:k + 1].clone(), grad[k:k + 1], x_nat[k:k + 1],
                          eps=float(budgets[k]), step_size=0.01, norm=norm)
        torch.testing.assert_close(ours[k:k + 1], alone, rtol=0, atol=1e-15)
    zero_d = pgd_step_(x_adv.clone(), grad, x_nat, eps=torch.tensor(0.03, dtype=torch.float64),
                       step_size=0.01, norm=norm)
    torch.testing.assert_close(zero_d, pgd_step_(x_adv.clone(), grad, x_nat, eps=0.03,
                                                 step_size=0.01, norm=norm), rtol=0, atol=0)


@pytest.mark.parametrize("eps, message", [
    (torch.full((4,), 0.03), r"\[N\] or \[N, 1, \.\.\., 1\].*N = 5.*got shape \(4,\)"),
    (torch.full((5, 3), 0.03), r"got shape \(5, 3\)"),
    (torch.tensor([0.03, 0.03, 8.0, 0.03, 0.03]), r"eps must be in \(0, 1\], got 8.0"),
])
def test_a_bad_tensor_budget_names_the_shapes_or_the_value(eps, message):
    x = torch.rand(5, 3, 4, 4)
    with pytest.raises(ValueError, match=message):
        pgd_step_(x.clone(), torch.randn_like(x), x, eps=eps, step_size=0.01)
