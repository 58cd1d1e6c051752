"""Datasets in their real on-disk formats, the embedded demo set, GPU-batched augmentation."""
