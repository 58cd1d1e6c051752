"""Datasets in their real on-disk formats, the embedded demo set, GPU-batched augmentation.

from fastacl.data import load_dataset, DeviceDataset, augment, dynaug_strength
images, labels = load_dataset("cifar10", "~/data")           # uint8 [N, 3, 32, 32], int64 [N]
data = DeviceDataset(images, labels, device="cuda")          # resident (or pinned fallback)
for index, batch, labels in data.iterate(512, generator):
    view_1, view_2, originals = data.views(batch, dynaug_strength(epoch, epochs, period),
                                           generator)
"""

from fastacl.data.augmentation import (
    INTERPOLATIONS,
    AugmentParams,
    apply_augment,
    augment,
    dynaug_period,
    dynaug_strength,
    sample_augment_params,
)
from fastacl.data.datasets import DATASETS, SPLITS, default_data_dir, load_dataset
from fastacl.data.sampler import DeviceDataset, choose_placement

__all__ = [
    "DATASETS",
    "INTERPOLATIONS",
    "SPLITS",
    "AugmentParams",
    "DeviceDataset",
    "apply_augment",
    "augment",
    "choose_placement",
    "default_data_dir",
    "dynaug_period",
    "dynaug_strength",
    "load_dataset",
    "sample_augment_params",
]
