"""Models: backbones with dual batch norm, projection head, BN converter, checkpoints.

    model = fastacl.models.build_model("resnet18")            # paper model, dual BN
    model = fastacl.models.build_model("wrn-28-10")           # any name in MODEL_PRESETS
    model = fastacl.models.contrastive_model(my_encoder)      # a user's encoder, norms made dual
    z_adv = model(x_adv, branch="adv")                        # projection through the adv BNs
    h = model(x, branch="normal", return_features=True)       # 512-d backbone features
    encoder = fastacl.models.encoder_from_branch(model, "adv")  # single-BN copy for downstream
    fastacl.models.save_checkpoint("run/last.pt", model, method="acl", encoder_branch="adv")
"""

from fastacl.models.checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    StateDictMismatchError,
    build_model_from_checkpoint,
    check_weights_only_safe,
    load_checkpoint,
    load_state_dict_strict,
    save_checkpoint,
)
from fastacl.models.contrastive import ContrastiveModel, contrastive_model
from fastacl.models.dual_bn import (
    BRANCHES,
    Branch,
    DualBatchNorm,
    DualBatchNorm1d,
    DualBatchNorm2d,
    DualBatchNorm3d,
    DualGroupNorm,
    DualLayerNorm,
    DualNorm,
    DualRMSNorm,
    DualSyncBatchNorm,
    bn_branch,
    check_branch,
    convert_to_dual_bn,
    dual_bn_modules,
    dual_norm_modules,
    encoder_from_branch,
    has_dual_bn,
)
from fastacl.models.published import (
    build_model_from_published,
    export_published_state_dict,
    import_published_state_dict,
)
from fastacl.models.registry import MODEL_BUILDERS, MODEL_PRESETS, build_model, model_arguments
from fastacl.models.resnet import (
    ContrastiveResNet18,
    ProjectionHead,
    ResNet18Backbone,
    resnet18_acl,
)
from fastacl.models.resnets import ResNetBackbone, resnet34_acl, resnet50_acl
from fastacl.models.vit import ViTBackbone, vit_acl
from fastacl.models.wrn import WideResNetBackbone, wide_resnet_acl

__all__ = [
    "BRANCHES",
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "MODEL_BUILDERS",
    "MODEL_PRESETS",
    "Branch",
    "CheckpointError",
    "ContrastiveModel",
    "ContrastiveResNet18",
    "DualBatchNorm",
    "DualBatchNorm1d",
    "DualBatchNorm2d",
    "DualBatchNorm3d",
    "DualGroupNorm",
    "DualLayerNorm",
    "DualNorm",
    "DualRMSNorm",
    "DualSyncBatchNorm",
    "ProjectionHead",
    "ResNet18Backbone",
    "ResNetBackbone",
    "StateDictMismatchError",
    "ViTBackbone",
    "WideResNetBackbone",
    "bn_branch",
    "build_model",
    "build_model_from_checkpoint",
    "build_model_from_published",
    "check_branch",
    "check_weights_only_safe",
    "contrastive_model",
    "convert_to_dual_bn",
    "dual_bn_modules",
    "dual_norm_modules",
    "encoder_from_branch",
    "export_published_state_dict",
    "has_dual_bn",
    "import_published_state_dict",
    "load_checkpoint",
    "load_state_dict_strict",
    "model_arguments",
    "resnet18_acl",
    "resnet34_acl",
    "resnet50_acl",
    "save_checkpoint",
    "vit_acl",
    "wide_resnet_acl",
]
