"""torch.distributed on CPU: 2 gloo processes against 1 process on the concatenated batch.

The gradient convention (fastacl.distributed): every rank computes the loss of the gathered global
batch, rank r's embedding gradient is W times its slice of the full-batch gradient, and DDP's
average of the parameter gradients is the single-process gradient of the global batch.

Each multi-process test spawns its ranks (torch.multiprocessing, start method spawn) with
torch.set_num_threads(1); the reference runs in this process. Results come back through files.
"""

import contextlib
import datetime
import faulthandler
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastacl.pretrain.loop as pretrain_loop
import fastacl.pretrain.step as pretrain_step
from fastacl import distributed, pretrain
from fastacl.config import TrainConfig
from fastacl.losses import ACLLoss, NTXentLoss
from fastacl.models import DualBatchNorm2d, bn_branch, load_checkpoint
from fastacl.ops import nt_xent
from fastacl.ops.nt_xent import nt_xent_reference
from fastacl.utils import unwrap
from tests.conftest import relative_error

WORLD = 2
F64 = dict(rtol=1e-9, atol=1e-12)  # float64: the gathered path is the same arithmetic
# fp32 loss terms (logged values): 1 process and 2 processes sum in different orders.
FP32_RELATIVE = 1e-5
STEP_RELATIVE = 1e-9  # one step of a float64 model whose embeddings go through an fp32 loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))


def _worker(rank, world, port, timeout, fn, args):
    # A rank that hangs (a collective nobody else joins) prints its stack and exits.
    faulthandler.dump_traceback_later(timeout, exit=True)
    torch.set_num_threads(1)  # 2 ranks on a shared 2-core CPU
    _rank_env(rank, world, port)
    fn(rank, world, *args)
    # fn's DDP modules are gone now: destroying the group under a live DDP can hang at exit.
    distributed.destroy()


def _launch(fn, *args, world=WORLD, timeout=120):
    """fn(rank, world, *args) in `world` spawned processes; a rank's exception fails the test."""
    context = mp.start_processes(_worker, args=(world, _free_port(), timeout, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout + 10
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s (a rank hangs)")


def _init_group():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def _rows(rank, world, n):
    """Rank r's contiguous block of a global batch of n rows (as the trainer shards)."""
    local = n // world
    return slice(rank * local, (rank + 1) * local)


# ---- the differentiable all-gather: NT-Xent, NTXentLoss and ACLLoss ------------------------------

N, D_IN, D = 10, 7, 5  # global batch 10 = 5 per rank


def _loss_inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, N, D_IN, dtype=torch.float64, generator=generator)  # two views
    embeddings = torch.randn(5, N, D, dtype=torch.float64, generator=generator)  # ACLLoss inputs
    torch.manual_seed(2)
    linear = nn.Linear(D_IN, D, dtype=torch.float64)
    return x, embeddings, linear


def _gathered_losses(rank, world, out):
    _init_group()
    x, embeddings, linear = _loss_inputs()
    rows = _rows(rank, world, N)
    # NT-Xent behind a DDP model: its parameter gradient is DDP's average over the ranks.
    model = nn.parallel.DistributedDataParallel(linear)
    z = model(torch.cat([x[0, rows], x[1, rows]]))
    z.retain_grad()
    z1, z2 = z.chunk(2)
    loss = 1.7 * nt_xent(z1, z2, 0.5, gather_distributed=True)  # not the last layer: g != 1
    loss.backward()
    module_loss = NTXentLoss(0.5, gather_distributed=True)(z1.detach(), z2.detach())
    # ACLLoss with SIR and AIR: five embedding sets, one gather, every term global.
    leaves = [e[rows].clone().requires_grad_() for e in embeddings]
    result = ACLLoss(weight_w=0.3, lambda1=0.5, lambda2=0.5, gather_distributed=True)(*leaves)
    result.total.backward()
    torch.save({"loss": loss.detach(), "z_grad": z.grad, "module_loss": module_loss,
                "weight_grad": linear.weight.grad, "bias_grad": linear.bias.grad,
                "acl_total": result.total.detach(), "acl_sir": result.sir,
                "acl_air": result.air, "acl_grads": [leaf.grad for leaf in leaves]},
               out / f"rank{rank}.pt")


def test_gathered_nt_xent_and_acl_loss_equal_the_single_process_full_batch(tmp_path):
    _launch(_gathered_losses, tmp_path)
    x, embeddings, linear = _loss_inputs()
    z = linear(torch.cat([x[0], x[1]]))
    z.retain_grad()
    loss = 1.7 * nt_xent_reference(*z.chunk(2), 0.5)
    loss.backward()
    leaves = [e.clone().requires_grad_() for e in embeddings]
    result = ACLLoss(weight_w=0.3, lambda1=0.5, lambda2=0.5)(*leaves)
    result.total.backward()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, got in enumerate(ranks):
        rows = _rows(r, WORLD, N)
        # Every rank computes the loss of the global batch, so the mean over ranks is too.
        torch.testing.assert_close(got["loss"], loss.detach(), **F64)
        torch.testing.assert_close(got["module_loss"], loss.detach() / 1.7, **F64)
        # Rank r's embedding gradient: W times its rows of the full-batch gradient.
        z1_grad, z2_grad = z.grad.chunk(2)
        expected = WORLD * torch.cat([z1_grad[rows], z2_grad[rows]])
        torch.testing.assert_close(got["z_grad"], expected, **F64)
        # DDP's average: exactly the single-process parameter gradient.
        torch.testing.assert_close(got["weight_grad"], linear.weight.grad, **F64)
        torch.testing.assert_close(got["bias_grad"], linear.bias.grad, **F64)
        torch.testing.assert_close(got["acl_total"], result.total.detach(), **F64)
        torch.testing.assert_close(got["acl_sir"], result.sir, **F64)
        torch.testing.assert_close(got["acl_air"], result.air, **F64)
        for leaf_grad, leaf in zip(got["acl_grads"], leaves, strict=True):
            torch.testing.assert_close(leaf_grad, WORLD * leaf.grad[rows], **F64)


def test_gather_without_a_process_group_changes_nothing():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(nt_xent(z1, z2, gather_distributed=True), nt_xent(z1, z2))
    assert distributed.all_gather(z1) is z1
    assert distributed.world_size() == 1 and distributed.is_main_process()


# ---- synchronised dual BN on CPU, and the rank-0 / agreement helpers -----------------------------

def _dual_bn_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), DualBatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6),
        nn.BatchNorm1d(6),
    ).double()


