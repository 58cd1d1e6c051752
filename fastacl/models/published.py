"""Import / export of the checkpoints published with ACL, DynACL, AIR and RCS.

Their pre-training code (ACL: VITA-Group/Adversarial-Contrastive-Learning; DynACL:
PKU-ML/DYNACL; AIR and RCS: GodXuxilie/Enhancing_ACL_via_AIR, Efficient_ACL_via_RCS) builds a
torchvision-style ResNet-18 (AIR and RCS also ResNet-34 and ResNet-50) from
``models/resnet_multi_bn.py`` with ``bn_names=['normal', 'pgd']`` and replaces its ``fc`` by
``proj_head``. Each BN is ``batch_norm_multiple``, whose ``bn_list`` ModuleList holds one BN per
name, so ``bn_list.0`` is the natural ("normal") branch and ``bn_list.1`` the adversarial ("pgd",
our "adv") branch. The state dict layout we assume, with
B = ``bn_list.{0,1}.{weight,bias,running_mean,running_var,num_batches_tracked}``:

    normalize.mean, normalize.std                      [3] ImageNet mean / std buffers
    conv1.weight                                       stem conv
    bn1.B                                              stem BN
    layer{1-4}.{k}.conv{1,2}.weight                    BasicBlock convs (k = block in the stage)
    layer{1-4}.{k}.bn{1,2}.B                           BasicBlock BNs
    layer{1-4}.{k}.conv3.weight, layer{1-4}.{k}.bn3.B  Bottleneck's third conv and BN (ResNet-50)
    layer{2-4}.0.downsample.conv.weight                shortcut 1x1 conv (ResNet-50: also
    layer{2-4}.0.downsample.bn.B                       shortcut BN         layer1.0's)
    fc.fc1.weight, fc.fc1.bias, fc.fc{2,3}.weight      projection head linears
    fc.bn{1,2,3}.B                                     projection head BNs (BatchNorm1d)

Import also accepts, as aliases: a ``module.`` prefix (DataParallel) on every key; the whole
checkpoint dict ({"state_dict": ..., "epoch": ..., "optim": ...}); ``shortcut.0`` / ``shortcut.1``
for ``downsample.conv`` / ``downsample.bn`` (the kuangliu CIFAR ResNet naming some forks use); and
``head.`` or ``projector.`` for the head's ``fc.`` prefix. Anything else (a third BN branch
``bn_list.2``, single-BN ``bn_list.weight``, a classifier ``fc.weight``, ...) raises ValueError
listing the keys. Export writes the canonical layout above (no prefix, ``downsample``, ``fc.``).

The blocks per stage (2-2-2-2: ResNet-18, 3-4-6-3: ResNet-34, or ResNet-50 with conv3) say which
model it is; their ResNet-34 / 50 compute exactly what fastacl's resnet34 / resnet50 compute (the
head as theirs, feature_dim -> feature_dim). Their WideResNet (RCS' ImageNet-32 WRN-28-10) is
not covered: its two-layer head and its bn_names=['pgd', 'normal'] order are another layout.

Our layout, for comparison: ``backbone.`` + the same backbone names with ``shortcut.conv`` /
``shortcut.bn`` for ``downsample.conv`` / ``downsample.bn``, ``head.`` for ``fc.``, and
``normal.`` / ``adv.`` for ``bn_list.0.`` / ``bn_list.1.``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any

import torch

from fastacl.models.checkpoint import load_state_dict_strict
from fastacl.models.registry import build_model

__all__ = [
    "EXPORT_RULES",
    "IMPORT_RULES",
    "build_model_from_published",
    "export_published_state_dict",
    "import_published_state_dict",
    "published_architecture",
]

_BN_TENSOR = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BRANCH_TENSOR = rf"((?:normal|adv)\.{_BN_TENSOR})"  # after the bn_list index is named

# Published BN branch index <-> our branch name (their bn_names = ['normal', 'pgd']).
_BRANCH_INDEX_TO_NAME = {"0": "normal", "1": "adv"}
_BRANCH_NAME_TO_INDEX = {name: index for index, name in _BRANCH_INDEX_TO_NAME.items()}

# (published key, our key): full-match regexes, applied after 'bn_list.K.' became the branch name.
IMPORT_RULES: list[tuple[str, str]] = [
    (r"normalize\.(mean|std)", r"backbone.normalize.\1"),
    (r"conv1\.weight", r"backbone.conv1.weight"),
    (rf"bn1\.{_BRANCH_TENSOR}", r"backbone.bn1.\1"),
    (r"layer([1-4])\.(\d+)\.(conv[123])\.weight", r"backbone.layer\1.\2.\3.weight"),
    (rf"layer([1-4])\.(\d+)\.(bn[123])\.{_BRANCH_TENSOR}", r"backbone.layer\1.\2.\3.\4"),
    (r"layer([1-4])\.0\.(?:downsample\.conv|shortcut\.0)\.weight",
     r"backbone.layer\1.0.shortcut.conv.weight"),
    (rf"layer([1-4])\.0\.(?:downsample\.bn|shortcut\.1)\.{_BRANCH_TENSOR}",
     r"backbone.layer\1.0.shortcut.bn.\2"),
    (r"(?:fc|head|projector)\.fc1\.(weight|bias)", r"head.fc1.\1"),
    (r"(?:fc|head|projector)\.fc([23])\.weight", r"head.fc\1.weight"),
    (rf"(?:fc|head|projector)\.bn([123])\.{_BRANCH_TENSOR}", r"head.bn\1.\2"),
]

# (our key, published key), full-match, before our branch names become 'bn_list.K.'.
EXPORT_RULES: list[tuple[str, str]] = [
    (r"backbone\.normalize\.(mean|std)", r"normalize.\1"),
    (r"backbone\.conv1\.weight", r"conv1.weight"),
    (rf"backbone\.bn1\.{_BRANCH_TENSOR}", r"bn1.\1"),
    (r"backbone\.layer([1-4])\.(\d+)\.(conv[123])\.weight", r"layer\1.\2.\3.weight"),
    (rf"backbone\.layer([1-4])\.(\d+)\.(bn[123])\.{_BRANCH_TENSOR}", r"layer\1.\2.\3.\4"),
    (r"backbone\.layer([1-4])\.0\.shortcut\.conv\.weight", r"layer\1.0.downsample.conv.weight"),
    (rf"backbone\.layer([1-4])\.0\.shortcut\.bn\.{_BRANCH_TENSOR}",
     r"layer\1.0.downsample.bn.\2"),
    (r"head\.fc1\.(weight|bias)", r"fc.fc1.\1"),
    (r"head\.fc([23])\.weight", r"fc.fc\1.weight"),
    (rf"head\.bn([123])\.{_BRANCH_TENSOR}", r"fc.bn\1.\2"),
]

_COMPILED_IMPORT = [(re.compile(pattern), target) for pattern, target in IMPORT_RULES]
_COMPILED_EXPORT = [(re.compile(pattern), target) for pattern, target in EXPORT_RULES]
_BN_LIST = re.compile(r"\.bn_list\.(\d+)\.")
_OUR_BRANCH = re.compile(r"\.(normal|adv)\.(?=" + _BN_TENSOR + "$)")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match is not None:
            return match.expand(target)
    return None


def _name_branch(key: str) -> str | None:
    """'x.bn_list.1.weight' -> 'x.adv.weight'; None if a bn_list index is not 0 or 1."""
    for index in _BN_LIST.findall(key):
        if index not in _BRANCH_INDEX_TO_NAME:
            return None
    return _BN_LIST.sub(lambda m: f".{_BRANCH_INDEX_TO_NAME[m.group(1)]}.", key)


def _unwrap(state_dict: dict[str, Any]) -> dict[str, Any]:
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"expected a state dict (name -> tensor) or a checkpoint with a 'state_dict' entry; "
            f"these entries are not tensors: {not_tensors}"
        )
    return state_dict


def _strip_data_parallel_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def import_published_state_dict(state_dict: dict[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Rename a published ACL / DynACL / AIR / RCS state dict to ours (layout: module docstring).

    Accepts the bare state dict or the whole checkpoint dict, with or without 'module.'
    prefixes. The result loads strictly into the dual-BN ``build_model("resnet18" | "resnet34" |
    "resnet50", ...)`` of the matching size. Raises ValueError listing every key that no rule
    covers, and any two keys that would land on the same name. The tensors are not copied.
    """
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown, duplicates = [], []
    for key, tensor in _unwrap(state_dict).items():
        ours = None
        named = _name_branch(_strip_data_parallel_prefix(key))
        if named is not None:
            ours = _rename(named, _COMPILED_IMPORT)
        if ours is None:
            unknown.append(key)
        elif ours in renamed:
            duplicates.append(f"{key} -> {ours}")
        else:
            renamed[ours] = tensor
    if unknown or duplicates:
        raise ValueError(
            "cannot import the published state dict"
            + (f"; keys outside the documented layout ({len(unknown)}): {unknown}" if unknown
               else "")
            + (f"; keys mapping to an already imported name: {duplicates}" if duplicates
               else "")
            + ". The layout assumed is documented in fastacl/models/published.py (dual BN with "
            "bn_names=['normal', 'pgd'], ResNet-18 / 34 / 50, proj_head as fc)"
        )
    return renamed


