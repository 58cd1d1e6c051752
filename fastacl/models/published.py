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
head as theirs, feature_dim -> feature_dim).

RCS' ImageNet-32 WideResNet (ACL_RCS/ImageNet_32: ``models/wrn_with_bn.py`` with
``bn_names=['pgd', 'normal']``, its ``linear`` replaced by a two-layer ``proj_head_module``, saved
from a DataParallel, so with ``module.`` prefixes) is the second layout. Its BN order is the other
way round: ``bn_list.0`` is the adversarial branch, ``bn_list.1`` the natural one. It has no
normalisation layer (their loader gives [0, 1] pixels, ToTensor only), so an imported model gets
mean 0 / std 1 (an exact identity). n = (depth - 4) / 6 blocks per group, width 16k / 32k / 64k:

    conv1.weight                                       stem conv (3x3, 16 channels, no BN)
    block{1-3}.layer.{k}.bn{1,2}.B                     pre-activation BNs of block k
    block{1-3}.layer.{k}.conv{1,2}.weight              its convs
    block{1-3}.layer.0.convShortcut.weight             1x1 shortcut where the width changes
    bn1.B                                              the final BN (before ReLU and pooling)
    linear.fc1.weight, linear.fc1.bias, linear.fc2.weight, linear.bn{1,2}.B   the 2-layer head

Ours: ``backbone.block{1-3}.{k}.`` (``shortcut`` for ``convShortcut``), ``backbone.bn`` for
``bn1``, ``head.`` for ``linear.``, and a ``wrn-28-10`` model built with ``head_layers=2``,
``mean=[0, 0, 0]``, ``std=[1, 1, 1]``. The same names with ``bn_list.0`` / ``bn_list.1`` and a
three-layer head are not this layout (a key ``linear.fc3`` is refused). Their forward pools with
``avg_pool2d(out, 8)``, ours with a global average: the same on 32 px images, the size their code
takes.

Our layout, for comparison: ``backbone.`` + the same backbone names with ``shortcut.conv`` /
``shortcut.bn`` for ``downsample.conv`` / ``downsample.bn``, ``head.`` for ``fc.``, and
``normal.`` / ``adv.`` for ``bn_list.0.`` / ``bn_list.1.``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from fastacl.models.checkpoint import load_state_dict_strict
from fastacl.models.registry import build_model

__all__ = [
    "EXPORT_RULES",
    "IMPORT_RULES",
    "WRN_EXPORT_RULES",
    "WRN_IMPORT_RULES",
    "build_model_from_published",
    "export_published_state_dict",
    "import_published_state_dict",
    "published_architecture",
]

_BN_TENSOR = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BRANCH_TENSOR = rf"((?:normal|adv)\.{_BN_TENSOR})"  # after the bn_list index is named

# Published BN branch index -> our branch name (their ResNets' bn_names = ['normal', 'pgd']).
_BRANCH_INDEX_TO_NAME = {"0": "normal", "1": "adv"}

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

# RCS' ImageNet-32 WideResNet (docstring): bn_names = ['pgd', 'normal'].
_WRN_BRANCH_INDEX_TO_NAME = {"0": "adv", "1": "normal"}

WRN_IMPORT_RULES: list[tuple[str, str]] = [
    (r"conv1\.weight", r"backbone.conv1.weight"),
    (r"block([1-3])\.layer\.(\d+)\.(conv[12])\.weight", r"backbone.block\1.\2.\3.weight"),
    (rf"block([1-3])\.layer\.(\d+)\.(bn[12])\.{_BRANCH_TENSOR}", r"backbone.block\1.\2.\3.\4"),
    (r"block([1-3])\.layer\.(\d+)\.convShortcut\.weight", r"backbone.block\1.\2.shortcut.weight"),
    (rf"bn1\.{_BRANCH_TENSOR}", r"backbone.bn.\1"),
    (r"linear\.fc1\.(weight|bias)", r"head.fc1.\1"),
    (r"linear\.fc2\.weight", r"head.fc2.weight"),
    (rf"linear\.bn([12])\.{_BRANCH_TENSOR}", r"head.bn\1.\2"),
]

WRN_EXPORT_RULES: list[tuple[str, str]] = [
    (r"backbone\.conv1\.weight", r"conv1.weight"),
    (r"backbone\.block([1-3])\.(\d+)\.(conv[12])\.weight", r"block\1.layer.\2.\3.weight"),
    (rf"backbone\.block([1-3])\.(\d+)\.(bn[12])\.{_BRANCH_TENSOR}", r"block\1.layer.\2.\3.\4"),
    (r"backbone\.block([1-3])\.(\d+)\.shortcut\.weight", r"block\1.layer.\2.convShortcut.weight"),
    (rf"backbone\.bn\.{_BRANCH_TENSOR}", r"bn1.\1"),
    (r"head\.fc1\.(weight|bias)", r"linear.fc1.\1"),
    (r"head\.fc2\.weight", r"linear.fc2.weight"),
    (rf"head\.bn([12])\.{_BRANCH_TENSOR}", r"linear.bn\1.\2"),
]

