"""The pre-training run: set up, then epochs of steps, a checkpoint after each, then the summary.

    result = fastacl.train(method="acl-air", dataset="cifar10", data_dir="~/data", epochs=100)

The step itself is fastacl.pretrain.step; what changes with the epoch is
fastacl.pretrain.schedule; files, seeds and resume are fastacl.pretrain.state.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fastacl
from fastacl import coreset, distributed
from fastacl.config import USER_MODEL, TrainConfig
from fastacl.data import (
    DeviceDataset,
    apply_augment,
    load_dataset,
    sample_augment_params,
)
from fastacl.errors import ConfigError
from fastacl.evaluation import quick_check
from fastacl.losses import ACLLoss
from fastacl.models import ContrastiveModel, build_model, contrastive_model, model_arguments
from fastacl.models.dual_bn import DualLayerNorm
from fastacl.ops import use_backend
from fastacl.optim import build_optimizer
from fastacl.pretrain import schedule, state
from fastacl.pretrain.momentum import MomentumPair
from fastacl.pretrain.plot import plot_curves
from fastacl.pretrain.speed import deterministic_mode
from fastacl.pretrain.step import loss_for, train_step
from fastacl.utils import atomic_write_text, progress, unwrap

# Steps between two displays of the loss on the progress bar (each reads a value back from the
# device).
_DISPLAY_EVERY = 20


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    config: TrainConfig
    summary: dict = field(default_factory=dict)


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None,
          on_step: Callable[[int, int, dict], bool] | None = None, **options) -> TrainResult:
    """Pre-train an encoder. `fastacl.train(method="acl-air", dataset="cifar10", epochs=100)`.

    config: a TrainConfig (None: the defaults); options: TrainConfig options by their flat names
    (`eps`, `attack_steps`, `coreset_fraction`, ...; see fastacl.config), applied on top.
    resume: a run dir; continues from its checkpoint with its saved config.
    model: a registered name ("resnet18", "wrn-28-10", "vit-tiny", ...) or the user's own
    nn.Module: an encoder mapping images in [0, 1] to features (fastacl makes its norms dual and
    adds the projection head: fastacl.models.contrastive_model), or a model that
    contrastive_model already returned. Pass the module again to resume its run.
    on_step(epoch, step, terms): called after every step; returning True stops the run as Ctrl-C
    does (a checkpoint is written, the run can be resumed). Used by tests and tools.
    """
    checkpoint = run_dir = None
    user_module = options.pop("model") if isinstance(options.get("model"), nn.Module) else None
    if user_module is not None:
        options["model"] = USER_MODEL
    if resume is not None:
        cfg, checkpoint, run_dir = state.load_resume(resume, options)
    else:
        cfg = (config or TrainConfig()).with_options(**options).resolve()
    # Under torchrun: one process per device, DDP (fastacl.distributed).
    owns_group = distributed.init_from_env(cfg.device)
    try:
        distributed.check_same_on_all_ranks(
            {**cfg.to_dict(), "resume": None if resume is None else str(resume),
             "fastacl_version": fastacl.__version__}
        )
        _check_world_size(cfg, distributed.world_size())
        # Rank 0 alone decides a new run's directory (and whether it is taken).
        out = (run_dir if resume is not None
               else distributed.on_main_process(lambda: state.prepare_out_dir(cfg)))
        with deterministic_mode(cfg.speed.deterministic):
            return _run(cfg, out, checkpoint, on_step, user_module)
    finally:
        if owns_group:
            distributed.destroy()


def _check_world_size(cfg: TrainConfig, world_size: int) -> None:
    batch_size = cfg.optim.batch_size
    local = batch_size // world_size
    if batch_size % world_size or local < 2:
        fit = max(2, local) * world_size
        raise ConfigError(
            f"batch_size {batch_size} is the global batch, split over {world_size} ranks: it "
            f"must be a multiple of the world size giving each rank >= 2 images (NT-Xent and BN "
            f"need a batch), e.g. {fit}"
        )
    if world_size > 1 and cfg.model.momentum_encoder:
        raise ConfigError(
            "the momentum encoder (released DynACL) runs in one process for now: under torchrun "
            "pass --no-momentum-encoder (or --fidelity corrected)")


@dataclass
class _Run:
    """What the epochs of a run share, and where the run stands."""

    cfg: TrainConfig
    out: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: ACLLoss
    dataset: DeviceDataset
    pool: torch.Tensor  # the training images' indices, less the validation set U
    validation: torch.Tensor
    steps_per_epoch: int  # of a full-pool epoch; the LR schedule counts these
    data_generator: torch.Generator
    attack_generator: torch.Generator
    epoch: int = 1
    step: int = 0  # the next step of `epoch` (non-zero after resuming mid-epoch)
    sums: dict = field(default_factory=dict)  # the epoch's running sums of the loss terms
    seconds: float = 0.0  # the epoch's training seconds before this process resumed it
    subset: torch.Tensor | None = None  # the current coreset (None: the whole pool)
    selection: dict = field(default_factory=dict)  # the record of this epoch's selection

    @property
    def main(self) -> bool:
        return distributed.is_main_process()

    @property
    def pair(self) -> MomentumPair | None:
        """DynACL's momentum pair (q, k), if the run has one."""
        model = unwrap(self.model)
        return model if isinstance(model, MomentumPair) else None

    @property
    def kept(self) -> nn.Module:
        """The encoder the run keeps: the momentum encoder k of a momentum pair."""
        return self.pair.momentum if self.pair is not None else unwrap(self.model)

    def save(self) -> Path:
        """Write the checkpoint at the current position (collective under DDP). Its model is the
        kept encoder; a momentum pair's online encoder q travels in the train state."""
        ranks = (state.gather_rank_state(self.model, self.attack_generator, self.cfg)
                 if distributed.world_size() > 1 else None)
        if not self.main:
            return self.out / state.CHECKPOINT_NAME
        online = None if self.pair is None else self.pair.online.state_dict()
        return state.write_checkpoint(self.out, self.kept, self.cfg, {
            "online_state_dict": online,
            "optimizer": self.optimizer.state_dict(),
            "rng": state.rng_state(self.data_generator, self.attack_generator),
            "epoch": self.epoch, "step": self.step, "sums": _host(self.sums),
            "epoch_seconds": self.seconds,
            "coreset_indices": self.subset, "coreset_selection": self.selection, "ranks": ranks,
        })


