"""The pre-training config: one nested dataclass, its presets, and one `validate()`.

    cfg = TrainConfig.from_options(method="acl-air", dataset="cifar10", eps=8 / 255)
    cfg.attack.eps, cfg.coreset.fraction, cfg.speed.precision

Settings are grouped by concern (data, model, attack, loss, optim, speed, coreset, eval,
distributed). Every field carries its help text in its metadata, and each has one flat *option
name* (`eps`, `attack_steps`, `coreset_fraction`, `evaluate`, ...): the keyword of
`fastacl.train(...)` and, with dashes, the `fastacl train` flag (the CLI is generated from these
fields, so each default and help text is written once, here).

None means "from the preset or the method" and is filled in by `resolve()`, which then runs
`validate()`: every field is checked before the trainer creates or writes anything.
Algorithm constants are explained in docs/acl-air.md and docs/rcs.md (sections cited below).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from fastacl.data.augmentation import dynaug_period
from fastacl.errors import ConfigError
from fastacl.utils import check_choice, check_device

METHODS = ("cl", "acl", "acl-air", "dynacl", "dynacl-air")
PRESETS = ("demo", "paper", "rcs-imagenet32")
FIDELITIES = ("released", "corrected")
PRECISIONS = ("fp32", "bf16")
CORESETS = (None, "rcs", "random")
# Must match fastacl.data.DATASETS / INTERPOLATIONS and fastacl.models.MODEL_PRESETS (tested).
DATASETS = ("cifar10", "cifar100", "stl10", "imagenet32", "imagefolder", "mnist5k")
INTERPOLATIONS = ("bicubic", "bilinear")
MODELS = ("resnet18", "resnet18-small", "resnet34", "resnet50", "wrn-28-10", "wrn-28-10-rcs",
          "wrn-34-10", "vit-tiny", "vit-small")
# model="user": the nn.Module passed as fastacl.train(model=module).
USER_MODEL = "user"
# RCS choices (fastacl.coreset; docs/rcs.md sections 2-3 and 7).
GRANULARITIES = ("batch", "sample")
REFRESHES = ("exact", "cached")
DIVERGENCES = ("minmax-kl", "softmax-kl")
BUDGET_ROUNDINGS = ("truncate", "floor")
VALIDATION_HANDLINGS = ("all", "released-half")
AIR_FORMS = ("exact", "reference-code")
W_TIMINGS = ("paper", "released")
LR_SCHEDULES = ("step", "epoch")
# LARS is the published optimiser; AdamW is what ViTs train with (docs/backbones.md, ViTs), with
# its usual base lr and weight decay as the defaults.
OPTIMIZERS = ("lars", "adamw")
ADAMW_LR, ADAMW_WEIGHT_DECAY, LARS_WEIGHT_DECAY = 1e-3, 0.05, 1e-6

# Preset values; an explicit value (anything not None) overrides them.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    # The published recipe (docs/acl-air.md sections 3 and 5).
    "paper": dict(
        dataset="cifar10", model="resnet18", epochs=1000, batch_size=512, lr=5.0,
        eps=8 / 255, step_size=2 / 255, attack_steps=5, eval_epochs=25, eval_max_test=None,
    ),
    # The embedded MNIST sample on a small ResNet-18, sized to finish with its evaluation within
    # 10 minutes on a 2-core CPU. eps 0.15 is an MNIST-sized budget (8/255 is meaningless there).
    "demo": dict(
        dataset="mnist5k", model="resnet18-small", epochs=5, batch_size=128, lr=5.0,
        eps=0.15, step_size=0.05, attack_steps=5, eval_epochs=20, eval_max_test=500,
    ),
    # RCS's ImageNet-1K recipe (docs/rcs.md section 4): WRN-28-10 on the 32 px downsampled set,
    # 200 epochs, RCS from epoch 21 every 10 epochs at k = 0.05, softmax-KL RD, a 1-step attack
    # on U, U = 0.5% of the training set, the greedy run in chunks of 100 minibatches.
    "rcs-imagenet32": dict(
        dataset="imagenet32", model="wrn-28-10", epochs=200, batch_size=512, lr=5.0,
        eps=8 / 255, step_size=2 / 255, attack_steps=5, eval_epochs=25, eval_max_test=None,
        coreset="rcs", coreset_fraction=0.05, coreset_warmup=20, coreset_interval=10,
        coreset_divergence="softmax-kl", coreset_rd_steps=1, coreset_validation=0.005,
        coreset_chunk_batches=100,
    ),
}

# What `--fidelity released` adds to a preset for a method whose released code differs from the
# AIR code's recipe. RCS's ImageNet-32 script (ACL_RCS/ImageNet_32/ACL_RCS.py, docs/fidelity.md):
# its network (no input normalisation, a two-layer head), NT-Xent at t = 0.1 in the attack, the
# loss and the selection, LARS lr 0.6, the mean of the two NT-Xent terms, no originals' forward.
RELEASED_PRESET_VALUES: dict[tuple[str, str], dict[str, Any]] = {
    ("rcs-imagenet32", "acl"): dict(model="wrn-28-10-rcs", temperature=0.1, lr=0.6,
                                    loss_scale=0.5, originals_pass=False),
}


# What each fidelity setting gives the options it governs (docs/fidelity.md lists every departure
# and its source). "released": what the authors' released code computes (the AIR code for ACL,
# ACL-AIR and DynACL-AIR; the DynACL code for DynACL; the RCS code for the selection), which is
# what produced the published numbers. "corrected": the algorithms as the papers define them, with
# the released code's defects fixed. An explicit option overrides either.
def fidelity_values(fidelity: str, method: str) -> dict[str, Any]:
    """The values `fidelity` gives the options it governs, for `method`."""
    check_choice("fidelity", fidelity, FIDELITIES)
    if fidelity == "corrected":
        return dict(air_form="exact", clip_random_start=True, interpolation="bicubic",
                    momentum_encoder=False, dynacl_w_timing="paper", loss_scale=1.0,
                    originals_pass=False,
                    lr_schedule="step", coreset_simulated_steps=1,
                    coreset_budget_rounding="truncate", coreset_validation_handling="all")
    dynacl_code = method == "dynacl"  # the DynACL repository's train_DynACL.py
    return dict(
        air_form="reference-code", clip_random_start=False,
        interpolation="bilinear" if dynacl_code else "bicubic",
        momentum_encoder=dynacl_code, dynacl_w_timing="released" if dynacl_code else "paper",
        loss_scale=0.5 if dynacl_code else 1.0, originals_pass=not dynacl_code,
        lr_schedule="epoch" if dynacl_code else "step",
        coreset_simulated_steps=2, coreset_budget_rounding="floor",
        coreset_validation_handling="released-half",
    )


# SIR / AIR weights per method (docs/acl-air.md section 5): 0.5 each for the AIR variants.
METHOD_LAMBDAS = {"cl": 0.0, "acl": 0.0, "dynacl": 0.0, "acl-air": 0.5, "dynacl-air": 0.5}


def option(default: Any, help: str, *, name: str | None = None) -> Any:
    """A config field with its help text and, if it is not the field's own, its option name."""
    return field(default=default, metadata={"help": help, "option": name})


