"""Every registered backbone (fastacl.models.registry) trains with ACL-AIR on both norm branches,
is attacked, round-trips through a checkpoint, folds where it can, and has the published size;
a user's encoder becomes a model with contrastive_model.

Tiny widths on CPU: the whole file runs in seconds with one thread. Tolerance: the suite's
||a - b|| / ||b|| (1e-5 fp32) where two computations differ only in float rounding.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastacl.attacks import pgd_contrastive
from fastacl.config import TrainConfig
from fastacl.errors import ConfigError
from fastacl.models import (
    MODEL_PRESETS,
    CheckpointError,
    ContrastiveModel,
    DualBatchNorm2d,
    DualLayerNorm,
    build_model,
    build_model_from_checkpoint,
    build_model_from_published,
    contrastive_model,
    dual_norm_modules,
    export_published_state_dict,
    import_published_state_dict,
    load_checkpoint,
    model_arguments,
    save_checkpoint,
)
from fastacl.models.folded import FoldedResNet18, can_fold
from fastacl.ops import nt_xent
from fastacl.optim import LARS
from fastacl.pretrain import loss_for, train_step
from tests.conftest import relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny configuration of every registered name (a new name must add one here).
TINY = {
    "resnet18": dict(width=4, head_dim=8),
    "resnet18-small": dict(width=4, head_dim=8),
    "resnet34": dict(width=4, head_dim=8),
    "resnet50": dict(width=4, head_dim=8),  # Bottlenecks: 4 x 8 x 4 = 128-d features
    "wrn-28-10": dict(depth=10, widen_factor=1, head_dim=8),  # 16-16-32-64, 1 block per group
    "wrn-28-10-rcs": dict(depth=10, widen_factor=1, head_dim=8),  # 2-layer head, mean 0 / std 1
    "wrn-34-10": dict(depth=10, widen_factor=1, head_dim=8),
    "vit-tiny": dict(dim=16, depth=2, heads=2, mlp_dim=32, head_dim=8),
    "vit-small": dict(dim=24, depth=1, heads=3, mlp_dim=48, head_dim=8),
}
NAMES = sorted(MODEL_PRESETS)
FOLDABLE = {"resnet18", "resnet18-small", "resnet34"}  # fastacl's BasicBlock ResNets
# (channels, size): CIFAR's 32x32 RGB and the demo's 28x28 MNIST.
IMAGES = [(3, 32), (1, 28)]


def tiny_model(name, in_channels=3, size=32, **overrides):
    kwargs = dict(TINY[name], in_channels=in_channels, **overrides)
    if "image_size" in model_arguments(name):
        kwargs["image_size"] = size  # the ViT's position embedding is sized for the data
    return build_model(name, **kwargs)


def images(n, channels, size, seed):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def smooth_images(n, channels, size, seed):
    """Images a random network tells apart (uniform noise all looks alike to it): bilinear
    upsamplings of random 4x4 images."""
    coarse = images(n, channels, 4, seed)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def acl_air_config():
    return TrainConfig.from_options(method="acl-air", dataset="cifar10", epochs=1, batch_size=8,
                                    eps=8 / 255, step_size=2 / 255, attack_steps=2, fold_bn=True,
                                    device="cpu", evaluate=False).resolve()


@torch.no_grad()
def moved_statistics(model, channels, size, seed=3):
    """Non-trivial norm parameters and BN running statistics on both branches, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for layer in dual_norm_modules(model):
        for branch in (layer.normal, layer.adv):
            branch.weight.uniform_(0.5, 1.5, generator=g)
            branch.bias.uniform_(-0.2, 0.2, generator=g)
    model.train()
    for branch, scale in (("normal", 1.0), ("adv", 0.7), ("normal", 0.9)):
        model(scale * torch.rand(6, channels, size, size, generator=g), branch=branch)
    return model.eval()


def test_every_registered_name_has_a_tiny_configuration():
    assert set(TINY) == set(MODEL_PRESETS)
    for name in NAMES:
        assert set(TINY[name]) <= set(model_arguments(name)), name


