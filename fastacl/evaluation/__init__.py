"""Downstream evaluation of a pre-trained encoder (docs/acl-air.md sections 7 and 8).

    result = fastacl.evaluate("runs/acl/checkpoint.pt", modes=("slf", "alf", "aff"),
                              attacks=("pgd20", "autoattack"), max_test=500)
    result["modes"]["slf"]["autoattack_accuracy"]

Three fine-tuning protocols, each on a fresh copy of the pre-trained weights (a mode never sees
another mode's state, so the order in which modes run changes nothing; docs/acl-air.md section
10):
- SLF: the encoder of the branch the checkpoint records ("adv" for the ACL family, "normal" for
  "cl"), frozen in eval mode, and a zero-initialised Linear(feature_dim, C) trained on clean
  images with cross-entropy;
- ALF: the same, trained on PGD-10 examples of the whole network;
- AFF: the whole dual-BN backbone (the normal branch starts from the pre-trained normal BNs, the
  adv branch from the adv ones) plus a zero-initialised linear head, trained with TRADES
  (beta 6; natural pass through "normal", adversarial pass through "adv"), then tested through
  the adv branch.
All train with SGD (momentum 0.9, weight decay 2e-4), MultiStepLR (gamma 0.1) and a batched
RandomCrop + flip; the last-epoch network is tested. Test metrics: clean accuracy, PGD-20 and
AutoAttack robust accuracy, counted as correct clean AND under attack (so robust <= clean), and
the accuracy on CIFAR-10-C / CIFAR-100-C when those files are in the data dir.

Presets: "paper" is the published per-method table (docs/acl-air.md section 8) with standard
AutoAttack; "demo" (the default for the embedded mnist5k) trains a few epochs (ALF / AFF on a
2,000-image subset) and runs AutoAttack's APGD-CE alone, because standard AutoAttack costs about
10 s per robust point on a 2-core CPU (see AUTOATTACK_PRESETS); the results say which was run.

The attack budget is the one the checkpoint records (the demo's eps 0.15 on MNIST, 8/255 on
CIFAR / STL) unless `eps` overrides it. Every attack step is eps / 4 (2/255 at 8/255, the
published value). The "++" post-processing (docs/acl-air.md section 7: k-means pseudo-labels,
linear probe, TRADES on the pseudo-labels) is `post_process`, or `evaluate(...,
post_process=True)`.

Determinism: on the CPU a given (checkpoint, settings, seed) gives the same numbers on every run
and in any mode order; every random draw comes from a generator seeded by (seed, mode), all
derived in protocols.py. On a GPU cuDNN's convolution algorithms may differ between runs, so the
last digits can move.

`quick_check` is the short SLF check the trainer runs at the end of every run.

Modules: protocols (tables, hyper-parameters, seeds), networks (the classifiers), fine_tuning (the
fine-tuning loop), robustness (clean / PGD-20 / AutoAttack testing), corruptions, postprocess
("++"), pretrained (checkpoint loading), driver (`evaluate`), quick (the trainer's check).
"""

from fastacl.evaluation.corruptions import (
    STANDARD_CORRUPTIONS,
    check_corruptions,
    corruption_accuracy,
    find_corruptions,
)
from fastacl.evaluation.driver import evaluate
from fastacl.evaluation.fine_tuning import finetune, random_crop_flip
from fastacl.evaluation.networks import (
    DualBNClassifier,
    LinearClassifier,
    aff_network,
    frozen_encoder,
    linear_network,
)
from fastacl.evaluation.postprocess import kmeans, post_process
from fastacl.evaluation.pretrained import Pretrained, load_pretrained
from fastacl.evaluation.protocols import (
    ATTACKS,
    AUTOATTACK_PRESETS,
    MODES,
    PRESETS,
    FinetuneSettings,
    PostProcessSettings,
    finetune_settings,
    post_process_settings,
)
from fastacl.evaluation.quick import quick_check, train_linear_probe
from fastacl.evaluation.robustness import test_network

__all__ = [
    "ATTACKS",
    "AUTOATTACK_PRESETS",
    "MODES",
    "PRESETS",
    "STANDARD_CORRUPTIONS",
    "DualBNClassifier",
    "FinetuneSettings",
    "LinearClassifier",
    "PostProcessSettings",
    "Pretrained",
    "aff_network",
    "check_corruptions",
    "corruption_accuracy",
    "evaluate",
    "find_corruptions",
    "finetune",
    "finetune_settings",
    "frozen_encoder",
    "kmeans",
    "linear_network",
    "load_pretrained",
    "post_process",
    "post_process_settings",
    "quick_check",
    "random_crop_flip",
    "test_network",
    "train_linear_probe",
]
