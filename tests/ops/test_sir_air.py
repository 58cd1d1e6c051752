import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastacl import ops
from fastacl.ops.sir_air import air_reference, sir_reference
from tests.conftest import HAS_CUDA, relative_error

# name -> (functional, reference, number of [N, d] inputs)
OPS = {"sir": (ops.sir, sir_reference, 3), "air": (ops.air, air_reference, 5)}
FORMS = ("exact", "reference-code")
UPSTREAM = 1.7  # a non-unit gradient of the loss, as when it is one weighted term of a sum
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _inputs(count, n, d, dtype=torch.float64, device="cpu"):
    return [torch.randn(n, d, dtype=dtype, device=device) for _ in range(count)]


def _loss_and_grads(fn, inputs, temperature, form):
    leaves = [z.detach().clone().requires_grad_() for z in inputs]
    loss = fn(*leaves, temperature=temperature, form=form)
    grads = torch.autograd.grad(loss, leaves, torch.full_like(loss, UPSTREAM))
    return loss, grads


def _assert_close_by_norm(actual, expected, rtol, atol=0.0, baseline=None):
    """||ours - ref|| <= rtol ||ref|| + 2 ||baseline - ref|| + atol for the loss and every gradient.

    baseline: the reference run in float32, for the Triton path (float32 against a float64 ref).
    A KL of nearly equal distributions is a cancellation of much larger terms, so some cases
    (t = 2, d = 300: all cosines ~0, near-uniform softmaxes) lose ~2e-4 of relative accuracy in
    any float32 computation, PyTorch's included: there ours may be off by twice what float32
    PyTorch is (the flash-attention rule). Elsewhere that term is negligible against rtol.
    atol: see _float32_atol.
    """
    names = ["loss", *(f"gradient of input {i}" for i in range(len(actual[1])))]
    flat = lambda result: [result[0], *result[1]]
    bases = flat(baseline) if baseline else [None] * len(names)
    distance = lambda a, b: (a.detach().double().cpu() - b.detach().double().cpu()).norm().item()
    for name, ours, ref, base in zip(names, flat(actual), flat(expected), bases, strict=True):
        base_distance = 0.0 if base is None else distance(base, ref)
        allowed = rtol * ref.norm().item() + 2 * base_distance + atol
        assert distance(ours, ref) <= allowed, (
            f"{name}: relative error {relative_error(ours, ref):.3g}, float32 PyTorch's "
            f"{'-' if base is None else f'{relative_error(base, ref):.3g}'}"
        )


def _float32_atol(d):
    """With d = 1 every cosine is +-1: every gradient is exactly 0 (terms of size ~1/(t ||z||) that
    cancel) and the loss can be a sum of ~1e-8 terms, so relative error is meaningless there. Judge
    those by absolute size; float32 PyTorch is off by 4e-6 on such a case."""
    return 1e-5 if d == 1 else 0.0


def _check_triton_path(name, inputs, temperature, form):
    """The Triton path on float32 copies of the float64 `inputs` against the float64 reference."""
    fn, reference, _ = OPS[name]
    with ops.use_backend("triton"):
        actual = _loss_and_grads(fn, [z.float().to(DEVICE) for z in inputs], temperature, form)
    assert actual[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in actual[1])
    expected = _loss_and_grads(reference, inputs, temperature, form)
    baseline = _loss_and_grads(reference, [z.float() for z in inputs], temperature, form)
    atol = _float32_atol(inputs[0].shape[1])
    _assert_close_by_norm(actual, expected, rtol=1e-4, atol=atol, baseline=baseline)


@pytest.fixture
def kernels():
    """The Triton kernels, run by the interpreter on CPU tensors when there is no GPU."""
    return pytest.importorskip("fastacl.kernels.sir_air")