def _bn_inputs():
    generator = torch.Generator().manual_seed(4)
    return torch.rand(2, N, 3, 5, 5, dtype=torch.float64, generator=generator)


def _bn_loss(model, x1, x2, gather):
    """Two forwards before one backward, as in the trainer; both branches, so that every
    parameter gets a gradient (DDP reduces a bucket only when all of its gradients are ready)."""
    loss = 0.0
    for weight, branch in [(1.3, "adv"), (0.6, "normal")]:
        with bn_branch(model, branch):
            z1, z2 = model(torch.cat([x1, x2 * 0.9])).chunk(2)
        loss = loss + weight * nt_xent(z1, z2, 0.5, gather_distributed=gather)
    return loss


def _sync_bn_and_helpers(rank, world, out):
    _init_group()
    x = _bn_inputs()
    rows = _rows(rank, world, N)
    model = distributed.convert_sync_batchnorm(_dual_bn_model(), "cpu")
    kinds = [type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__]
    ddp = distributed.wrap_ddp(model, "cpu")
    _bn_loss(ddp, x[0, rows], x[1, rows], gather=True).backward()
    model.eval()
    with bn_branch(model, "adv"):
        evaluated = model(x[0, rows])
    results = {"kinds": kinds, "grads": {k: p.grad for k, p in model.named_parameters()},
               "buffers": dict(model.named_buffers()), "eval": evaluated.detach()}

    # Helpers: flags, averages, rank-0 decisions and their errors, config agreement.
    results["any"] = (distributed.any_rank(rank == 1), distributed.any_rank(False))
    results["mean"] = distributed.mean_over_ranks({"a": float(rank), "b": 2.0})
    results["objects"] = list(distributed.gather_objects(rank * 10))
    results["main"] = distributed.on_main_process(lambda: f"decided by rank {distributed.rank()}")

    def taken():
        raise FileExistsError("runs/x already holds a run")

    with pytest.raises(FileExistsError, match="already holds a run"):
        distributed.on_main_process(taken)
    distributed.check_same_on_all_ranks({"seed": 0, "method": "acl"})
    with pytest.raises(ValueError, match="seed is 0 on rank 0 but 1 on rank 1"):
        distributed.check_same_on_all_ranks({"seed": rank, "method": "acl"})
    torch.save(results, out / f"rank{rank}.pt")