def export_published_state_dict(state_dict: dict[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Rename our dual-BN ResNet-18 / 34 / 50 state dict to the published layout (docstring).

    The inverse of import_published_state_dict on its canonical layout. Raises ValueError listing
    keys no rule covers (e.g. a single-BN model: their layout has bn_list.0/1 in every BN).
    """
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown = []
    for key, tensor in _unwrap(state_dict).items():
        theirs = _rename(key, _COMPILED_EXPORT)
        if theirs is None:
            unknown.append(key)
            continue
        theirs = _OUR_BRANCH.sub(
            lambda m: f".bn_list.{_BRANCH_NAME_TO_INDEX[m.group(1)]}.", theirs
        )
        renamed[theirs] = tensor
    if unknown:
        raise ValueError(
            f"cannot export to the published layout; keys it has no place for ({len(unknown)}): "
            f"{unknown}. Only dual-BN resnet18 / resnet34 / resnet50 models are exportable"
        )
    return renamed


# (blocks per stage, Bottleneck?) -> the registered model with that layout.
_PUBLISHED_ARCHITECTURES = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
}
_BLOCK_KEY = re.compile(r"backbone\.layer([1-4])\.(\d+)\.conv1\.weight")


def published_architecture(ours: dict[str, torch.Tensor]) -> str:
    """The registered name ("resnet18" / "resnet34" / "resnet50") of an imported state dict."""
    blocks = [0, 0, 0, 0]
    for key in ours:
        match = _BLOCK_KEY.fullmatch(key)
        if match is not None:
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    bottleneck = any(".conv3." in key for key in ours)
    layout = (tuple(blocks), bottleneck)
    if layout not in _PUBLISHED_ARCHITECTURES:
        raise ValueError(
            f"the published state dict has {tuple(blocks)} blocks per stage"
            f"{' (Bottlenecks)' if bottleneck else ''}; fastacl knows ResNet-18 (2, 2, 2, 2), "
            "ResNet-34 (3, 4, 6, 3) and ResNet-50 (3, 4, 6, 3, Bottlenecks)")
    return _PUBLISHED_ARCHITECTURES[layout]


def build_model_from_published(state_dict_or_path: dict[str, Any] | str | os.PathLike):
    """A dual-BN ResNet-18 / 34 / 50 holding a published checkpoint's weights (strict load).

    The architecture is read off the tensors: the model from the blocks per stage (and conv3,
    ResNet-50's), stem from conv1's kernel (3: "cifar", 7: "stl"), in_channels and width from
    conv1, head_dim from fc.fc1, mean / std from the normalize buffers. A path is loaded with
    torch.load(weights_only=True) (never a full unpickle).
    """
    source = state_dict_or_path
    if not isinstance(source, dict):
        source = torch.load(source, map_location="cpu", weights_only=True)
    ours = import_published_state_dict(source)
    required = ("backbone.conv1.weight", "head.fc1.weight")
    absent = [key for key in required if key not in ours]
    if absent:
        raise ValueError(f"the published state dict lacks {absent} (after renaming to ours); "
                         "cannot infer the architecture")
    name = published_architecture(ours)
    conv1 = ours["backbone.conv1.weight"]
    kernel_to_stem = {3: "cifar", 7: "stl"}
    if conv1.shape[-1] not in kernel_to_stem:
        raise ValueError(f"stem conv kernel {tuple(conv1.shape[-2:])} is neither 3x3 (cifar) "
                         "nor 7x7 (stl)")
    kwargs: dict[str, Any] = {
        "stem": kernel_to_stem[conv1.shape[-1]],
        "in_channels": conv1.shape[1],
        "width": conv1.shape[0],
        "head_dim": ours["head.fc1.weight"].shape[0],
        "dual_bn": True,
    }
    if "backbone.normalize.mean" in ours and "backbone.normalize.std" in ours:
        # 7 significant digits: the float32 buffers' precision, so 0.485 stays 0.485 in the spec.
        kwargs["mean"] = [float(f"{v:.7g}") for v in ours["backbone.normalize.mean"].tolist()]
        kwargs["std"] = [float(f"{v:.7g}") for v in ours["backbone.normalize.std"].tolist()]
    model = build_model(name, **kwargs)
    load_state_dict_strict(model, ours)
    return model