@pytest.mark.parametrize("channels,size", IMAGES)
@pytest.mark.parametrize("name", NAMES)
def test_acl_air_steps_train_both_norm_branches(name, channels, size):
    model = tiny_model(name, channels, size).train()
    assert isinstance(model, ContrastiveModel) and model.dual_bn
    cfg = acl_air_config()
    loss_fn = loss_for(cfg)
    assert loss_fn.lambda1 > 0 and loss_fn.lambda2 > 0  # SIR and AIR on: the originals' pass runs
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                     weight_decay=cfg.optim.weight_decay, eta=cfg.optim.lars_eta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        x_orig, x1, x2 = (images(8, channels, size, seed=10 * step + i) for i in range(3))
        terms = train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg,
                           torch.Generator().manual_seed(step))
        assert all(torch.isfinite(value) for value in terms.values()), terms
        assert {"sir", "air"} <= set(terms), terms
    # The last step's gradients reached the affine parameters of both branches of every norm
    # layer (backbone and head): the natural views train "normal", the adversarial ones "adv".
    layers = dual_norm_modules(model)
    assert any(isinstance(layer, DualLayerNorm) for layer in layers) == name.startswith("vit")
    for branch in ("normal", "adv"):
        reached = []
        for layer in layers:
            grads = [p.grad for p in layer.branch_module(branch).parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), (layer, branch)
            reached.append(sum(g.norm() for g in grads) > 0)
        # At these tiny widths a layer's few channels can all feed dead ReLUs (a zero gradient
        # is then the right one), so most layers, not all, see a non-zero gradient.
        assert sum(reached) >= 0.9 * len(reached), (branch, reached)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".normal." in k for k in changed) and any(".adv." in k for k in changed)


@pytest.mark.parametrize("name", NAMES)
def test_the_attack_raises_the_contrastive_loss(name):
    """On five seeded tiny models. A tiny random network maps every image near the same point
    (the loss sits within 1e-3 of log(2N - 1)), so a 3-step attack can miss on one of them (seen:
    vit-tiny and the unnormalised wrn-28-10-rcs, whose [0, 1] inputs make 8/255 a smaller step
    than after a normalisation); it must raise the loss on at least four and on average."""
    gains = []
    for seed in range(5):
        torch.manual_seed(seed)
        model = moved_statistics(tiny_model(name), 3, 32)
        x1 = smooth_images(8, 3, 32, seed=1)
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
        x2 = (x1 + 0.05 * noise).clamp(0, 1)
        x1_adv, x2_adv = pgd_contrastive(model, x1, x2, eps=8 / 255, step_size=2 / 255, steps=3,
                                         generator=torch.Generator().manual_seed(4))
        assert (x1_adv - x1).abs().max() <= 8 / 255 + 1e-6
        assert not model.training  # the attack restored the flags it found
        with torch.no_grad():
            clean = nt_xent(model(x1, branch="adv"), model(x2, branch="adv"), 0.5)
            attacked = nt_xent(model(x1_adv, branch="adv"), model(x2_adv, branch="adv"), 0.5)
        gains.append((attacked - clean).item())
    assert sum(gain > 1e-3 for gain in gains) >= 4 and sum(gains) / 5 > 1e-3, gains


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_rebuilds_the_same_model(name, tmp_path):
    model = moved_statistics(tiny_model(name, 1, 28, dual_bn=True), 1, 28)
    spec = model.spec
    assert spec["name"] == name and set(spec["kwargs"]) == set(model_arguments(name))
    path = save_checkpoint(tmp_path / "model.pt", model, method="acl-air", encoder_branch="adv")
    rebuilt = build_model_from_checkpoint(path).eval()
    assert type(rebuilt) is type(model) and rebuilt.spec == spec
    assert load_checkpoint(path)["model_spec"] == spec
    x = images(4, 1, 28, seed=5)
    with torch.no_grad():
        for branch in ("normal", "adv"):
            assert torch.equal(rebuilt(x, branch=branch), model(x, branch=branch))
            assert torch.equal(rebuilt(x, branch=branch, return_features=True),
                               model(x, branch=branch, return_features=True))