def test_sync_dual_bn_on_cpu_and_rank_helpers(tmp_path):
    _launch(_sync_bn_and_helpers, tmp_path)
    x = _bn_inputs()
    model = _dual_bn_model()
    _bn_loss(model, x[0], x[1], gather=False).backward()
    model.eval()
    with bn_branch(model, "adv"):
        evaluated = model(x[0])
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        # The .normal / .adv BN of the dual layer and the plain BN1d are all converted.
        assert got["kinds"] == ["DualBatchNorm2d", "CPUSyncBatchNorm", "CPUSyncBatchNorm",
                                "CPUSyncBatchNorm"]
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], parameter.grad, **F64)
        # Global-batch running statistics in both branches.
        for name, buffer in model.named_buffers():
            torch.testing.assert_close(got["buffers"][name], buffer, **F64)
        torch.testing.assert_close(got["eval"], evaluated[_rows(r, WORLD, N)], **F64)
        assert got["any"] == (True, False)
        assert got["mean"] == {"a": 0.5, "b": 2.0}
        assert got["objects"] == [0, 10]
        assert got["main"] == "decided by rank 0"


# ---- the trainer: one step, DDP-averaged parameter gradients -------------------------------------

STEP = dict(max_train=32, batch_size=16, attack_steps=1, evaluate=False, seed=5)


def _fixed_attack(model, x1, x2, **kwargs):
    """A deterministic stand-in for PGD: the real attack uses each rank's local negatives and
    its own random start, so its views cannot match a single process (see the README)."""
    return (x1 + 0.05).clamp(0, 1), (x2 - 0.05).clamp(0, 1)


def _step_gradients(method, sync_bn, rank=0, world=1, fixed_attack=False):
    """The parameter gradients of one `train_step`, built as the trainer builds them."""
    from fastacl.data import DeviceDataset, load_dataset
    from fastacl.models import build_model
    from fastacl.optim import LARS

    cfg = TrainConfig.from_options(method=method, sync_bn=sync_bn, **STEP).resolve()
    images, _ = load_dataset(cfg.data.dataset, split="train")
    dataset = DeviceDataset(images[: cfg.data.max_train])
    torch.manual_seed(cfg.seed)
    # float64 weights and images: a freshly initialised ResNet's fp32 gradient is itself only
    # good to ~5e-3 (BN backward cancels), far coarser than 1 vs 2 processes differ; the loss
    # still runs in fp32 on the .float() embeddings, as train_step does.
    model = build_model(cfg.model.name, in_channels=1, dual_bn=cfg.is_adversarial).double()
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    loss_fn = ACLLoss(lambda1=cfg.loss.lambda1, lambda2=cfg.loss.lambda2,
                      gather_distributed=cfg.distributed.gather_negatives)
    if world > 1:
        if sync_bn:
            model = distributed.convert_sync_batchnorm(model, "cpu")
        model = distributed.wrap_ddp(model, "cpu")
    index = next(dataset.batches(cfg.optim.batch_size, torch.Generator().manual_seed(0)))
    x1, x2, x_orig = pretrain.rank_views(dataset, index, 1.0, torch.Generator().manual_seed(0),
                                         cfg.data.interpolation, rank, world)
    x1, x2, x_orig = x1.double(), x2.double(), x_orig.double()
    if fixed_attack:
        pretrain_step.pgd_contrastive = _fixed_attack  # the step's own binding of the attack
    attack_generator = torch.Generator().manual_seed(1)
    terms = pretrain.train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg, attack_generator)
    grads = {name: p.grad.clone() for name, p in unwrap(model).named_parameters()}
    return grads, {name: float(value) for name, value in terms.items()}


STEP_CASES = [("cl", True, False), ("acl-air", True, True), ("cl", False, False)]


def _step_worker(rank, world, out):
    _init_group()
    for method, sync_bn, fixed_attack in STEP_CASES:
        grads, terms = _step_gradients(method, sync_bn, rank, world, fixed_attack)
        torch.save((grads, terms), out / f"{method}-{sync_bn}-rank{rank}.pt")


def _relative_error_of_all(got, expected):
    names = sorted(expected)
    return relative_error(torch.cat([got[k].flatten() for k in names]),
                          torch.cat([expected[k].flatten() for k in names]))


