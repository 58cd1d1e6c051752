"""fastacl.ops.nt_xent: both paths against the float64 reference, the op registration, bad input.

The Triton path runs here through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without
a GPU): fp32 and tiny shapes only. The `gpu` tier runs the real kernels over fp32 / bf16 / fp16.
"""

import pytest
import torch

from fastacl import ops
from fastacl.ops.nt_xent import (
    nt_xent_backward,
    nt_xent_forward,
    nt_xent_logits,
    nt_xent_reference,
)
from tests.conftest import relative_error

# (N, d): odd sizes; N = 2, d = 1 is the smallest legal batch; N = 70, d = 130 crosses several
# 64-row tiles and 64-wide chunks of d at the launchers' default block sizes.
SHAPES = [(37, 19), (2, 1), (70, 130)]
TEMPERATURES = [0.1, 0.5, 1.0]


# Triton-path tests need CUDA tensors on a GPU machine and CPU tensors under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _views(n, d, dtype=torch.float64, device=DEVICE):
    return (
        torch.randn(n, d, dtype=dtype, device=device),
        torch.randn(n, d, dtype=dtype, device=device),
    )


def _loss_and_grads(fn, z1, z2, temperature, grad_loss):
    """fn's loss and its gradients for the upstream gradient grad_loss (not 1: not the last op)."""
    z1 = z1.detach().clone().requires_grad_()
    z2 = z2.detach().clone().requires_grad_()
    loss = fn(z1, z2, temperature)
    grad_z1, grad_z2 = torch.autograd.grad(loss, (z1, z2), grad_loss.to(loss))
    return loss.detach(), grad_z1, grad_z2


def _errors(z1, z2, temperature, dtype):
    """Relative errors of (loss, dz1, dz2) at `dtype` on the current backend vs float64."""
    grad_loss = torch.rand((), dtype=torch.float64) * 2 + 0.5
    expected = _loss_and_grads(nt_xent_reference, z1, z2, temperature, grad_loss)
    actual = _loss_and_grads(ops.nt_xent, z1.to(dtype), z2.to(dtype), temperature, grad_loss)
    for a in actual:
        assert a.dtype == dtype
    return [_error(a, e) for a, e in zip(actual, expected, strict=True)]


def _error(actual, expected):
    """Relative error by norm; absolute where the exact value is 0 and float64 shows only its
    rounding (d = 1: every u is +-1, locally constant in z, so the exact gradient is 0)."""
    if expected.double().norm() <= 1e-12:
        return (actual.double() - expected.double()).norm().item()
    return relative_error(actual, expected)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n, d", SHAPES)
def test_torch_path_matches_reference_in_float64(n, d, temperature):
    z1, z2 = _views(n, d)
    with ops.use_backend("torch"):
        errors = _errors(z1, z2, temperature, torch.float64)
    assert max(errors) <= 1e-6, errors


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n, d", SHAPES)
def test_triton_path_in_float32_matches_float64_reference(n, d, temperature):
    z1, z2 = _views(n, d)
    with ops.use_backend("triton"):
        errors = _errors(z1, z2, temperature, torch.float32)
    assert max(errors) <= 1e-4, errors