def _run(cfg: TrainConfig, out: Path, checkpoint: dict | None, on_step,
         user_module: nn.Module | None) -> TrainResult:
    run = _setup(cfg, out, checkpoint, user_module)
    stop = state.StopRequest(verbose=run.main)
    previous_handler = signal.signal(signal.SIGINT, stop)
    checkpoint_path = out / state.CHECKPOINT_NAME
    try:
        while run.epoch <= cfg.optim.epochs:
            if not _train_epoch(run, stop, on_step):
                path = run.save()
                if run.main:
                    print(f"fastacl: interrupted; checkpoint {path}; continue with "
                          f"`fastacl train --resume {out}`")
                return TrainResult(out, path, cfg, {"interrupted": True})
            run.epoch, run.step, run.sums, run.selection = run.epoch + 1, 0, {}, {}
            run.seconds = 0.0
            checkpoint_path = run.save()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if not run.main:
        return TrainResult(out, checkpoint_path, cfg, {})
    summary = _finish(cfg, out, run.kept, checkpoint_path)
    return TrainResult(out, checkpoint_path, cfg, summary)


def _setup(cfg: TrainConfig, out: Path, checkpoint: dict | None,
           user_module: nn.Module | None) -> _Run:
    """Data, model, optimiser and random streams of a new or resumed run; a new run's
    config.json (written only after the data loaded, so a bad data dir leaves nothing)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    device = distributed.rank_device(cfg.device)
    images, _ = load_dataset(cfg.data.dataset, cfg.data.data_dir, split="train")
    if cfg.eval.enabled:  # the closing check reads the test split: a bad one fails now
        load_dataset(cfg.data.dataset, cfg.data.data_dir, split="test")
    if cfg.data.max_train is not None:
        images = images[: cfg.data.max_train]
    # The pool: the training images less the RCS validation set U, held out in every run
    # (docs/rcs.md section 3) so that full, RCS and random runs train on the same pool.
    pool, validation = coreset.validation_split(
        images.shape[0], cfg.coreset.validation, seed=state.stream_seed(cfg.seed, "validation"))
    steps_per_epoch = _check_pool(cfg, pool.numel())
    # uint8 images resident on the device (pinned host memory if they do not fit); the views
    # are augmented there in one batched call.
    dataset = DeviceDataset(images, device=device)

    torch.manual_seed(state.stream_seed(cfg.seed, "init"))
    data_generator = torch.Generator().manual_seed(state.stream_seed(cfg.seed, "augment"))
    attack_seed = state.stream_seed(cfg.seed, "attack", rank=rank)
    attack_generator = torch.Generator(device).manual_seed(attack_seed)
    model = _model(cfg, images.shape[1:], user_module).to(device)
    if cfg.model.momentum_encoder:  # the released DynACL (fastacl.pretrain.momentum)
        model = MomentumPair(model, cfg.model.momentum)
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    # A momentum pair's k has no gradient: the optimiser holds q's parameters only.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, o.optimizer, lr=o.lr, weight_decay=o.weight_decay,
                                momentum=o.momentum, eta=o.lars_eta)
    run = _Run(cfg, out, model, optimizer, loss_for(cfg), dataset, pool, validation,
               steps_per_epoch, data_generator, attack_generator)
    if checkpoint is not None:
        _restore(run, checkpoint)
    elif run.main:
        state.write_config(out, cfg, steps_per_epoch=steps_per_epoch,
                           train_images=pool.numel(), validation_images=validation.numel(),
                           world_size=world_size)
    if run.main:
        print("fastacl: config\n" + json.dumps(cfg.to_dict(), indent=2))
        if o.optimizer == "lars" and _has_layer_norm(model):
            print("fastacl: warning: LARS collapses transformers (their zero-initialised biases "
                  "get plain lr x gradient steps); use --optimizer adamw (docs/backbones.md)",
                  file=sys.stderr)
    if world_size > 1:
        if cfg.distributed.sync_bn:  # shares the parameters: the optimiser stays valid
            run.model = distributed.convert_sync_batchnorm(run.model, device)
        # Each rank keeps its own BN running statistics (rank 0's are saved), unless sync_bn.
        run.model = distributed.wrap_ddp(run.model, device)
        if checkpoint is not None:
            state.restore_rank_state(checkpoint["extra"]["train_state"].get("ranks"),
                                     run.model, attack_generator, attack_seed)
    return run


def _model(cfg: TrainConfig, image_shape: torch.Size, user_module: nn.Module | None) -> nn.Module:
    """The run's model: a registered one sized for the images, or the user's module."""
    if cfg.model.name == USER_MODEL:
        if user_module is None:
            raise ConfigError("model='user' is the nn.Module passed as fastacl.train(model=module)"
                              "; pass it (again, to resume its run)")
        if isinstance(user_module, ContrastiveModel):
            return user_module
        return contrastive_model(user_module, dual_bn=cfg.is_adversarial)
    channels, size = image_shape[0], image_shape[-1]
    arguments = model_arguments(cfg.model.name)
    kwargs = {"in_channels": channels, "dual_bn": cfg.is_adversarial}
    if "stem" in arguments:  # the ImageNet / STL stem (7x7 stride 2 + max-pool) for 96 px up
        kwargs["stem"] = "stl" if size >= 96 else "cifar"
    if "image_size" in arguments:  # a ViT's patch grid
        kwargs["image_size"] = size
    return build_model(cfg.model.name, **kwargs)


def _check_pool(cfg: TrainConfig, n_images: int) -> int:
    """Steps of a full-pool epoch (drop_last: NT-Xent wants full batches)."""
    batch_size = cfg.optim.batch_size
    if n_images // batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} exceeds the {n_images} training images")
    budget = coreset.coreset_budget(cfg.coreset.fraction, n_images)
    if cfg.coreset.method is not None and budget < batch_size:
        raise ConfigError(
            f"the coreset (coreset_fraction {cfg.coreset.fraction} of {n_images} images = "
            f"{budget}) is smaller than batch_size {batch_size}: no training step would be left"
        )
    return n_images // batch_size


def _restore(run: _Run, checkpoint: dict) -> None:
    saved = checkpoint["extra"]["train_state"]
    run.kept.load_state_dict(checkpoint["state_dict"])  # strict
    if run.pair is not None:
        run.pair.online.load_state_dict(saved["online_state_dict"])
    run.optimizer.load_state_dict(saved["optimizer"])
    state.set_rng_state(saved["rng"], run.data_generator, run.attack_generator)
    run.epoch, run.step, run.sums = saved["epoch"], saved["step"], saved["sums"]
    run.seconds = saved.get("epoch_seconds", 0.0)
    run.subset, run.selection = saved.get("coreset_indices"), saved.get("coreset_selection", {})
    if run.main:
        # A crash can leave a half-written file and, between an epoch's metrics line and its
        # checkpoint, a line the resumed run will write again.
        state.remove_temporary_files(run.out)
        state.keep_metrics_before(run.out, run.epoch)
        print(f"fastacl: resuming {run.out} at epoch {run.epoch}, step {run.step}")


def _train_epoch(run: _Run, stop: state.StopRequest, on_step) -> bool:
    """The steps of `run.epoch` from `run.step` on, then its metrics line. False: stopped early
    (Ctrl-C or on_step), with `run` at the step to resume from."""
    cfg, epoch = run.cfg, run.epoch
    strength = schedule.augmentation_strength(cfg, epoch)
    run.loss_fn.weight_w = schedule.dynacl_weight(cfg, strength, epoch)
    # The epoch's shuffle depends only on (seed, epoch): a resumed run finds its place.
    shuffle = torch.Generator().manual_seed(state.stream_seed(cfg.seed, "shuffle", epoch))
    if run.step == 0 and schedule.is_selection_epoch(cfg, epoch):  # rank 0 selects for all
        run.selection = distributed.on_main_process(lambda: _select(run, strength))
        run.subset = run.selection.pop("indices")
    epoch_pool = run.pool if run.subset is None else run.subset
    epoch_steps = epoch_pool.numel() // cfg.optim.batch_size
    # Full batches only, except for a coreset smaller than one batch (a budget floored to one
    # minibatch that was the pool's short last one): that epoch is one smaller batch.
    drop_last = epoch_steps > 0
    epoch_steps = max(epoch_steps, 1)
    batches = itertools.islice(
        run.dataset.batches(cfg.optim.batch_size, shuffle, drop_last=drop_last,
                            indices=epoch_pool), run.step, None)
    bar = progress(epoch_steps, f"epoch {epoch}/{cfg.optim.epochs}", enabled=run.main,
                   initial=run.step)
    run.model.train()
    epoch_start = time.perf_counter()
    for step, index in enumerate(batches, start=run.step):
        # The schedule counts epochs: a coreset epoch's steps sweep a whole epoch of it.
        iteration = (epoch - 1) * run.steps_per_epoch + step * run.steps_per_epoch / epoch_steps
        lr = schedule.learning_rate(cfg, iteration, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x1, x2, x_orig = rank_views(run.dataset, index, strength, run.data_generator,
                                    cfg.data.interpolation, distributed.rank(),
                                    distributed.world_size())
        if cfg.speed.channels_last:
            x1, x2, x_orig = (t.contiguous(memory_format=torch.channels_last)
                              for t in (x1, x2, x_orig))
        terms = train_step(run.model, run.loss_fn, run.optimizer, x_orig, x1, x2, cfg,
                           run.attack_generator)
        # The loss terms stay on the device (float64 sums, as exact as Python floats): reading
        # one back is a device synchronisation, done once per display interval, not per step.
        for name, value in terms.items():
            run.sums[name] = run.sums.get(name, 0.0) + value.double()
        run.sums["steps"] = run.sums.get("steps", 0) + 1
        run.step = step + 1
        if run.step % _DISPLAY_EVERY == 0 or run.step == epoch_steps:
            bar.set_postfix(loss=f"{float(terms['total']):.4f}", lr=f"{lr:.3g}")
        bar.update(1)
        if on_step is not None and on_step(epoch, step, terms):
            stop()
        if distributed.world_size() > 1:  # every rank stops after the same step
            stop.requested = distributed.any_rank(stop.requested)
        if stop.requested:
            bar.close()
            run.seconds += time.perf_counter() - epoch_start
            return False
    bar.close()
    _log_epoch(run, strength, epoch_pool.numel(), epoch_steps,
               run.seconds + time.perf_counter() - epoch_start)
    return True


def _log_epoch(run: _Run, strength: float, train_images: int, steps: int,
               seconds: float) -> None:
    """The epoch's line of metrics.jsonl (mean of every loss term, lr, s, w, images/s).
    `seconds` include the epoch's time before an interruption."""
    cfg = run.cfg
    sums = distributed.mean_over_ranks(_host(run.sums))  # the same on every rank when gathered
    last_lr = schedule.learning_rate(cfg, run.epoch * run.steps_per_epoch - 1,
                                     run.steps_per_epoch)
    record = {"epoch": run.epoch, "lr": last_lr, "strength": strength,
              "w": run.loss_fn.weight_w,
              **{name: value / sums["steps"] for name, value in sums.items() if name != "steps"},
              "images_per_second": steps * cfg.optim.batch_size / max(seconds, 1e-9),
              "epoch_seconds": seconds, "train_images": train_images, **run.selection}
    if run.main:
        state.append_metrics(run.out, record)
        print("fastacl: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items()), flush=True)


def _host(sums: dict) -> dict:
    """The running sums as Python numbers (one read-back from the device)."""
    return {name: float(value) if isinstance(value, torch.Tensor) else value
            for name, value in sums.items()}


def _select(run: _Run, strength: float) -> dict:
    """The coreset for the epochs from `run.epoch` on: {"indices", "coreset_size",
    "selection_seconds"}. Seeded by (seed, epoch) only, so a resumed run selects the same."""
    cfg, c = run.cfg, run.cfg.coreset
    start = time.perf_counter()
    if c.method == "random":
        generator = torch.Generator().manual_seed(state.stream_seed(cfg.seed, "random-coreset"))
        indices = coreset.random_coreset(run.pool, c.fraction, generator)
    else:
        seed = state.stream_seed(cfg.seed, "selection", run.epoch)
        # Deterministic mode: the PyTorch reference instead of the CUDA kernels' atomics.
        backend = use_backend("torch") if cfg.speed.deterministic else contextlib.nullcontext()
        with backend:
            # A momentum pair selects with its online encoder q (the one being trained).
            model = run.pair.online if run.pair is not None else unwrap(run.model)
            indices = coreset.select_coreset(
                model, run.dataset, run.pool, run.validation, c.fraction,
                batch_size=cfg.optim.batch_size, eps=cfg.attack.eps,
                step_size=cfg.attack.step_size, attack_steps=c.attack_steps,
                temperature=cfg.loss.temperature, granularity=c.granularity,
                refresh=c.refresh, refresh_every=c.refresh_every, divergence=c.divergence,
                simulated_lr=c.simulated_lr, simulated_steps=c.simulated_steps,
                budget_rounding=c.budget_rounding,
                validation_handling=c.validation_handling,
                clip_random_start=cfg.attack.clip_random_start, strength=strength,
                interpolation=cfg.data.interpolation,
                generator=torch.Generator().manual_seed(seed),
                attack_generator=torch.Generator(run.dataset.device).manual_seed(seed),
                autocast_dtype=torch.bfloat16 if c.precision == "bf16" else None,
                fold_bn=cfg.speed.fold_bn, rd_steps=c.rd_steps, chunk_batches=c.chunk_batches,
            ).indices
    return {"indices": indices.cpu(), "coreset_size": int(indices.numel()),
            "selection_seconds": time.perf_counter() - start}


def rank_views(dataset: DeviceDataset, index: torch.Tensor, strength: float,
               generator: torch.Generator, interpolation: str, rank: int, world_size: int):
    """(view 1, view 2, originals) of this rank's images of the global batch `index`.

    Under DDP every rank draws the augmentation of the whole global batch from the same
    generator (the same 2B draws as DeviceDataset.views: view 1 of every image, then view 2) and
    applies only the rows of its contiguous block: the views are exactly the single-process
    ones, and the generator stays the same on every rank (rank 0's checkpoint resumes them all).
    """
    if world_size == 1:
        return dataset.views(index, strength, generator, interpolation)
    batch, local = index.shape[0], index.shape[0] // world_size
    rows = torch.arange(rank * local, (rank + 1) * local)
    params = sample_augment_params(2 * batch, dataset.image_shape[1:], strength, generator)
    images = dataset.fetch(index[rank * local : (rank + 1) * local])
    views = apply_augment(torch.cat([images, images]),
                          params.select(torch.cat([rows, batch + rows])),
                          interpolation=interpolation)
    view_1, view_2 = views.chunk(2)
    return view_1, view_2, images.to(torch.float32) / 255.0


def _finish(cfg: TrainConfig, out: Path, model: nn.Module, checkpoint_path: Path) -> dict:
    """The end of a run: the quick evaluation, summary.json, curves.png."""
    records = state.read_metrics(out)
    # Selection rounds are part of the training time.
    train_seconds = sum(r["epoch_seconds"] + r.get("selection_seconds", 0.0) for r in records)
    summary = {
        "method": cfg.method, "dataset": cfg.data.dataset, "epochs": cfg.optim.epochs,
        "final_loss": records[-1]["total"],
        "images_per_second": (sum(r["images_per_second"] * r["epoch_seconds"] for r in records)
                              / max(train_seconds, 1e-9)),
        "train_seconds": train_seconds, "checkpoint": str(checkpoint_path),
    }
    if cfg.coreset.method is not None:
        summary["selection_seconds"] = sum(r.get("selection_seconds", 0.0) for r in records)
    if cfg.eval.enabled:
        summary.update(quick_check(
            model, dataset=cfg.data.dataset, data_dir=cfg.data.data_dir,
            branch=cfg.encoder_branch, epochs=cfg.eval.epochs, max_test=cfg.eval.max_test,
            eps=cfg.eval.eps, seed=cfg.seed))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_curves(records, out / "curves.png")
    if "standard_accuracy" in summary:
        print(f"fastacl: {cfg.method} on {cfg.data.dataset}: standard accuracy "
              f"{100 * summary['standard_accuracy']:.2f}%, robust accuracy "
              f"{100 * summary['robust_accuracy']:.2f}% ({summary['attack']})")
    print(f"fastacl: run written to {out}")
    return summary


def _has_layer_norm(model: nn.Module) -> bool:
    """A transformer-like model (LayerNorm, plain or dual): LARS collapses it."""
    return any(isinstance(m, (nn.LayerNorm, DualLayerNorm)) for m in model.modules())