@pytest.mark.parametrize("name", NAMES)
def test_folding_where_it_applies_matches_the_unfolded_attack(name):
    model = moved_statistics(tiny_model(name, 1, 28), 1, 28)
    assert can_fold(model) == (name in FOLDABLE)
    if name not in FOLDABLE:
        with pytest.raises(ValueError, match="ContrastiveResNet18"):
            FoldedResNet18(model, "adv")
        return
    x1, x2 = smooth_images(8, 1, 28, seed=6), smooth_images(8, 1, 28, seed=7)
    folded = FoldedResNet18(model, "adv")
    with torch.no_grad():
        assert relative_error(folded(x1), model(x1, branch="adv")) < 1e-5
    budget = dict(eps=0.15, step_size=0.05, steps=3)
    eager = pgd_contrastive(model, x1, x2, generator=torch.Generator().manual_seed(8), **budget)
    mirrored = pgd_contrastive(folded, x1, x2, generator=torch.Generator().manual_seed(8),
                               **budget)
    for a, b in zip(eager, mirrored, strict=True):
        # Same iterates up to rounding, which may flip the sign of a near-zero gradient entry.
        assert ((a - b).abs() > 1e-6).float().mean() < 0.02


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_published_resnet34_and_resnet50_layouts_round_trip(name):
    """The AIR / RCS authors' resnet_multi_bn.py names (fastacl/models/published.py): the same
    as their ResNet-18's, with more blocks per stage and, in ResNet-50, conv3 / bn3 and a
    layer1.0 downsample."""
    model = moved_statistics(tiny_model(name), 3, 32)
    theirs = export_published_state_dict(model.state_dict())
    last = "layer4.2.conv3.weight" if name == "resnet50" else "layer4.2.conv2.weight"
    assert {last, "layer3.5.bn1.bn_list.1.running_var", "layer2.0.downsample.conv.weight",
            "fc.fc3.weight"} <= set(theirs)
    assert ("layer1.0.downsample.bn.bn_list.0.weight" in theirs) == (name == "resnet50")
    for key, value in import_published_state_dict(theirs).items():
        assert torch.equal(value, model.state_dict()[key]), key
    rebuilt = build_model_from_published({"state_dict": theirs}).eval()
    assert rebuilt.spec == model.spec
    x = smooth_images(2, 3, 32, seed=0)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, branch="adv"), model(x, branch="adv"))


def count(module):
    return sum(p.numel() for p in module.parameters())


def meta_model(name, **kwargs):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_model(name, **kwargs)