def test_kernels_with_small_blocks_cross_every_tile_boundary():
    """Blocks of 16: 7 x 7 anchor / column tiles, 3 chunks of d, 3 slices of the gradient's d;
    the inputs are strided views (a transpose and a column slice), not contiguous copies."""
    from fastacl.kernels import nt_xent as kernels

    n, d, temperature = 50, 40, 0.2
    z1 = torch.randn(d, n, dtype=torch.float64, device=DEVICE).T
    z2 = torch.randn(n, 2 * d, dtype=torch.float64, device=DEVICE)[:, ::2]
    grad_loss = torch.tensor(1.7, dtype=torch.float64)
    expected = _loss_and_grads(nt_xent_reference, z1, z2, temperature, grad_loss)
    blocks = dict(block_m=16, block_n=16, block_d=16)
    loss, lse = kernels.nt_xent_forward(z1.float(), z2.float(), temperature, **blocks)
    grads = kernels.nt_xent_backward(
        grad_loss.float(), z1.float(), z2.float(), lse, temperature, **blocks, block_dv=16
    )
    errors = [relative_error(a, e) for a, e in zip((loss, *grads), expected, strict=True)]
    assert max(errors) <= 1e-4, errors
    expected_lse = torch.logsumexp(nt_xent_logits(z1, z2, temperature)[0], dim=1)
    assert relative_error(lse, expected_lse) <= 1e-5


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("n, d", [(37, 19), (20, 130)], ids=["d<=128", "d>128"])
def test_every_launch_config_matches_the_float64_reference(n, d, tf32, capability):
    """Each config branch of the launchers (target x dot path x width; kernels/nt_xent.py),
    asked for explicitly: on the CPU the interpreter runs what a GPU of that capability gets.
    bf16 shares the tf32 branch's tiles; the interpreter has no bf16 (the gpu tier runs it)."""
    from fastacl.kernels import nt_xent as kernels

    z1, z2 = _views(n, d)
    grad_loss = torch.tensor(1.3, dtype=torch.float64)
    expected = _loss_and_grads(nt_xent_reference, z1, z2, 0.2, grad_loss)
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    matmul.allow_tf32 = tf32  # what the launchers read to choose the fp32 dot path
    try:
        assert kernels._dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
        a, b = z1.float(), z2.float()
        loss, lse = kernels.nt_xent_forward(a, b, 0.2, capability=capability)
        grads = kernels.nt_xent_backward(grad_loss.float().to(a.device), a, b, lse, 0.2,
                                         capability=capability)  # fmt: skip
    finally:
        matmul.allow_tf32 = allowed
    # TF32 keeps 10 mantissa bits on a GPU; the interpreter multiplies in fp32 either way
    tolerance = 5e-3 if tf32 and z1.is_cuda else 1e-4
    errors = [relative_error(x, e) for x, e in zip((loss, *grads), expected, strict=True)]
    assert max(errors) <= tolerance, errors


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the kernel launchers called during the test, in order."""
    from fastacl.kernels import nt_xent as kernels

    calls = []
    for name in ("nt_xent_forward", "nt_xent_backward"):
        launcher = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    return calls


def test_backend_is_read_when_the_op_and_its_backward_run(monkeypatch, kernel_calls):
    """FASTACL_BACKEND set after import takes effect; forward and backward both launch kernels."""
    z1, z2 = _views(5, 3, torch.float32)
    z1.requires_grad_()
    ops.nt_xent(z1, z2).backward()
    assert kernel_calls == []  # auto on CPU tensors: the reference
    monkeypatch.setenv("FASTACL_BACKEND", "triton")
    ops.nt_xent(z1, z2).backward()
    assert kernel_calls == ["nt_xent_forward", "nt_xent_backward"]


@pytest.mark.parametrize("forward, backward", [("torch", "triton"), ("triton", "torch")])
def test_either_backward_follows_either_forward(forward, backward):
    """The backend may change between forward and backward: both paths save the same lse."""
    z1, z2 = _views(9, 6)
    expected = _loss_and_grads(nt_xent_reference, z1, z2, 0.5, torch.tensor(1.0))[1:]
    a = z1.float().requires_grad_()
    b = z2.float().requires_grad_()
    with ops.use_backend(forward):
        loss = ops.nt_xent(a, b)
    with ops.use_backend(backward):
        loss.backward()
    assert relative_error(a.grad, expected[0]) <= 1e-4
    assert relative_error(b.grad, expected[1]) <= 1e-4


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_gives_non_finite_loss_and_gradients(backend, bad):
    z1, z2 = _views(6, 5, torch.float32)
    z2[3, 1] = bad
    z1.requires_grad_()
    with ops.use_backend(backend):
        loss = ops.nt_xent(z1, z2)
        loss.backward()
    assert not torch.isfinite(loss)
    assert not torch.isfinite(z1.grad).all()


def test_float64_on_forced_triton_uses_the_reference():
    """The kernels accumulate in fp32; float64 stays exact on the reference path."""
    z1, z2 = _views(8, 4)
    with ops.use_backend("triton"):
        loss = ops.nt_xent(z1, z2)
    assert loss.dtype == torch.float64
    assert relative_error(loss, nt_xent_reference(z1, z2)) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    z1, z2 = _views(6, 5, torch.float32)
    with ops.use_backend(backend):
        torch.library.opcheck(
            nt_xent_forward, (z1.clone().requires_grad_(), z2.clone().requires_grad_(), 0.3)
        )
        _, lse = nt_xent_forward(z1, z2, 0.3)
        torch.library.opcheck(nt_xent_backward, (torch.tensor(1.5), z1, z2, lse, 0.3))


@pytest.mark.slow  # about 20 s on 2 cores with a cold inductor cache (forward + backward graphs)
def test_torch_compile_fullgraph_matches_eager():
    """The op is opaque to the compiler (custom_op + register_fake): no graph break."""

    def training_step(z1, z2):
        return 2.0 * ops.nt_xent(z1.tanh(), z2, temperature=0.2) + z1.square().mean()

    z1, z2 = _views(12, 7, torch.float32)
    grad_loss = torch.tensor(0.7)
    expected = _loss_and_grads(lambda a, b, t: training_step(a, b), z1, z2, None, grad_loss)
    compiled = torch.compile(training_step, fullgraph=True)
    actual = _loss_and_grads(lambda a, b, t: compiled(a, b), z1, z2, None, grad_loss)
    for a, e in zip(actual, expected, strict=True):
        assert relative_error(a, e) <= 1e-5


@pytest.mark.parametrize(
    "z1, z2, temperature, message",
    [
        (torch.randn(4, 3), torch.randn(5, 3), 0.5, r"shape \(5, 3\).*\(4, 3\).*row for row"),
        (torch.randn(1, 3), torch.randn(1, 3), 0.5, "at least 2 rows.*got 1"),
        (torch.randn(4), torch.randn(4), 0.5, r"2-D \[N, d\]"),
        (torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3)), 0.5, "floating-point.*int64"),
        (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), 0.5, "float64.*float32"),
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, "temperature must be > 0, got 0.0"),
        (torch.randn(4, 3), torch.randn(4, 3), -1, "temperature must be > 0, got -1.0"),
        (torch.randn(4, 3), torch.randn(4, 3), float("nan"), "temperature must be > 0, got nan"),
    ],
)
def test_bad_input_is_a_clear_error(z1, z2, temperature, message):
    with pytest.raises(ValueError, match=message):
        ops.nt_xent(z1, z2, temperature)


def test_gather_distributed_without_a_process_group_is_the_plain_loss():
    # The 2-process gather itself is tested in tests/test_distributed.py.
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(ops.nt_xent(z1, z2, gather_distributed=True), ops.nt_xent(z1, z2))


# ---------------------------------------------------------------------------------------------
# GPU tier: the compiled kernels over the dtype grid, flash-attention's tolerance rule:
#   |ours - ref| <= 2 |torch at the same dtype - ref| + atol   (max over elements)
# with ref in float32 for bf16 / fp16 and in float64 for fp32 (against an fp32 ref, torch at fp32
# would be the ref itself and the rule would reduce to atol alone).

ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
@pytest.mark.parametrize("n, d", [(37, 19), (300, 200), (1024, 512), (4096, 128)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gpu_kernels_within_flash_attention_tolerance(n, d, dtype, temperature):
    z1, z2 = _views(n, d, torch.float32, "cuda")
    grad_loss = torch.tensor(1.3, device="cuda")
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ref = _loss_and_grads(
        nt_xent_reference, z1.to(ref_dtype), z2.to(ref_dtype), temperature, grad_loss
    )
    torch_same = _loss_and_grads(
        nt_xent_reference, z1.to(dtype), z2.to(dtype), temperature, grad_loss
    )
    ours = _loss_and_grads(ops.nt_xent, z1.to(dtype), z2.to(dtype), temperature, grad_loss)
    for name, o, t, r in zip(("loss", "grad_z1", "grad_z2"), ours, torch_same, ref, strict=True):
        assert o.dtype == dtype
        error = (o.double() - r.double()).abs().max().item()
        bound = 2 * (t.double() - r.double()).abs().max().item() + ATOL[dtype]
        assert error <= bound, f"{name}: {error} > {bound}"


@pytest.mark.gpu
def test_gpu_auto_backend_runs_the_kernels_and_passes_opcheck(kernel_calls):
    z1, z2 = _views(64, 32, torch.float64, "cuda")
    errors = _errors(z1, z2, 0.5, torch.float32)
    assert max(errors) <= 1e-4, errors
    assert kernel_calls == ["nt_xent_forward", "nt_xent_backward"]
    z1, z2 = z1.float(), z2.float()
    torch.library.opcheck(
        nt_xent_forward, (z1.clone().requires_grad_(), z2.clone().requires_grad_(), 0.5)
    )


def test_an_empty_feature_dimension_is_an_error():
    z = torch.zeros(8, 0)
    with pytest.raises(ValueError, match=r"no features \(shape \(8, 0\)\): d must be >= 1"):
        ops.nt_xent(z, z.clone())
