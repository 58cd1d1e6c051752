"""The trainer's speed and reproducibility options: bf16 autocast on the device the
images are on, torch.compile of the attack (captured once, reused every step), deterministic
mode, and the `fastacl bench` command."""

import copy
import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

import fastacl
from fastacl import TrainConfig
from fastacl.attacks import pgd_contrastive
from fastacl.cli import main as cli_main
from fastacl.losses import ACLLoss
from fastacl.models import build_model
from fastacl.ops import nt_xent
from fastacl.optim import LARS
from fastacl.pretrain import compiled_for_attack, deterministic_mode, loss_for, train_step
from tests.conftest import relative_error
from tests.test_train import TINY

N, SIZE = 8, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model():
    torch.manual_seed(0)
    return build_model("resnet18-small", width=4, head_dim=16, in_channels=1).train()


def _cfg(**overrides):
    values = dict(method="acl-air", dataset="mnist5k", batch_size=N, attack_steps=3,
                  device="cpu", evaluate=False)
    return TrainConfig.from_options(**{**values, **overrides}).resolve()


def _views(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x_orig, x1, x2 = (torch.rand(N, 1, SIZE, SIZE, generator=g) for _ in range(3))
    return x_orig.to(device), x1.to(device), x2.to(device)


def _step(model, cfg, views, seed=10):
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    loss_fn = loss_for(cfg)
    generator = torch.Generator(views[0].device).manual_seed(seed)
    return train_step(model, loss_fn, optimizer, *views, cfg, generator)


@pytest.mark.parametrize("fold_bn,conv_calls", [(False, 6), (True, 3)])
def test_bf16_autocasts_on_the_cpu_and_stays_close_to_fp32(fold_bn, conv_calls):
    model = _tiny_model()
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    reference = _step(copy.deepcopy(model), _cfg(fold_bn=fold_bn), _views())
    assert set(seen) == {torch.float32}
    seen.clear()
    fast = _step(copy.deepcopy(model), _cfg(precision="bf16", fold_bn=fold_bn), _views())
    # 3 training forwards and, unfolded, 3 attack steps, all in bf16 on the CPU now (a folded
    # attack runs the model's mirror, not its modules: their hooks do not see it)
    assert seen == [torch.bfloat16] * conv_calls
    hook.remove()
    assert all(value.dtype == torch.float32 for value in fast.values())  # losses in fp32
    # Without the attack (whose iterates bf16 may steer elsewhere on this width-4 net) the
    # loss is the fp32 loss up to bf16 rounding (measured: 0.5%).
    # (A config refuses attack_steps=0 for an adversarial method; the step itself runs it.)
    no_attack, no_attack_bf16 = _cfg(), _cfg(precision="bf16")
    no_attack.attack.steps = no_attack_bf16.attack.steps = 0
    reference = _step(copy.deepcopy(model), no_attack, _views())
    fast = _step(copy.deepcopy(model), no_attack_bf16, _views())
    assert relative_error(fast["total"], reference["total"]) < 0.02


@pytest.mark.parametrize("form", ["exact", "reference-code"])
def test_loss_ops_stay_fp32_inside_a_bf16_autocast_region(form):
    """The trainer computes the losses on fp32 projections; a user calling the ops inside an
    autocast region must get the same fp32 losses and gradients, not bf16 matmuls."""
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(37, 19, generator=g, requires_grad=True) for _ in range(5)]
    loss_fn = ACLLoss(0.2, 0.5, 0.5, 0.5, form)
    outside = loss_fn(*z)._asdict()
    grads_outside = torch.autograd.grad(outside["total"], z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(*z)._asdict()
        assert torch.mm(z[0], z[1].T).dtype == torch.bfloat16  # autocast is really on
    grads_inside = torch.autograd.grad(inside["total"], z)
    for name, value in outside.items():
        assert inside[name].dtype == torch.float32 and torch.equal(inside[name], value), name
    for a, b in zip(grads_outside, grads_inside, strict=True):
        assert torch.equal(a, b)


def test_bf16_attack_is_as_strong_as_fp32():
    """bf16 input gradients are noisier, but the attack only uses their signs: measured in fp32,
    the bf16 attack raises NT-Xent as much as the fp32 one (here 3.776 vs 3.770 from 3.449;
    on the trained demo checkpoint 6.4072 vs 6.4073 from 6.019)."""
    torch.manual_seed(0)
    model = build_model("resnet18-small", width=8, head_dim=32, in_channels=1).train()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.rand(16, 1, 16, 16, generator=g) for _ in range(2))

    def loss(a, b):
        with torch.no_grad():
            model.eval()
            z = model(torch.cat([a, b]), branch="adv")
            model.train()
            return float(nt_xent(z[:16], z[16:]))

    clean = loss(x1, x2)
    raised = {}
    for dtype in (None, torch.bfloat16):
        adversarial = pgd_contrastive(model, x1, x2, eps=0.15, step_size=0.05, steps=3,
                                      generator=torch.Generator().manual_seed(1),
                                      autocast_dtype=dtype)
        raised[dtype] = loss(*adversarial) - clean
    assert raised[None] > 0.1
    assert raised[torch.bfloat16] > 0.9 * raised[None]