# Backbone parameters without any classifier, single BN, against the published totals minus
# their classifier (C classes on F features: F C + C).
PUBLISHED_BACKBONES = [
    # The CIFAR ResNet-18: 11,173,962 with its 10-class fc.
    ("resnet18", {}, 11_173_962 - (512 * 10 + 10)),
    # torchvision's ResNet-34 / ResNet-50 (ImageNet stem): 21,797,672 / 25,557,032 with the
    # 1000-class fc; resnet50's 23,508,032 is the figure usually quoted for its backbone.
    ("resnet34", {"stem": "stl"}, 21_797_672 - (512 * 1000 + 1000)),
    ("resnet50", {"stem": "stl"}, 25_557_032 - (2048 * 1000 + 1000)),
    # The CIFAR stem's 3x3 conv has 3 x 64 x (49 - 9) = 7,680 fewer weights than the 7x7.
    ("resnet50", {}, 23_508_032 - 7_680),
    # WRN-28-10 / WRN-34-10 (TRADES / RCS layout): 36,479,194 / 46,160,474 with a 10-class fc.
    ("wrn-28-10", {}, 36_479_194 - (640 * 10 + 10)),
    ("wrn-34-10", {}, 46_160_474 - (640 * 10 + 10)),
    ("wrn-28-10-rcs", {}, 36_479_194 - (640 * 10 + 10)),  # the same backbone, no normalisation
    # timm's vit_tiny_patch16_224 / vit_small_patch16_224 (DeiT's ViT-Ti / ViT-S): 5,717,416 /
    # 22,050,664 with the 1000-class head, built here at their patch 16 and 224 px.
    ("vit-tiny", {"patch_size": 16, "image_size": 224}, 5_717_416 - (192 * 1000 + 1000)),
    ("vit-small", {"patch_size": 16, "image_size": 224}, 22_050_664 - (384 * 1000 + 1000)),
    # The registered ViTs (patch 4, 32 px) differ from those by the patch embedding (C 4 4 dim
    # weights instead of C 16 16 dim) and the position embedding (65 instead of 197 entries):
    # ViT-Ti 5,360,832 (-163,584) and ViT-S 21,338,496 (-327,168).
    ("vit-tiny", {}, 5_717_416 - 193_000 - 3 * (256 - 16) * 192 - (197 - 65) * 192),
    ("vit-small", {}, 22_050_664 - 385_000 - 3 * (256 - 16) * 384 - (197 - 65) * 384),
]


@pytest.mark.parametrize("name,kwargs,expected", PUBLISHED_BACKBONES)
def test_full_size_backbones_have_the_published_parameter_counts(name, kwargs, expected):
    single = meta_model(name, dual_bn=False, **kwargs)
    assert count(single.backbone) == expected
    assert abs(count(single.backbone) / expected - 1) < 0.01  # the brief's 1 %, for the record
    # Dual norms add exactly one more affine pair per norm layer, nothing else.
    dual = meta_model(name, dual_bn=True, **kwargs)
    adv = sum(count(layer.adv) for layer in dual_norm_modules(dual.backbone))
    assert count(dual.backbone) == expected + adv and adv > 0


def test_full_size_feature_and_head_sizes():
    models = {name: meta_model(name) for name in NAMES}
    sizes = {name: (model.feature_dim, model.out_dim) for name, model in models.items()}
    assert sizes == {
        "resnet18": (512, 512), "resnet18-small": (128, 128), "resnet34": (512, 512),
        "resnet50": (2048, 2048), "wrn-28-10": (640, 640), "wrn-28-10-rcs": (640, 640),
        "wrn-34-10": (640, 640),
        "vit-tiny": (192, 192), "vit-small": (384, 384),
    }


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "wrn-28-10"])
def test_convolutions_are_kaiming_normal_fan_out(name):
    torch.manual_seed(0)
    model = tiny_model(name, width=16) if name.startswith("resnet") else tiny_model(
        name, widen_factor=4)
    conv = max((m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)),
               key=lambda m: m.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.05


def test_stems_and_image_sizes():
    with torch.no_grad():
        for name in ("resnet34", "resnet50", "wrn-28-10"):
            model = tiny_model(name, stem="stl").eval()
            assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
            assert model(images(2, 3, 96, seed=0), branch="adv").shape == (2, 8)
        vit = tiny_model("vit-tiny", 3, 96, patch_size=8).eval()
        assert vit.backbone.pos_embed.shape == (1, 12 * 12 + 1, 16)
        assert vit(images(2, 3, 96, seed=0), branch="normal").shape == (2, 8)
        with pytest.raises(ValueError, match=r"built for 96x96.*\(2, 3, 32, 32\)"):
            vit(images(2, 3, 32, seed=0), branch="normal")