@dataclass
class DataConfig:
    dataset: str | None = option(None, "mnist5k (embedded demo) | cifar10 | cifar100 | stl10 | "
                                       "imagefolder | imagenet32 (default mnist5k)")
    data_dir: str | None = option(None, "folder holding the dataset files (default "
                                        "$FASTACL_DATA_DIR or ~/data)")
    max_train: int | None = option(None, "use only the first N training images")
    interpolation: str | None = option(None, "bicubic | bilinear (RandomResizedCrop; default "
                                             "from --fidelity: bilinear for released DynACL)")
    dynaug_period: int | None = option(None, "DynAug period K in epochs (default E/20, at "
                                             "least 1)")


@dataclass
class ModelConfig:
    name: str | None = option(None, "resnet18 | resnet18-small | resnet34 | resnet50 | "
                                    "wrn-28-10 | wrn-28-10-rcs | wrn-34-10 | vit-tiny | vit-small "
                                    "(from Python also an nn.Module: fastacl.train(model=module))",
                              name="model")
    momentum_encoder: bool | None = option(
        None, "DynACL's momentum encoder: view 2 through a momentum copy k of the encoder, "
              "k kept (default from --fidelity: on for released DynACL)",
        name="momentum_encoder")
    momentum: float = option(0.99, "the momentum encoder's m: k <- m k + (1 - m) q",
                             name="momentum_encoder_m")