# Their WRN sees [0, 1] pixels: our imported model normalises with mean 0 / std 1.
_WRN_NORMALIZE = {"backbone.normalize.mean": 0.0, "backbone.normalize.std": 1.0}


@dataclass(frozen=True)
class _Layout:
    """One published layout: how its bn_list indices name branches, and its renaming rules."""

    name: str
    branch_of_index: dict[str, str]
    import_rules: list[tuple[re.Pattern[str], str]]
    export_rules: list[tuple[re.Pattern[str], str]]


def _compiled(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), target) for pattern, target in rules]


_RESNET = _Layout("ResNet-18 / 34 / 50", _BRANCH_INDEX_TO_NAME, _compiled(IMPORT_RULES),
                  _compiled(EXPORT_RULES))
_WRN = _Layout("RCS' ImageNet-32 WideResNet", _WRN_BRANCH_INDEX_TO_NAME,
               _compiled(WRN_IMPORT_RULES), _compiled(WRN_EXPORT_RULES))
_WRN_KEY = re.compile(r"block[1-3]\.layer\.\d+\.")  # a key only their WideResNet has
_BN_LIST = re.compile(r"\.bn_list\.(\d+)\.")
_OUR_BRANCH = re.compile(r"\.(normal|adv)\.(?=" + _BN_TENSOR + "$)")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match is not None:
            return match.expand(target)
    return None


def _name_branch(key: str, branch_of_index: dict[str, str]) -> str | None:
    """'x.bn_list.1.weight' -> 'x.adv.weight' by the layout's indices; None for an unknown one."""
    for index in _BN_LIST.findall(key):
        if index not in branch_of_index:
            return None
    return _BN_LIST.sub(lambda m: f".{branch_of_index[m.group(1)]}.", key)


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


def _import_layout(keys: list[str]) -> _Layout:
    """The WideResNet layout if any key names one of its blocks, else the ResNet layout."""
    return _WRN if any(_WRN_KEY.match(key) for key in keys) else _RESNET


def import_published_state_dict(state_dict: dict[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Rename a published ACL / DynACL / AIR / RCS state dict to ours (layouts: module docstring).

    Accepts the bare state dict or the whole checkpoint dict, with or without 'module.'
    prefixes. The result loads strictly into the dual-BN ``build_model("resnet18" | "resnet34" |
    "resnet50", ...)`` of the matching size, or, for RCS' WideResNet, into ``build_model(
    "wrn-28-10", depth=..., widen_factor=..., head_layers=2, mean=[0] * 3, std=[1] * 3)``
    (``build_model_from_published`` reads all that off the tensors). Raises ValueError listing
    every key that no rule covers, and any two keys that would land on the same name. The tensors
    are not copied.
    """
    # A list, not a dict: 'module.x' and 'x' in one file must meet as duplicates below.
    stripped = [(_strip_data_parallel_prefix(key), key, tensor)
                for key, tensor in _unwrap(state_dict).items()]
    layout = _import_layout([key for key, _, _ in stripped])
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown, duplicates = [], []
    for key, original, tensor in stripped:
        named = _name_branch(key, layout.branch_of_index)
        ours = None if named is None else _rename(named, layout.import_rules)
        if ours is None:
            unknown.append(original)
        elif ours in renamed:
            duplicates.append(f"{original} -> {ours}")
        else:
            renamed[ours] = tensor
    if unknown or duplicates:
        raise ValueError(
            f"cannot import the published state dict as {layout.name}"
            + (f"; keys outside the documented layout ({len(unknown)}): {unknown}" if unknown
               else "")
            + (f"; keys mapping to an already imported name: {duplicates}" if duplicates
               else "")
            + ". The layouts assumed are documented in fastacl/models/published.py (dual BN "
            "ResNet-18 / 34 / 50 with bn_names=['normal', 'pgd'] and proj_head as fc; RCS' "
            "ImageNet-32 WideResNet with bn_names=['pgd', 'normal'] and a two-layer head)"
        )
    if layout is _WRN and "backbone.conv1.weight" in renamed:
        in_channels = renamed["backbone.conv1.weight"].shape[1]
        for key, value in _WRN_NORMALIZE.items():
            renamed[key] = torch.full((in_channels,), value)
    return renamed


def export_published_state_dict(state_dict: dict[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Rename our dual-BN ResNet-18 / 34 / 50, or WideResNet with the two-layer head and no
    normalisation, to the published layout (docstring).

    The inverse of import_published_state_dict on its canonical layouts. Raises ValueError
    listing keys no rule covers (e.g. a single-BN model: their layout has bn_list.0/1 in every
    BN; a WideResNet's third head layer), and for a WideResNet whose normalisation is not mean 0
    / std 1 (their WRN has none, so it would compute another function).
    """
    ours = dict(_unwrap(state_dict))
    is_wrn = any(key.startswith("backbone.block1.") for key in ours)
    layout = _WRN if is_wrn else _RESNET
    if is_wrn:
        for key, value in _WRN_NORMALIZE.items():
            if key in ours and not torch.all(ours.pop(key) == value):
                raise ValueError(
                    f"cannot export this WideResNet to RCS' layout: its {key} is not all "
                    f"{value}, and their WRN has no normalisation layer (it takes [0, 1] pixels)")
    index_of_branch = {name: index for index, name in layout.branch_of_index.items()}
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown = []
    for key, tensor in ours.items():
        theirs = _rename(key, layout.export_rules)
        if theirs is None:
            unknown.append(key)
            continue
        theirs = _OUR_BRANCH.sub(lambda m: f".bn_list.{index_of_branch[m.group(1)]}.", theirs)
        renamed[theirs] = tensor
    if unknown:
        raise ValueError(
            f"cannot export to the published layout ({layout.name}); keys it has no place for "
            f"({len(unknown)}): {unknown}. Only dual-BN resnet18 / resnet34 / resnet50 models, and "
            "dual-BN WideResNets with head_layers=2 and mean 0 / std 1, are exportable"
        )
    return renamed


# (blocks per stage, Bottleneck?) -> the registered model with that layout.
_PUBLISHED_ARCHITECTURES = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
}
_BLOCK_KEY = re.compile(r"backbone\.layer([1-4])\.(\d+)\.conv1\.weight")
_WRN_BLOCK_KEY = re.compile(r"backbone\.block([1-3])\.(\d+)\.conv1\.weight")