def test_bad_arguments_name_the_value():
    with pytest.raises(ConfigError, match=r"'vit-tiny' takes no argument\(s\) \['stem'\].*"
                                          r"image_size"):
        build_model("vit-tiny", stem="stl")
    with pytest.raises(ConfigError, match="6 n \\+ 4.*got 30"):
        build_model("wrn-28-10", depth=30)
    with pytest.raises(ConfigError, match="multiple of heads.*dim=16, heads=3"):
        build_model("vit-tiny", dim=16, heads=3)
    with pytest.raises(ConfigError, match="multiple of patch_size.*image_size=30"):
        build_model("vit-tiny", image_size=30, dim=16, heads=2, depth=1)
    with pytest.raises(ConfigError, match="in_channels=2"):
        build_model("resnet50", in_channels=2, width=2)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\].*\(2, 3, 28, 28\)"):
        tiny_model("wrn-28-10", 1, 28)(images(2, 3, 28, seed=0), branch="adv")


def test_single_bn_models_for_the_cl_baseline():
    for name in NAMES:
        model = tiny_model(name, dual_bn=False)
        assert not model.dual_bn and not dual_norm_modules(model), name
        with torch.no_grad():
            assert model.eval()(images(2, 3, 32, seed=0), branch="normal").shape == (2, 8)


# ---- a user's encoder ----------------------------------------------------------------------------

class UserEncoder(nn.Module):
    """A small encoder with a BatchNorm and a LayerNorm, normalising its input itself."""

    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = norm(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        out = torch.relu(self.norm(self.conv(x * 2 - 1)))
        return self.fc(self.ln(out.mean(dim=(2, 3))))


def test_contrastive_model_converts_a_user_encoder_and_trains_it(tmp_path):
    encoder = UserEncoder()
    model = contrastive_model(encoder, head_dim=16)
    assert isinstance(model, ContrastiveModel) and model.backbone is encoder
    assert model.feature_dim == encoder.feature_dim == 12 and model.out_dim == 16
    assert isinstance(encoder.norm, DualBatchNorm2d) and isinstance(encoder.ln, DualLayerNorm)
    assert model.spec is None and model.dual_bn and not can_fold(model)
    x = images(4, 3, 32, seed=0)
    assert model(x, branch="adv").shape == (4, 16)
    assert model(x, branch="normal", return_features=True).shape == (4, 12)

    cfg = acl_air_config()
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    x_orig, x1, x2 = (images(8, 3, 32, seed=i) for i in range(3))
    terms = train_step(model, loss_for(cfg), optimizer, x_orig, x1, x2, cfg, torch.Generator())
    assert all(torch.isfinite(value) for value in terms.values())
    for layer in dual_norm_modules(model):
        for branch in ("normal", "adv"):
            assert layer.branch_module(branch).weight.grad.norm() > 0, (layer, branch)

    path = save_checkpoint(tmp_path / "user.pt", model, method="acl-air")
    assert load_checkpoint(path)["model_spec"] is None
    with pytest.raises(CheckpointError, match="saved from a user module"):
        build_model_from_checkpoint(path)


def test_contrastive_model_without_dual_bn_keeps_the_encoder_norms():
    encoder = UserEncoder()
    model = contrastive_model(encoder, feature_dim=12, head_dim=8, dual_bn=False)
    assert type(encoder.norm) is nn.BatchNorm2d and not model.dual_bn
    with torch.no_grad():
        assert model(images(3, 3, 32, seed=0), branch="normal").shape == (3, 8)


def test_contrastive_model_infers_feature_dim_without_touching_the_statistics():
    encoder = UserEncoder().train()
    contrastive_model(encoder)
    assert encoder.training and encoder.norm.normal.num_batches_tracked == 0


def test_contrastive_model_names_an_unconvertible_norm_and_a_failed_inference():
    with pytest.raises(ConfigError, match=r"'norm' \(InstanceNorm2d"):
        contrastive_model(UserEncoder(lambda c: nn.InstanceNorm2d(c, affine=True)))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(ConfigError, match="pass feature_dim="):
        contrastive_model(mlp)
    assert contrastive_model(mlp, feature_dim=10, head_dim=4).feature_dim == 10
    with pytest.raises(ConfigError, match=r"\[N, feature_dim\]"):
        contrastive_model(nn.Conv2d(3, 4, 3))