@dataclass
class AttackConfig:
    """The training attack: PGD on the contrastive loss (docs/acl-air.md section 3)."""

    eps: float | None = option(None, "l_inf budget in [0, 1] pixel units, e.g. 8/255")
    step_size: float | None = option(None, "PGD step size, e.g. 2/255")
    steps: int | None = option(None, "PGD steps (>= 1 for the adversarial methods)",
                               name="attack_steps")
    clip_random_start: bool | None = option(None, "clip the PGD random start to [0, 1] "
                                                  "(default from --fidelity: released "
                                                  "unclipped, corrected clipped)")


@dataclass
class LossConfig:
    temperature: float | None = option(None, "NT-Xent / SIR / AIR temperature (default 0.5; "
                                             "0.1 for released ACL under rcs-imagenet32)")
    lambda1: float | None = option(None, "SIR weight (default 0.5 for the AIR methods, else 0)")
    lambda2: float | None = option(None, "AIR weight (default 0.5 for the AIR methods, else 0)")
    air_form: str | None = option(None, "exact | reference-code (docs/acl-air.md section 6; "
                                        "default from --fidelity: released reference-code)")
    w_timing: str | None = option(None, "paper | released: DynACL's w from s(e), or one epoch "
                                        "early as the DynACL code (default from --fidelity)",
                                  name="dynacl_w_timing")
    originals_pass: bool | None = option(
        None, "run the originals' train-mode forward even without SIR / AIR (the AIR code does: "
              "it moves the natural BN statistics; default from --fidelity)")
    scale: float | None = option(None, "factor on the total loss (default from --fidelity: "
                                       "0.5 for released DynACL, whose code halves it)",
                                 name="loss_scale")


@dataclass
class OptimConfig:
    """LARS (or AdamW) with linear warm-up and cosine decay (docs/acl-air.md section 5)."""

    epochs: int | None = option(None, "number of epochs E (schedules scale with E)")
    batch_size: int | None = option(None, "global batch size N (2N views)")
    optimizer: str = option("lars", "lars | adamw: LARS as published, or AdamW (biases, norms "
                                    "and position embeddings undecayed), for ViTs")
    lr: float | None = option(None, "base learning rate (default 5.0 for LARS, 1e-3 for AdamW)")
    weight_decay: float | None = option(None, "weight decay (default 1e-6 for LARS, 0.05 for "
                                              "AdamW)")
    momentum: float = option(0.9, "LARS momentum")
    lars_eta: float = option(0.001, "LARS trust coefficient")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    warmup_epochs: int | None = option(None, "LR warm-up epochs (default E/100, at least 1; "
                                             "0: none)")
    lr_schedule: str | None = option(None, "step | epoch: the LR changes every step, or every "
                                           "epoch as the DynACL code (default from --fidelity)")


@dataclass
class SpeedConfig:
    """Options that make a run faster without changing the algorithm (see the README, Speed)."""

    precision: str = option("fp32", "fp32 | bf16: autocast for the attack and the training "
                                    "forwards (CUDA, or a CPU with AMX / AVX512-BF16)")
    attack_precision: str | None = option(None, "fp32 | bf16: the PGD attack alone (default: "
                                                "--precision)")
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the PGD attack's forward/backward (static "
                                  "shapes; the first step compiles)")
    compile_mode: str | None = option(None, "torch.compile mode with --compile, e.g. "
                                            "reduce-overhead (CUDA graphs)")
    fold_bn: bool = option(True, "fold the eval-mode BN into the convolutions for the attack "
                                 "(the same function up to float rounding)")
    deterministic: bool = option(False, "bit-reproducible run (deterministic kernels, no TF32, "
                                        "fp32, no compile); slower on CUDA")