@pytest.mark.slow
def test_ddp_step_gradients_equal_the_single_process_step(tmp_path):
    """With gathered losses and sync BN, DDP's averaged gradient is the single-process one: for
    "cl", and for "acl-air" given the same adversarial views (the attack is the only thing that
    differs). Without sync BN each rank normalises with its own half batch: they differ."""
    _launch(_step_worker, tmp_path)
    real_attack = pretrain_step.pgd_contrastive
    try:
        for method, sync_bn, fixed_attack in STEP_CASES:
            expected, expected_terms = _step_gradients(method, sync_bn, fixed_attack=fixed_attack)
            for r in range(WORLD):
                grads, terms = torch.load(tmp_path / f"{method}-{sync_bn}-rank{r}.pt")
                error = _relative_error_of_all(grads, expected)
                if sync_bn:
                    assert error <= STEP_RELATIVE, (method, r, error)
                    for name, value in expected_terms.items():
                        assert terms[name] == pytest.approx(value, rel=FP32_RELATIVE)
                else:
                    assert error > 1e-3, (method, r, error)
    finally:
        pretrain_step.pgd_contrastive = real_attack


# ---- the trainer: whole runs, resume, errors -----------------------------------------------------

RUN = dict(max_train=40, batch_size=16, attack_steps=1, evaluate=False, seed=7, epochs=2)
# fp32 runs: a freshly initialised ResNet's fp32 gradient is itself only good to ~5e-3 against
# float64 (BN backward cancels), and the BN biases start at 0, so after 4 LARS steps 1 and 2
# processes agree only to that noise (measured 2e-3 overall). float64 runs agree to ~1e-12.
RUN_FP32_RELATIVE = 1e-2
RUN_FP64_RELATIVE = 1e-9


@contextlib.contextmanager
def _float64_training():
    """train() with float64 weights (the default dtype) and views; the losses stay fp32."""
    real_views = pretrain_loop.rank_views
    default = torch.get_default_dtype()
    pretrain_loop.rank_views = lambda *args: tuple(x.double() for x in real_views(*args))
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)
        pretrain_loop.rank_views = real_views


def _train_runs(rank, world, runs):
    """Each run: (out_dir, overrides, stop_at or None, resume, float64), one fresh port each."""
    for out_dir, overrides, stop_at, resume, float64 in runs:
        os.environ["MASTER_PORT"] = str(overrides.pop("port"))

        def on_step(epoch, step, terms, stop_at=stop_at):
            return (epoch, step) == stop_at

        with _float64_training() if float64 else contextlib.nullcontext():
            if resume:
                pretrain.train(resume=out_dir, on_step=on_step)
            else:
                pretrain.train(out_dir=out_dir, on_step=on_step, **overrides)


def _ports(n):
    ports = set()
    while len(ports) < n:
        ports.add(_free_port())
    return list(ports)


