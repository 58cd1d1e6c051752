"""The training set resident on the device, batches drawn by index, views augmented there.

The airbench way (docs/design.md): the uint8 images live in device memory (CIFAR-10 is 150 MB), an
epoch is a torch.Generator permutation, loading a batch is an index_select, and the two random
views are made by `augment` on the device. No DataLoader workers, no PIL, no per-image Python.

When the set does not fit (image folders, ImageNet-size data), it stays in pinned host memory:
a batch is gathered on the host into a pinned buffer and copied with non_blocking=True, and
`iterate` issues the next batch's copy before handing out the current one, so the copy overlaps
the training step. "Fits" means its size is at most `max_fraction` (default half) of the free
device memory (torch.cuda.mem_get_info), leaving the rest for the model and its activations.

    data = DeviceDataset(images, labels, device="cuda")
    for index, batch, labels in data.iterate(512, generator):
        view_1, view_2, originals = data.views(batch, strength, generator)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastacl.data.augmentation import augment

__all__ = ["DeviceDataset", "PLACEMENTS", "choose_placement"]

PLACEMENTS = ("auto", "device", "pinned")


def choose_placement(
    nbytes: int, device: torch.device | str, placement: str = "auto", max_fraction: float = 0.5
) -> str:
    """Where a dataset of `nbytes` goes: "device" (resident) or "pinned" (host, async copies).

    placement "device" / "pinned" forces the choice; "auto" keeps a CPU device's data where it
    is ("device") and puts CUDA data on the GPU when nbytes <= max_fraction * free memory.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    device = torch.device(device)
    if placement != "auto":
        return placement
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= max_fraction * free else "pinned"


class DeviceDataset:
    """A uint8 image set [N, C, H, W] (+ optional labels [N]) served in batches on `device`.

    placement: "auto" (resident if it fits, else pinned host memory), "device" or "pinned"
    (forced; "pinned" on a CPU device keeps the host copy and exercises the same code path).
    `resident` says which was chosen.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        *,
        placement: str = "auto",
        max_fraction: float = 0.5,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W] (as load_dataset returns), got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape [{images.shape[0]}] (one per image), "
                f"got {tuple(labels.shape)}"
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        nbytes = images.numel() * images.element_size()
        self.placement = choose_placement(nbytes, self.device, placement, max_fraction)
        self.resident = self.placement == "device"
        if self.resident:
            self.images = images.to(self.device).contiguous()
        else:
            self.images = images.contiguous()
            # Pinned pages can be copied asynchronously; only a CUDA build can pin.
            if self.device.type == "cuda" and not self.images.is_pinned():
                self.images = self.images.pin_memory()
        # Labels live beside the images, so a batch's labels are gathered with the same index.
        self.labels = None if labels is None else labels.to(self.images.device, torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
        indices: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """One epoch of index batches (int64) in a random order: on `device` when the images
        are resident there, on the host in pinned placement (they address host memory).

        generator: a CPU torch.Generator (the permutation is drawn on the host and copied once
        per epoch); None shuffles with torch's global generator. indices: restrict the epoch to
        these images (e.g. an RCS coreset); default all. drop_last: skip the last partial batch
        (keeps shapes static for CUDA graphs / torch.compile).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator, got one on {generator.device}"
            )
        pool = torch.arange(len(self)) if indices is None else indices.detach().cpu().long()
        if pool.numel() and (pool.min() < 0 or pool.max() >= len(self)):
            raise ValueError(
                f"indices must be in 0..{len(self) - 1}, got {pool.min()}..{pool.max()}"
            )
        order = pool[torch.randperm(pool.numel(), generator=generator)]
        if self.images.device != order.device:  # resident on a GPU: one copy per epoch
            order = order.pin_memory().to(self.images.device, non_blocking=True)
        stop = (order.numel() // batch_size) * batch_size if drop_last else order.numel()
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images at `index` on `device`: a gather (resident) or gather + async copy."""
        if self.resident:
            return self.images.index_select(0, index.to(self.device))
        host_index = index.cpu()  # indices from `batches` are already on the host: no sync
        pinned = self.device.type == "cuda"
        buffer = torch.empty(
            (host_index.numel(), *self.image_shape), dtype=torch.uint8, pin_memory=pinned
        )
        torch.index_select(self.images, 0, host_index, out=buffer)
        # The caching host allocator records this copy, so the buffer is not reused before the
        # copy has finished: safe to drop our reference right away.
        return buffer.to(self.device, non_blocking=pinned)

    def labels_at(self, index: torch.Tensor) -> torch.Tensor | None:
        """The labels at `index` on `device` (None for an unlabeled set)."""
        if self.labels is None:
            return None
        labels = self.labels.index_select(0, index.to(self.labels.device))
        if labels.device != self.device:  # pinned placement: a small async copy
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        return labels

    def iterate(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
        indices: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(index, uint8 images on device, labels or None) per batch of one epoch.

        In pinned placement, batch k+1's copy is issued before batch k is handed out, so the
        host-to-device transfer overlaps the work done on batch k.
        """
        batches = self.batches(batch_size, generator, drop_last, indices)
        upcoming = next(batches, None)
        pending = None if upcoming is None else self.fetch(upcoming)
        while upcoming is not None:
            index, images = upcoming, pending
            upcoming = next(batches, None)
            pending = None if upcoming is None else self.fetch(upcoming)
            yield index, images, self.labels_at(index)

    def views(
        self,
        batch: torch.Tensor,
        strength: float,
        generator: torch.Generator | None = None,
        interpolation: str = "bicubic",
        size: int | tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view 1, view 2, originals) as float32 [0, 1] on `device`.

        batch: an index batch from `batches` (the images are fetched) or the uint8 images that
        `iterate` / `fetch` returned. The two views are independent draws of `augment` at
        strength s, made in one batched call of 2B images; the originals are the images
        unaugmented (x^o in docs/acl-air.md, needed by SIR / AIR).
        """
        images = batch if batch.dim() == 4 else self.fetch(batch)
        views = augment(
            torch.cat([images, images]), strength, generator, interpolation=interpolation, size=size
        )
        view_1, view_2 = views.chunk(2)
        return view_1, view_2, images.to(torch.float32) / 255.0