@dataclass
class CoresetConfig:
    """Coreset training (docs/rcs.md): after `warmup` epochs on the full pool, train on a
    fraction of it, re-selected every `interval` epochs ("rcs") or drawn once ("random"). The
    validation set U is held out of training in every run, the full-data baseline included."""

    method: str | None = option(None, "rcs | random: train on a coreset after a warm-up "
                                      "(default: the whole pool)", name="coreset")
    fraction: float | None = option(None, "coreset fraction k in (0, 1) (default 0.2)")
    warmup: int | None = option(None, "epochs on the full pool before the first selection "
                                      "(default E/10)")
    interval: int | None = option(None, "epochs between RCS selections (default E/50)")
    granularity: str = option("batch", "batch | sample: RCS picks minibatches or images")
    refresh: str = option("exact", "exact | cached: how RCS refreshes the validation gradient")
    refresh_every: int = option(20, "cached refresh: re-attack U every m picks")
    # The pool pass is 75-90% of a round: fewer steps make it cheaper and change what the
    # selection sees (docs/results.md).
    attack_steps: int | None = option(None, "PGD steps of the RCS pass over the pool (default: "
                                            "--attack-steps)")
    precision: str | None = option(None, "fp32 | bf16: the RCS pool pass (default: "
                                         "--precision)")
    divergence: str | None = option(None, "minmax-kl | softmax-kl: the RD divergence (default "
                                          "minmax-kl)")
    rd_steps: int | None = option(None, "PGD steps of the RD attack on U (default 3; 1 in the "
                                        "ImageNet recipe)")
    chunk_batches: int | None = option(None, "run the greedy in chunks of M minibatches, each "
                                             "with its share of the budget (the ImageNet "
                                             "recipe: 100; default: one greedy)")
    simulated_lr: float = option(0.01, "eta' of the simulated head step")
    simulated_steps: int | None = option(None, "times the simulated step is applied (default "
                                               "from --fidelity: released 2, corrected 1)")
    budget_rounding: str | None = option(None, "truncate | floor: the budget exactly, or whole "
                                               "minibatches as released (default from "
                                               "--fidelity)")
    validation: float | None = option(None, "share of the training images held out as the "
                                            "RCS validation set U (default 0.01)")
    validation_handling: str | None = option(None, "all | released-half: every image of U "
                                                   "once, or the released code's first half of "
                                                   "each validation minibatch, each image twice "
                                                   "(default from --fidelity)")


@dataclass
class EvalConfig:
    """The quick SLF check at the end of a run (the full protocols: `fastacl evaluate`)."""

    enabled: bool = option(True, "quick SLF + PGD-20 evaluation at the end", name="evaluate")
    epochs: int | None = option(None, "epochs of the closing linear probe")
    max_test: int | None = option(None, "test images for the closing evaluation (default: all)")
    eps: float | None = option(None, "attack budget of the closing evaluation (default: --eps)")


@dataclass
class DistributedConfig:
    """Under torchrun (DDP; batch_size stays the global batch)."""

    gather_negatives: bool = option(True, "compute the losses on the global batch, negatives "
                                          "from every rank")
    sync_bn: bool = option(False, "synchronise BN statistics across ranks")


SECTIONS = ("data", "model", "attack", "loss", "optim", "speed", "coreset", "eval",
            "distributed")
# A section's option names carry its prefix (coreset_fraction, eval_epochs) unless the field
# names its option itself.
_PREFIXES = {"coreset": "coreset_", "eval": "eval_"}


