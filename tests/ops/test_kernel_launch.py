"""kernels/_launch.py: which target's configs a launch gets, and that it runs on its inputs' GPU."""

import pytest
import torch

from fastacl import ops
from fastacl.ops.nt_xent import nt_xent_reference
from fastacl.ops.pgd_step import pgd_step_reference_
from fastacl.ops.sir_air import air_reference
from tests.conftest import relative_error

launch = pytest.importorskip("fastacl.kernels._launch")


@pytest.mark.parametrize(
    "capability, target",
    [((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_80"), ((9, 0), "sm_90"),
     ((10, 0), "sm_90"), ((12, 0), "sm_80"), ((7, 5), "sm_80")],
)  # fmt: skip
def test_capability_picks_the_config_table(capability, target):
    """Hopper and data-centre Blackwell (227 KiB of shared memory) get the sm_90 table; the
    99 KiB parts (8.6, 8.9, 12.x) and the rest the sm_80 one."""
    assert launch.target(capability) == target


def test_explicit_capability_wins_and_the_cpu_gets_the_interpreter_default():
    x = torch.zeros(2)
    assert launch.capability_of(x) == launch.INTERPRETER_CAPABILITY
    assert launch.capability_of(x, (9, 0)) == (9, 0)


def test_config_tables_differ_where_the_targets_do():
    """The fp32 ieee path, the one that spilled, has its own tiles per target."""
    from fastacl.kernels import nt_xent as kernels

    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        configs = {c: kernels.backward_config(torch.float32, 128, c) for c in [(8, 0), (9, 0)]}
    finally:
        matmul.allow_tf32 = allowed
    assert configs[(8, 0)] != configs[(9, 0)]
    # a tensor-core path keeps tiles of at least 64 x 64
    bf16 = kernels.forward_config(torch.bfloat16, 512, (9, 0))
    assert bf16["BLOCK_M"] >= 64 and bf16["BLOCK_N"] >= 64


@pytest.mark.gpu
def test_gpu_config_follows_the_device_capability():
    x = torch.zeros(2, device="cuda")
    assert launch.capability_of(x) == torch.cuda.get_device_capability(x.device)


@pytest.mark.gpu
def test_inputs_on_a_second_gpu_launch_there():
    """Triton launches on the current device: every launcher switches to its inputs' one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    z = [torch.randn(64, 32, device=device) for _ in range(5)]
    with ops.use_backend("triton"):
        nt_xent = ops.nt_xent(z[0], z[1])
        air = ops.air(*z)
        x_nat = torch.rand(4, 3, 8, 8, device=device)
        grad = torch.randn_like(x_nat)
        x_adv = x_nat.clone()
        ops.pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255)
    torch.cuda.synchronize(device)
    assert relative_error(nt_xent, nt_xent_reference(z[0], z[1])) <= 1e-4
    assert relative_error(air, air_reference(*z)) <= 1e-4
    expected = x_nat.clone()
    pgd_step_reference_(expected, grad, x_nat, 8 / 255, 2 / 255, "linf")
    assert torch.equal(x_adv, expected)
