"""Robust contrastive pre-training: ACL, DynACL, ACL-AIR, DynACL-AIR and the SimCLR baseline.

- step.py: one training step (the ACL step and the CL step), no I/O;
- schedule.py: what changes with the epoch (strength s, DynACL's w, lr, RCS rounds);
- loop.py: `train`, the run: set-up, epochs, checkpoints, the closing summary;
- state.py: the run dir, checkpoints and resume, random streams and their seeds;
- speed.py: the compiled attack model and deterministic mode.
"""

from fastacl.pretrain.loop import TrainResult, rank_views, train
from fastacl.pretrain.schedule import augmentation_strength, is_selection_epoch
from fastacl.pretrain.speed import compiled_for_attack, deterministic_mode
from fastacl.pretrain.state import CHECKPOINT_NAME, stream_seed
from fastacl.pretrain.step import acl_step, attack_model, cl_step, loss_for, train_step

__all__ = [
    "CHECKPOINT_NAME",
    "TrainResult",
    "acl_step",
    "attack_model",
    "augmentation_strength",
    "cl_step",
    "compiled_for_attack",
    "deterministic_mode",
    "is_selection_epoch",
    "loss_for",
    "rank_views",
    "stream_seed",
    "train",
    "train_step",
]