@dataclass
class TrainConfig:
    """Everything a pre-training run depends on. None means "from the preset" (`resolve`)."""

    method: str = option("acl", "cl | acl | acl-air | dynacl | dynacl-air")
    preset: str | None = option(None, "demo | paper | rcs-imagenet32 (default: demo without "
                                      "--dataset or with mnist5k, paper otherwise)")
    fidelity: str = option("released", "released | corrected: compute what the authors' "
                                       "released code computes (the published numbers), or the "
                                       "papers' algorithms with its defects fixed "
                                       "(docs/fidelity.md)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    out_dir: str | None = option(None, "run directory (default "
                                       "runs/<method>-<dataset>-<timestamp>)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    # ---- option names <-> nested fields --------------------------------------------------

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """A config from option names: `TrainConfig.from_options(method="acl", eps=8/255)`."""
        return cls().with_options(**options)

    def with_options(self, **options: Any) -> TrainConfig:
        """A copy with the given options (flat names) replaced."""
        places = option_places()
        unknown = sorted(set(options) - set(places))
        if unknown:
            raise TypeError(f"unknown TrainConfig option(s) {unknown}; valid: {sorted(places)}")
        cfg = _copy(self)
        for name, value in options.items():
            section, attribute = places[name]
            setattr(cfg if section is None else getattr(cfg, section), attribute, value)
        return cfg

    def options(self) -> dict[str, Any]:
        """Every option by its flat name (the inverse of `from_options`)."""
        return {name: getattr(self if section is None else getattr(self, section), attribute)
                for name, (section, attribute) in option_places().items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainConfig:
        """The config saved by `to_dict` (a run's config.json / checkpoint). Fields the saved
        config lacks get their defaults; the flat layout of older checkpoints is accepted."""
        # A config saved before the fidelity switch existed ran what "corrected" now gives.
        saved = {"fidelity": "corrected", **saved}
        if not any(isinstance(saved.get(section), dict) for section in SECTIONS):
            return cls.from_options(**saved)
        cfg = cls(**{key: value for key, value in saved.items() if key not in SECTIONS})
        for section in SECTIONS:
            values = saved.get(section, {})
            setattr(cfg, section, type(getattr(cfg, section))(**values))
        return cfg

    # ---- derived facts -------------------------------------------------------------------

    @property
    def is_adversarial(self) -> bool:
        return self.method != "cl"

    @property
    def is_dynamic(self) -> bool:
        return self.method.startswith("dynacl")

    @property
    def encoder_branch(self) -> str:
        """The BN branch whose encoder is the pre-trained model ("adv" for the ACL family)."""
        return "adv" if self.is_adversarial else "normal"

    # ---- presets and validation ----------------------------------------------------------

    def resolve(self) -> TrainConfig:
        """A validated copy with the preset, the method's defaults and the epoch-relative
        schedules filled in (docs/acl-air.md section 5: schedules scale with E, so a short run
        keeps the published shape)."""
        check_choice("method", self.method, METHODS)
        preset = self.preset or ("demo" if self.data.dataset in (None, "mnist5k") else "paper")
        check_choice("preset", preset, PRESETS)
        given = self.options()
        values = dict(PRESET_VALUES[preset])
        if self.optim.optimizer == "adamw":  # the presets' lr is LARS's
            values["lr"] = ADAMW_LR
        if self.fidelity == "released":
            values.update(RELEASED_PRESET_VALUES.get((preset, self.method), {}))
        cfg = self.with_options(preset=preset, **{
            name: value for name, value in values.items() if given[name] is None})
        _check_positive_int(cfg.optim.epochs, "epochs")
        epochs = cfg.optim.epochs
        defaults = {
            "temperature": 0.5,
            "weight_decay": ADAMW_WEIGHT_DECAY if cfg.optim.optimizer == "adamw"
            else LARS_WEIGHT_DECAY,
            "attack_precision": cfg.speed.precision,
            "lambda1": METHOD_LAMBDAS[cfg.method], "lambda2": METHOD_LAMBDAS[cfg.method],
            "warmup_epochs": max(1, round(epochs / 100)),
            "dynaug_period": dynaug_period(epochs),
            "eval_eps": cfg.attack.eps,
            "coreset_attack_steps": cfg.attack.steps, "coreset_precision": cfg.speed.precision,
            # docs/rcs.md section 4: warm-up E/10 and interval E/50 (100 and 20 at E = 1000).
            "coreset_warmup": max(1, round(epochs / 10)),
            "coreset_interval": max(1, round(epochs / 50)),
            "coreset_fraction": 0.2, "coreset_divergence": "minmax-kl",
            "coreset_validation": 0.01, "coreset_rd_steps": 3,
            **fidelity_values(cfg.fidelity, cfg.method),
        }
        given = cfg.options()
        cfg = cfg.with_options(**{name: value for name, value in defaults.items()
                                  if given[name] is None})
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field of a resolved config; a ConfigError names the first bad one."""
        for check in (_check_run, _check_data, _check_attack, _check_loss, _check_optim,
                      _check_speed, _check_coreset, _check_eval):
            check(self)


def option_places() -> dict[str, tuple[str | None, str]]:
    """option name -> (section or None for a top-level field, attribute)."""
    places: dict[str, tuple[str | None, str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SECTIONS:
            places[f.name] = (None, f.name)
            continue
        for inner in dataclasses.fields(f.default_factory):
            name = inner.metadata["option"] or _PREFIXES.get(f.name, "") + inner.name
            places[name] = (f.name, inner.name)
    return places


def option_fields() -> dict[str, tuple[dataclasses.Field, type]]:
    """option name -> (its dataclass field, its value type without None): what the CLI needs."""
    out = {}
    for name, (section, attribute) in option_places().items():
        owner = TrainConfig if section is None else type(getattr(TrainConfig(), section))
        hints = typing.get_type_hints(owner)
        kind = hints[attribute]
        kind = next(a for a in typing.get_args(kind) if a is not type(None)) if (
            typing.get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType"
        ) else kind
        out[name] = (next(f for f in dataclasses.fields(owner) if f.name == attribute), kind)
    return out


def _copy(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})


# ---- the checks, one per concern ---------------------------------------------------------------

def _check_positive_int(value: Any, name: str, minimum: int = 1, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")


def _check_budget(value: Any, name: str) -> None:
    if isinstance(value, str):
        raise ConfigError(f"{name} must be a number in (0, 1], got the string {value!r}: pass "
                          "8 / 255, not '8/255' (the command line accepts 8/255)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}: pixel values are in [0, 1]"
                          + (f"; did you mean {value:g}/255?" if isinstance(value, (int, float))
                             and 1 < value <= 255 else ""))


def _check_run(cfg: TrainConfig) -> None:
    check_choice("fidelity", cfg.fidelity, FIDELITIES)
    _check_positive_int(cfg.seed, "seed", minimum=0)
    check_device(cfg.device)


def _check_data(cfg: TrainConfig) -> None:
    check_choice("dataset", cfg.data.dataset, DATASETS)
    check_choice("interpolation", cfg.data.interpolation, INTERPOLATIONS)
    check_choice("model", cfg.model.name, (*MODELS, USER_MODEL))
    if cfg.data.max_train is not None:
        _check_positive_int(cfg.data.max_train, "max_train")
    _check_positive_int(cfg.data.dynaug_period, "dynaug_period")


def _check_attack(cfg: TrainConfig) -> None:
    if not cfg.is_adversarial:
        return
    _check_budget(cfg.attack.eps, "eps")
    if not (isinstance(cfg.attack.step_size, (int, float)) and cfg.attack.step_size > 0):
        raise ConfigError(f"step_size must be a number > 0, got {cfg.attack.step_size!r}")
    _check_positive_int(cfg.attack.steps, "attack_steps",
                        why=f" for the adversarial method {cfg.method!r} (use method='cl' to "
                            "train without an attack)")


def _check_loss(cfg: TrainConfig) -> None:
    if not cfg.loss.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.loss.temperature!r}")
    for name in ("lambda1", "lambda2"):
        if not getattr(cfg.loss, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg.loss, name)!r}")
    check_choice("air_form", cfg.loss.air_form, AIR_FORMS)
    check_choice("dynacl_w_timing", cfg.loss.w_timing, W_TIMINGS)
    if not (isinstance(cfg.loss.scale, (int, float)) and cfg.loss.scale > 0):
        raise ConfigError(f"loss_scale must be a number > 0, got {cfg.loss.scale!r}")
    if cfg.model.momentum_encoder:
        if not cfg.is_adversarial:
            raise ConfigError("momentum_encoder is DynACL's (an adversarial method), not "
                              f"{cfg.method!r}'s")
        if cfg.loss.lambda1 > 0 or cfg.loss.lambda2 > 0:
            raise ConfigError(
                "momentum_encoder=True with SIR / AIR (lambda1 / lambda2 > 0) is not defined: "
                "the released DynACL code has no SIR / AIR, and the AIR code's DynACL no "
                "momentum encoder; pass --no-momentum-encoder or lambda1 = lambda2 = 0")
        if not 0 <= cfg.model.momentum < 1:
            raise ConfigError(f"momentum_encoder_m must be in [0, 1), got {cfg.model.momentum}")


def _check_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    _check_positive_int(o.batch_size, "batch_size", minimum=2, why=" (NT-Xent needs negatives)")
    check_choice("lr_schedule", o.lr_schedule, LR_SCHEDULES)
    check_choice("optimizer", o.optimizer, OPTIMIZERS)
    _check_positive_int(o.warmup_epochs, "warmup_epochs", minimum=0)
    if o.warmup_epochs > o.epochs:
        raise ConfigError(f"warmup_epochs must be <= epochs = {o.epochs}, got {o.warmup_epochs}")
    for name, valid, rule in (("lr", o.lr > 0, "> 0"),
                              ("weight_decay", o.weight_decay >= 0, ">= 0"),
                              ("momentum", 0 <= o.momentum < 1, "in [0, 1)"),
                              ("lars_eta", o.lars_eta > 0, "> 0"),
                              ("min_lr", 0 <= o.min_lr <= o.lr, f"in [0, lr = {o.lr}]")):
        if not valid:
            raise ConfigError(f"{name} must be {rule}, got {getattr(o, name)!r}")


def _check_speed(cfg: TrainConfig) -> None:
    s = cfg.speed
    check_choice("precision", s.precision, PRECISIONS)
    check_choice("attack_precision", s.attack_precision, PRECISIONS)
    if s.compile_mode is not None and not s.compile:
        raise ConfigError(f"compile_mode={s.compile_mode!r} needs compile=True (--compile)")
    if s.deterministic and (s.precision != "fp32" or s.attack_precision != "fp32" or s.compile
                            or cfg.coreset.precision not in (None, "fp32")):
        raise ConfigError(
            "deterministic=True trades speed for bit-reproducibility and runs fp32 eager "
            f"kernels: it cannot be combined with precision={s.precision!r} / "
            f"attack_precision={s.attack_precision!r} / coreset_precision="
            f"{cfg.coreset.precision!r} / compile={s.compile}")


def _check_coreset(cfg: TrainConfig) -> None:
    c = cfg.coreset
    check_choice("coreset", c.method, CORESETS)
    if not 0.0 <= c.validation < 1.0:
        raise ConfigError(f"coreset_validation must be in [0, 1) (the share of the training "
                          f"images held out as U), got {c.validation}")
    if c.method is None:
        return
    if not 0.0 < c.fraction < 1.0:
        raise ConfigError(f"coreset_fraction must be in (0, 1) (the share of the pool trained "
                          f"on), got {c.fraction}")
    if c.method == "rcs" and not cfg.is_adversarial:
        raise ConfigError("coreset='rcs' selects for robustness (RD uses the adversarial BN "
                          f"branch): use an adversarial method, not {cfg.method!r}, or "
                          "coreset='random'")
    if c.method == "rcs" and c.validation == 0:
        raise ConfigError("coreset='rcs' needs a validation set U: coreset_validation must be "
                          "> 0")
    for name, choices in (("granularity", GRANULARITIES), ("refresh", REFRESHES),
                          ("divergence", DIVERGENCES), ("budget_rounding", BUDGET_ROUNDINGS),
                          ("validation_handling", VALIDATION_HANDLINGS)):
        check_choice("coreset_" + name, getattr(c, name), choices)
    check_choice("coreset_precision", c.precision, PRECISIONS)
    _check_positive_int(c.refresh_every, "coreset_refresh_every")
    _check_positive_int(c.rd_steps, "coreset_rd_steps")
    if c.chunk_batches is not None:
        _check_positive_int(c.chunk_batches, "coreset_chunk_batches")
    _check_positive_int(c.simulated_steps, "coreset_simulated_steps", minimum=0)
    if not c.simulated_lr >= 0:
        raise ConfigError(f"coreset_simulated_lr must be >= 0, got {c.simulated_lr}")
    _check_positive_int(c.attack_steps, "coreset_attack_steps", minimum=0,
                        why=" (PGD steps of the selection's pass over the pool)")
    _check_positive_int(c.interval, "coreset_interval")
    if not (isinstance(c.warmup, int) and 0 <= c.warmup < cfg.optim.epochs):
        raise ConfigError(f"coreset_warmup must be in [0, epochs = {cfg.optim.epochs}) (else "
                          f"the coreset is never used), got {c.warmup!r}")


def _check_eval(cfg: TrainConfig) -> None:
    if not cfg.eval.enabled:
        return
    _check_positive_int(cfg.eval.epochs, "eval_epochs")
    if cfg.eval.max_test is not None:
        _check_positive_int(cfg.eval.max_test, "eval_max_test")
    _check_budget(cfg.eval.eps, "eval_eps")