# --- the reference against docs/acl-air.md section 6 -------------------------------------------


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_reference_is_the_spec_formulas(temperature):
    """A direct transcription of docs/acl-air.md section 6 with F.kl_div (sum reduction):
    kl_div(input, target) = sum target (log target - input), so the exact form passes log P_i and
    the released code's form passes P_i itself as the input."""
    z1, z2, z_orig, z1_adv, z2_adv = _inputs(5, 6, 4)

    def softmax_of(a, b):
        return torch.softmax(F.cosine_similarity(a, b, dim=1) / temperature, dim=0)

    p_i, p_j = softmax_of(z1, z_orig), softmax_of(z2, z_orig)
    r_i = softmax_of(z1_adv, z_orig) * softmax_of(z1_adv, z1)
    r_j = softmax_of(z2_adv, z_orig) * softmax_of(z2_adv, z2)
    expected = {
        ("sir", "exact"): F.kl_div(p_i.log(), p_j, reduction="sum"),
        ("sir", "reference-code"): F.kl_div(p_i, p_j, reduction="sum"),
        ("air", "exact"): F.kl_div(r_i.log(), r_j, reduction="sum"),
        ("air", "reference-code"): F.kl_div(r_i, r_j, reduction="sum"),
    }
    for form in FORMS:
        sir = sir_reference(z1, z2, z_orig, temperature, form)
        air = air_reference(z1, z2, z_orig, z1_adv, z2_adv, temperature, form)
        torch.testing.assert_close(sir, expected["sir", form], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(air, expected["air", form], rtol=1e-12, atol=1e-14)


def test_exact_sir_is_nonnegative_and_exact_air_can_be_negative():
    for seed in range(5):
        torch.manual_seed(seed)
        assert ops.sir(*_inputs(3, 16, 8)) >= 0
    # Rows on the unit circle: z_orig = e1, z~ at angle theta_k, z^i at 2 theta_k, z^j = z~^j.
    # Then A_i = C_i = A_j = a := softmax(cos(theta) / t) and C_j is uniform, so R_i = a^2,
    # R_j = a / N and the exact AIR is (H(a) - log N) / N < 0 whenever a is not uniform.
    t = 0.5
    theta = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    on_circle = lambda angle: torch.stack([angle.cos(), angle.sin()], dim=1)
    z_orig = on_circle(torch.zeros_like(theta))
    z_adv = on_circle(theta)
    a = torch.softmax(theta.cos() / t, dim=0)
    expected = (-(a * a.log()).sum() - math.log(3)) / 3
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            air = ops.air(on_circle(2 * theta), z_adv, z_orig, z_adv, z_adv, temperature=t)
            sir = ops.sir(on_circle(2 * theta), z_adv, z_orig, temperature=t)
        assert air < 0
        torch.testing.assert_close(air, expected)
        assert sir >= 0


# --- paths against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("n, d", [(37, 19), (2, 1), (40, 300)])
def test_torch_path_matches_reference(name, form, temperature, n, d):
    fn, reference, count = OPS[name]
    inputs = _inputs(count, n, d)
    with ops.use_backend("torch"):
        actual = _loss_and_grads(fn, inputs, temperature, form)
    expected = _loss_and_grads(reference, inputs, temperature, form)
    _assert_close_by_norm(actual, expected, rtol=1e-6, atol=1e-12 if d == 1 else 0.0)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("n, d", [(37, 19), (2, 1), (40, 300)])
def test_triton_path_matches_reference(kernels, name, form, temperature, n, d):
    # 40 rows > ROWS_PER_PROGRAM: several row programs; d = 300: three masked d chunks.
    _check_triton_path(name, _inputs(OPS[name][2], n, d), temperature, form)


@pytest.mark.parametrize("name, form", [("sir", "exact"), ("air", "reference-code")])
def test_triton_path_with_more_rows_than_a_reduction_block(kernels, name, form):
    # The interpreter is slow at this size; the form does not change the blocking.
    n = kernels.REDUCTION_BLOCK + 77
    _check_triton_path(name, _inputs(OPS[name][2], n, 3), 0.5, form)


def test_triton_path_takes_non_contiguous_inputs(kernels):
    inputs = [z.T for z in _inputs(5, 7, 12)]  # [12, 7] views of [7, 12] rows
    assert not inputs[0].float().is_contiguous()
    _check_triton_path("air", inputs, 0.5, "exact")


# --- registration -------------------------------------------------------------------------------


def _opcheck_cases(name, device):
    count = OPS[name][2]
    inputs = _inputs(count, 5, 3, dtype=torch.float32, device=device)
    grad = torch.tensor(UPSTREAM, device=device)
    forward = getattr(torch.ops.fastacl, f"{name}_forward")
    backward = getattr(torch.ops.fastacl, f"{name}_backward")
    for form in FORMS:
        leaves = [z.clone().requires_grad_() for z in inputs]
        yield forward, (*leaves, 0.5, form)
        yield backward, (grad, *inputs, 0.5, form)


@pytest.mark.parametrize("name", OPS)
def test_opcheck_torch_path(name):
    with ops.use_backend("torch"):
        for op, args in _opcheck_cases(name, "cpu"):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", OPS)
def test_opcheck_triton_path(kernels, name):
    with ops.use_backend("triton"):
        for op, args in _opcheck_cases(name, DEVICE):
            torch.library.opcheck(op, args)


def test_importing_and_the_torch_path_need_no_triton():
    # sys.modules["triton"] = None makes any `import triton` fail, as on a machine without it.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastacl\n"
        "z = [torch.randn(4, 3, requires_grad=True) for _ in range(5)]\n"
        "(fastacl.ops.sir(*z[:3]) + fastacl.ops.air(*z)).backward()\n"
        "assert not any(name.startswith('fastacl.kernels') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- bad input ----------------------------------------------------------------------------------


def _call(name, inputs, **kwargs):
    return OPS[name][0](*inputs, **kwargs)


@pytest.mark.parametrize("name", OPS)
def test_bad_inputs_raise_value_errors_naming_the_problem(name):
    count = OPS[name][2]
    good = _inputs(count, 4, 3)
    mismatched = [*good[:-1], torch.randn(4, 5, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"has shape \(4, 5\).*match row for row"):
        _call(name, mismatched)
    with pytest.raises(ValueError, match="at least 2 rows"):
        _call(name, _inputs(count, 1, 3))
    with pytest.raises(ValueError, match="floating-point.*torch.int64"):
        _call(name, [torch.ones(4, 3, dtype=torch.int64)] * count)
    for temperature in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            _call(name, good, temperature=temperature)
    with pytest.raises(ValueError, match="unknown form 'paper'.*exact, reference-code"):
        _call(name, good, form="paper")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_give_a_non_finite_loss(request, backend, name, bad):
    if backend == "triton":
        request.getfixturevalue("kernels")
    count = OPS[name][2]
    for position in range(count):
        inputs = _inputs(count, 6, 4, dtype=torch.float32, device=DEVICE)
        inputs[position][2, 1] = bad
        with ops.use_backend(backend):
            loss = _call(name, inputs)
        assert not torch.isfinite(loss), (position, loss)


# --- GPU tier -----------------------------------------------------------------------------------

ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n, d", [(4096, 128), (1000, 512)])
def test_gpu_flash_attention_tolerance_rule(dtype, name, form, n, d):
    """Pass if |ours - fp32_ref| <= 2 |torch_same_dtype - fp32_ref| + atol, elementwise."""
    fn, reference, count = OPS[name]
    inputs = _inputs(count, n, d, dtype=dtype, device="cuda")
    ours = _loss_and_grads(fn, inputs, 0.5, form)
    with ops.use_backend("torch"):
        torch_same = _loss_and_grads(fn, inputs, 0.5, form)
    fp32_ref = _loss_and_grads(reference, [z.float() for z in inputs], 0.5, form)
    flat = lambda result: [result[0], *result[1]]
    for actual, baseline, ref in zip(flat(ours), flat(torch_same), flat(fp32_ref), strict=True):
        assert actual.dtype == dtype
        ours_error = (actual.float() - ref).abs()
        allowed = 2 * (baseline.float() - ref).abs() + ATOL[dtype]
        assert (ours_error <= allowed).all(), (ours_error - allowed).max().item()