def _parameters(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["state_dict"]


def _state_error(got, expected):
    """Relative error over every floating tensor (parameters and BN running statistics); the
    integer ones (num_batches_tracked) must be equal."""
    assert sorted(got) == sorted(expected)
    for name in expected:
        if not expected[name].is_floating_point():
            assert torch.equal(got[name], expected[name]), name
    floats = [k for k in expected if expected[k].is_floating_point()]
    return _relative_error_of_all({k: got[k] for k in floats}, {k: expected[k] for k in floats})


@pytest.mark.slow
def test_two_process_run_equals_one_process_run_with_sync_bn(tmp_path):
    """method "cl", sync BN: 2 processes x 8 images and 1 process x 16 images, the same seed,
    4 LARS steps over 2 epochs end with the same parameters and BN statistics: to 1e-9 with
    float64 weights (that 2-process run is also interrupted after its first step and resumed),
    to the fp32 noise (1e-2) in the real fp32 configuration."""
    common = dict(method="cl", sync_bn=True, **RUN)
    port_a, port_b, port_c = _ports(3)
    _launch(_train_runs, [
        (str(tmp_path / "ddp32"), dict(common, port=port_a), None, False, False),
        (str(tmp_path / "ddp64"), dict(common, port=port_b), (1, 0), False, True),
        (str(tmp_path / "ddp64"), dict(port=port_c), None, True, True),
    ])
    single32 = pretrain.train(out_dir=str(tmp_path / "single32"), **common)
    with _float64_training():
        single64 = pretrain.train(out_dir=str(tmp_path / "single64"), **common)

    error64 = _state_error(_parameters(tmp_path / "ddp64"), _parameters(single64.out_dir))
    assert error64 <= RUN_FP64_RELATIVE, error64
    error32 = _state_error(_parameters(tmp_path / "ddp32"), _parameters(single32.out_dir))
    assert error32 <= RUN_FP32_RELATIVE, error32
    # The logged losses (fp32 NT-Xent of the gathered batch, the same on every rank).
    for ddp, single, tolerance in [("ddp64", single64, 1e-6), ("ddp32", single32, 1e-3)]:
        metrics = [json.loads(line) for line in (tmp_path / ddp / "metrics.jsonl").open()]
        expected = [json.loads(line) for line in (single.out_dir / "metrics.jsonl").open()]
        assert [m["epoch"] for m in metrics] == [1, 2]
        for m, e in zip(metrics, expected, strict=True):
            assert m["total"] == pytest.approx(e["total"], rel=tolerance), ddp
    assert json.loads((tmp_path / "ddp32" / "config.json").read_text())["world_size"] == WORLD


@pytest.mark.slow
def test_acl_under_ddp_resumes_exactly(tmp_path):
    """ACL with per-rank BN and per-rank PGD streams: interrupted and resumed under 2 processes,
    the same parameters as the uninterrupted 2-process run (every rank's PGD stream and BN
    statistics are saved; rank 1's attack runs on its own BN statistics)."""
    common = dict(method="acl", **RUN)
    port_a, port_b, port_c = _ports(3)
    _launch(_train_runs, [
        (str(tmp_path / "full"), dict(common, port=port_a), None, False, False),
        (str(tmp_path / "resumed"), dict(common, port=port_b), (1, 0), False, False),
        (str(tmp_path / "resumed"), dict(port=port_c), None, True, False),
    ])
    full, resumed = _parameters(tmp_path / "full"), _parameters(tmp_path / "resumed")
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def _bad_launches(rank, world, out, ports):
    for port, overrides, message in [
        (ports[0], dict(batch_size=15), "batch_size 15 is the global batch.*e.g. 14"),
        (ports[1], dict(batch_size=16, seed=rank), "seed is 0 on rank 0 but 1 on rank 1"),
    ]:
        os.environ["MASTER_PORT"] = str(port)
        with pytest.raises(ValueError, match=message):
            pretrain.train(out_dir=str(out / "run"), max_train=32, evaluate=False, **overrides)
        assert not dist.is_initialized()  # train() destroyed the group it created


def test_bad_world_size_and_disagreeing_ranks_are_clear_errors(tmp_path):
    _launch(_bad_launches, tmp_path, _ports(2))
    assert not (tmp_path / "run").exists()


# ---- the command line under torchrun ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_cli_writes_one_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "fastacl", "train",
               "--epochs", "1", "--max-train", "64", "--batch-size", "16", "--attack-steps", "1",
               "--no-evaluate", "--out-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.json", "curves.png", "metrics.jsonl", "summary.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    state = load_checkpoint(out / "checkpoint.pt")["extra"]["train_state"]
    assert (state["epoch"], state["step"]) == (2, 0)
    # Every rank's PGD stream and BN statistics (per-rank BN without --sync-bn), for --resume.
    assert [sorted(r) for r in state["ranks"]] == [["attack", "buffers"]] * 2
    # One rank logs: the config is printed once.
    assert completed.stdout.count("fastacl: config") == 1, completed.stdout


# ---- RCS under DDP: rank 0 selects, every rank receives the same subset ------------------------
def _coreset_selection():
    """One RCS round exactly as the trainer runs it (fastacl.pretrain.loop._select behind
    distributed.on_main_process), on a tiny model and 64 demo images."""
    import types

    from fastacl.coreset import validation_split
    from fastacl.data import DeviceDataset, load_dataset
    from fastacl.models import build_model

    cfg = TrainConfig.from_options(method="acl", coreset="rcs", coreset_fraction=0.25, epochs=2,
                                   batch_size=8, attack_steps=1).resolve()
    torch.manual_seed(0)
    model = build_model("resnet18-small", in_channels=1, width=4, head_dim=16)
    images, _ = load_dataset("mnist5k", split="train")
    pool, validation = validation_split(64, seed=0)
    # The parts of the trainer's run state that a selection reads.
    run = types.SimpleNamespace(cfg=cfg, model=model, dataset=DeviceDataset(images[:64]),
                                pool=pool, validation=validation, epoch=2, pair=None)
    strength = pretrain.augmentation_strength(cfg, run.epoch)
    selection = distributed.on_main_process(lambda: pretrain_loop._select(run, strength))
    return selection["indices"]


def _rank_selection(rank, world, out):
    _init_group()
    torch.save(_coreset_selection(), out / f"rank{rank}.pt")


def test_two_process_rcs_selection_equals_the_one_process_selection(tmp_path):
    _launch(_rank_selection, tmp_path)
    single = _coreset_selection()
    # the pool: 64 images less the 8 of U; the released budget floored to whole minibatches of 8
    assert single.numel() == round(0.25 * 56) // 8 * 8
    for rank in range(WORLD):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), single), rank