def test_compiled_attack_is_captured_once_and_matches_eager():
    model = _tiny_model()
    x_orig, x1, x2 = _views()
    compiled = compiled_for_attack(model)
    assert compiled_for_attack(model) is compiled  # built once per model
    eager = pgd_contrastive(model, x1, x2, eps=0.15, step_size=0.05, steps=3,
                            generator=torch.Generator().manual_seed(3))
    fast = pgd_contrastive(compiled, x1, x2, eps=0.15, step_size=0.05, steps=3,
                           generator=torch.Generator().manual_seed(3))
    for a, b, x in zip(eager, fast, (x1, x2), strict=True):
        assert (b - x).abs().max() <= 0.15 + 1e-6  # within the budget
        # Same iterates up to compiled-kernel rounding, which may flip the sign of a
        # near-zero gradient entry: at most a few pixels differ, by a multiple of the step.
        differ = (a - b).abs() > 1e-6
        assert differ.float().mean() < 0.02
    assert model.training and all(p.requires_grad for p in model.parameters())

    # Through the trainer: the graphs compiled in the first step are reused by later steps
    # (parameters updated in place in between): no recompilation.
    cfg = _cfg(compile=True)
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    loss_fn = loss_for(cfg)
    generator = torch.Generator().manual_seed(4)
    train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg, generator)
    graphs = counters["stats"]["unique_graphs"]
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        terms = train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg, generator)
    assert counters["stats"]["unique_graphs"] == graphs
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(v) for v in terms.values())


def test_attack_precision_alone_runs_the_attack_in_bf16_and_training_in_fp32():
    assert _cfg().speed.attack_precision == "fp32"
    assert _cfg(precision="bf16").speed.attack_precision == "bf16"
    with pytest.raises(ValueError, match="attack_precision must be one of fp32, bf16"):
        _cfg(attack_precision="fp16")
    model = _tiny_model()
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    terms = _step(model, _cfg(attack_precision="bf16", fold_bn=False), _views())
    # 3 attack steps in bf16, then the 3 training forwards in fp32
    assert seen == [torch.bfloat16] * 3 + [torch.float32] * 3
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("overrides", [dict(precision="bf16"), dict(compile=True),
                                       dict(attack_precision="bf16")])
def test_deterministic_mode_refuses_fast_paths(overrides):
    with pytest.raises(ValueError, match="deterministic=True"):
        _cfg(deterministic=True, **overrides)


def test_compile_mode_needs_compile():
    with pytest.raises(ValueError, match="needs compile=True"):
        _cfg(compile_mode="reduce-overhead")


@pytest.mark.parametrize("initially", [False, True])
def test_deterministic_mode_sets_and_restores_the_flags(initially, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(initially)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with deterministic_mode():
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() == initially
        assert torch.backends.cuda.matmul.allow_tf32 == tf32
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        with deterministic_mode(enabled=False):
            assert torch.are_deterministic_algorithms_enabled() == initially
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(tmp_path):
    inside = []

    def check(epoch, step, terms):
        inside.append(torch.are_deterministic_algorithms_enabled())
        return False

    common = dict(method="acl-air", epochs=1, seed=5, deterministic=True, **TINY)
    first = fastacl.train(out_dir=str(tmp_path / "a"), on_step=check, **common)
    second = fastacl.train(out_dir=str(tmp_path / "b"), **common)
    assert inside and all(inside)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    a = torch.load(first.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(second.checkpoint, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert config["speed"]["deterministic"] is True


@pytest.mark.slow
def test_fastacl_bench_prints_the_table_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--cases", "cpu-small-mnist", "--steps", "1", "--threads", "1",
                     "--workers", "1", "--variants", "fp32", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "baseline img/s" in printed and "x\n" in printed
    (row,) = json.loads(out.read_text())
    assert row["case"] == "cpu-small-mnist" and row["variant"] == "fp32"
    assert row["batch"] == 128 and row["baseline_workers"] == 1
    assert row["fastacl_images_per_s"] > 0 and row["baseline_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["fastacl_images_per_s"]
                                         / row["baseline_images_per_s"])


def test_fastacl_bench_rejects_bad_options(capsys):
    assert cli_main(["bench", "--variants", "fp16"]) == 2
    assert "must start with fp32 or bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--cases", "no-such-case"])


@pytest.mark.gpu
def test_cuda_bf16_channels_last_compiled_step_stays_close_to_fp32():
    model = _tiny_model().cuda()
    views = _views("cuda")
    reference = _step(copy.deepcopy(model), _cfg(device="cuda"), views)
    fast_model = model.to(memory_format=torch.channels_last)
    fast_views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    fast = _step(fast_model, _cfg(device="cuda", precision="bf16", channels_last=True,
                                  compile=True), fast_views)
    for name, value in reference.items():
        assert relative_error(fast[name], value) < 0.05, name