def published_architecture(ours: dict[str, torch.Tensor]) -> str:
    """The registered name ("resnet18" / "resnet34" / "resnet50" / "wrn-28-10" / "wrn-34-10") of
    an imported state dict; a WideResNet of another depth is built as "wrn-28-10" with its own
    depth (the name only picks the builder)."""
    if any(_WRN_BLOCK_KEY.fullmatch(key) for key in ours):
        return "wrn-34-10" if _wrn_depth(ours) == 34 else "wrn-28-10"
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


def _wrn_depth(ours: dict[str, torch.Tensor]) -> int:
    """6 n + 4 for n blocks in every group; ValueError if the groups differ."""
    blocks = [0, 0, 0]
    for key in ours:
        match = _WRN_BLOCK_KEY.fullmatch(key)
        if match is not None:
            group = int(match[1]) - 1
            blocks[group] = max(blocks[group], int(match[2]) + 1)
    if len(set(blocks)) != 1:
        raise ValueError(f"the published WideResNet has {tuple(blocks)} blocks per group; a "
                         "WideResNet has the same number in each")
    return 6 * blocks[0] + 4


def _wrn_arguments(ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """build_model arguments of RCS' WideResNet, read off its tensors."""
    conv1 = ours["backbone.conv1.weight"]
    widened = ours["backbone.block1.0.conv1.weight"].shape[0]
    if conv1.shape[0] != 16 or widened % 16 or conv1.shape[-1] != 3:
        raise ValueError(f"a WideResNet has a 3x3 stem to 16 channels and 16k channels in its "
                         f"first group; got stem {tuple(conv1.shape)} and {widened} channels")
    return {
        "depth": _wrn_depth(ours), "widen_factor": widened // 16, "stem": "cifar",
        "in_channels": conv1.shape[1], "head_dim": ours["head.fc1.weight"].shape[0],
        "dual_bn": True, "mean": [0.0] * conv1.shape[1], "std": [1.0] * conv1.shape[1],
        "head_layers": 3 if "head.fc3.weight" in ours else 2,
    }


def _resnet_arguments(ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """build_model arguments of a published ResNet, read off its tensors."""
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
    return kwargs


def build_model_from_published(state_dict_or_path: dict[str, Any] | str | os.PathLike):
    """A dual-BN model holding a published checkpoint's weights (strict load).

    The architecture is read off the tensors. ResNets: the model from the blocks per stage (and
    conv3, ResNet-50's), stem from conv1's kernel (3: "cifar", 7: "stl"), in_channels and width
    from conv1, head_dim from fc.fc1, mean / std from the normalize buffers. RCS' WideResNet:
    depth from the blocks per group, widen_factor from the first group's width, head_dim from
    linear.fc1, the two-layer head, mean 0 / std 1. A path is loaded with
    torch.load(weights_only=True) (never a full unpickle).
    """
    source = state_dict_or_path
    if not isinstance(source, dict):
        source = torch.load(source, map_location="cpu", weights_only=True)
    ours = import_published_state_dict(source)
    is_wrn = any(_WRN_BLOCK_KEY.fullmatch(key) for key in ours)
    required = ["backbone.conv1.weight", "head.fc1.weight"]
    required += ["backbone.block1.0.conv1.weight"] if is_wrn else []
    absent = [key for key in required if key not in ours]
    if absent:
        raise ValueError(f"the published state dict lacks {absent} (after renaming to ours); "
                         "cannot infer the architecture")
    name = published_architecture(ours)
    kwargs = _wrn_arguments(ours) if is_wrn else _resnet_arguments(ours)
    model = build_model(name, **kwargs)
    load_state_dict_strict(model, ours)
    return model
