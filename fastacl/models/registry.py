"""The model registry: every backbone fastacl pre-trains, built by name.

    model = build_model("wrn-28-10")                          # WRN-28-10 + head, dual BN
    model = build_model("vit-tiny", in_channels=1, image_size=28, dual_bn=False)

Each name is a builder and the keyword arguments that define it (``MODEL_PRESETS``); explicit
keyword arguments override the preset. Every model is a ``ContrastiveModel`` with
``model.spec = {"name": name, "kwargs": {every argument, resolved}}``, so
``build_model(spec["name"], **spec["kwargs"])`` (and so ``build_model_from_checkpoint``)
rebuilds it.

    name            builder          features  head (default)   what
    resnet18        resnet18_acl     512       512              the paper's (docs/acl-air.md s. 2)
    resnet18-small  resnet18_acl     128       128              the CPU demo (width 16)
    resnet34        resnet34_acl     512       512              BasicBlocks 3-4-6-3
    resnet50        resnet50_acl     2048      2048             Bottlenecks 3-4-6-3
    wrn-28-10       wide_resnet_acl  640       640              RCS' ImageNet-32 model
    wrn-28-10-rcs   wide_resnet_acl  640       640 (2 layers)   the same as RCS' released code
    wrn-34-10       wide_resnet_acl  640       640              TRADES' CIFAR model
    vit-tiny        vit_acl          192       192              ViT-Ti, patch 4, 32 px
    vit-small       vit_acl          384       384              ViT-S, patch 4, 32 px

The ResNets and WideResNets take ``stem`` ("cifar" | "stl"), the ViTs ``image_size`` instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastacl.errors import ConfigError
from fastacl.models.contrastive import ContrastiveModel
from fastacl.models.resnet import resnet18_acl
from fastacl.models.resnets import resnet34_acl, resnet50_acl
from fastacl.models.vit import vit_acl
from fastacl.models.wrn import wide_resnet_acl

__all__ = ["MODEL_BUILDERS", "MODEL_PRESETS", "build_model", "model_arguments"]

# Name -> the builder; its arguments are the name's keyword arguments.
MODEL_BUILDERS: dict[str, Callable[..., ContrastiveModel]] = {
    "resnet18": resnet18_acl,
    "resnet18-small": resnet18_acl,
    "resnet34": resnet34_acl,
    "resnet50": resnet50_acl,
    "wrn-28-10": wide_resnet_acl,
    "wrn-28-10-rcs": wide_resnet_acl,
    "wrn-34-10": wide_resnet_acl,
    "vit-tiny": vit_acl,
    "vit-small": vit_acl,
}

# Name -> the keyword arguments of its builder that define it; explicit arguments override.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "resnet18": {"width": 64, "head_dim": 512},  # the paper's model (docs/acl-air.md section 2)
    # The demo preset (28x28 MNIST on a 2-core CPU): 16/32/64/128 channels, 128-d head.
    "resnet18-small": {"width": 16, "head_dim": 128},
    "resnet34": {"width": 64},
    "resnet50": {"width": 64},
    "wrn-28-10": {"depth": 28, "widen_factor": 10},
    # RCS's released ImageNet-32 network (their checkpoints' layout, fastacl/models/published.py):
    # no input normalisation (mean 0 / std 1 is the identity) and their two-layer head.
    "wrn-28-10-rcs": {"depth": 28, "widen_factor": 10, "head_layers": 2, "mean": [0.0],
                      "std": [1.0]},
    "wrn-34-10": {"depth": 34, "widen_factor": 10},
    # DeiT's ViT-Ti and ViT-S (Touvron et al., 2021, Table 1) at patch 4 for 32x32 images.
    "vit-tiny": {"dim": 192, "depth": 12, "heads": 3, "mlp_dim": 768, "patch_size": 4},
    "vit-small": {"dim": 384, "depth": 12, "heads": 6, "mlp_dim": 1536, "patch_size": 4},
}


def model_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments ``build_model(name, ...)`` takes (its builder's parameters)."""
    _check_name(name)
    return tuple(inspect.signature(MODEL_BUILDERS[name]).parameters)


def build_model(name: str = "resnet18", **kwargs: Any) -> ContrastiveModel:
    """Build a registered model: ``name`` in MODEL_PRESETS, ``kwargs`` as for its builder.

    Explicit ``kwargs`` override the preset (e.g. ``build_model("resnet18", stem="stl")``,
    ``build_model("resnet18-small", in_channels=1, dual_bn=False)``,
    ``build_model("vit-tiny", image_size=28, in_channels=1)``). ``model.spec["name"]`` is
    ``name``, and ``model.spec["kwargs"]`` holds every argument, resolved.
    """
    accepted = model_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r} takes no argument(s) {unknown}; its arguments: "
                          f"{list(accepted)}")
    model = MODEL_BUILDERS[name](**{**MODEL_PRESETS[name], **kwargs})
    model.spec["name"] = name
    return model


def _check_name(name: str) -> None:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; registered models: {sorted(MODEL_PRESETS)}")
