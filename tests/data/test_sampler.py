"""fastacl.data.DeviceDataset: shuffled index batches, the device-resident path and the pinned
host fallback (forced on CPU, and the placement decision with a mocked free-memory query)."""

import pytest
import torch

from fastacl.data import DeviceDataset, augment, choose_placement


def _data(n=50, channels=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def test_an_epoch_visits_every_image_once_in_a_seeded_order():
    images, labels = _data()
    data = DeviceDataset(images, labels)
    batches = list(data.batches(16, torch.Generator().manual_seed(1), drop_last=False))
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    order = torch.cat(batches)
    assert torch.equal(order.sort().values, torch.arange(50))
    assert not torch.equal(order, torch.arange(50))
    again = torch.cat(list(data.batches(16, torch.Generator().manual_seed(1), drop_last=False)))
    assert torch.equal(order, again)
    dropped = list(data.batches(16, torch.Generator().manual_seed(1)))
    assert [len(b) for b in dropped] == [16, 16, 16]  # drop_last keeps shapes static


def test_batches_restricted_to_a_subset():
    data = DeviceDataset(*_data())
    subset = torch.tensor([3, 7, 11, 19, 23, 42])
    seen = torch.cat(
        list(data.batches(4, torch.Generator().manual_seed(2), drop_last=False, indices=subset))
    )
    assert torch.equal(seen.sort().values, subset)
    with pytest.raises(ValueError, match=r"indices must be in 0..49, got 3..50"):
        next(data.batches(4, indices=torch.tensor([3, 50])))


def test_iterate_returns_the_images_and_labels_of_each_index():
    images, labels = _data()
    data = DeviceDataset(images, labels)
    for index, batch, batch_labels in data.iterate(8, torch.Generator().manual_seed(3)):
        assert torch.equal(batch, images[index]) and torch.equal(batch_labels, labels[index])


def test_forced_pinned_fallback_gives_the_same_batches_and_views():
    """The host path (gather into a buffer, async copy, one batch of look-ahead) serves exactly
    what the resident path serves."""
    images, labels = _data(channels=3, size=16)
    resident = DeviceDataset(images, labels)
    host = DeviceDataset(images, labels, placement="pinned")
    assert resident.resident and not host.resident and host.placement == "pinned"
    first = list(resident.iterate(12, torch.Generator().manual_seed(4)))
    second = list(host.iterate(12, torch.Generator().manual_seed(4)))
    assert len(first) == len(second) == 4
    for (i1, b1, l1), (i2, b2, l2) in zip(first, second, strict=True):
        assert torch.equal(i1, i2) and torch.equal(b1, b2) and torch.equal(l1, l2)
    views_1 = resident.views(first[0][0], 0.5, torch.Generator().manual_seed(5))
    views_2 = host.views(second[0][0], 0.5, torch.Generator().manual_seed(5))
    for a, b in zip(views_1, views_2, strict=True):
        assert torch.equal(a, b)


def test_views_are_two_independent_augmentations_and_the_originals():
    images, labels = _data(n=20, channels=1, size=28)
    data = DeviceDataset(images, labels)
    index = next(data.batches(10, torch.Generator().manual_seed(6)))
    view_1, view_2, originals = data.views(index, 1.0, torch.Generator().manual_seed(7))
    assert view_1.shape == view_2.shape == originals.shape == (10, 1, 28, 28)
    assert view_1.dtype == originals.dtype == torch.float32
    assert not torch.equal(view_1, view_2)
    assert torch.equal(originals, images[index].float() / 255)
    # One call on 2B images: the first B are what augment makes of the batch with that seed.
    both = augment(torch.cat([images[index]] * 2), 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(view_1, both[:10]) and torch.equal(view_2, both[10:])
    same = data.views(images[index], 1.0, torch.Generator().manual_seed(7))  # uint8 images
    assert torch.equal(same[0], view_1)


def test_placement_decision(monkeypatch):
    gib = 2**30
    assert choose_placement(10 * gib, "cpu") == "device"  # a CPU keeps its data where it is
    assert choose_placement(10, "cpu", "pinned") == "pinned"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    assert choose_placement(3 * gib, "cuda:0") == "device"  # CIFAR-size: resident
    assert choose_placement(5 * gib, "cuda:0") == "pinned"  # over half the free memory
    assert choose_placement(5 * gib, "cuda:0", max_fraction=0.9) == "device"
    assert choose_placement(50 * gib, "cuda:0", "device") == "device"  # forced
    with pytest.raises(
        ValueError, match=r"placement must be one of \('auto', 'device', 'pinned'\)"
    ):
        choose_placement(1, "cpu", "gpu")


def test_constructor_errors():
    images, labels = _data()
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, C, H, W\].*torch.float32"):
        DeviceDataset(images.float(), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \[50\]"):
        DeviceDataset(images, labels[:10])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(DeviceDataset(images).batches(0))


@pytest.mark.gpu
def test_cuda_resident_and_pinned_paths_agree():
    images, labels = _data(n=64, size=32)
    resident = DeviceDataset(images, labels, device="cuda")
    host = DeviceDataset(images, labels, device="cuda", placement="pinned")
    assert resident.images.is_cuda and host.images.is_pinned()
    for (i1, b1, _), (i2, b2, _) in zip(
        resident.iterate(16, torch.Generator().manual_seed(8)),
        host.iterate(16, torch.Generator().manual_seed(8)),
        strict=True,
    ):
        assert b1.is_cuda and b2.is_cuda and torch.equal(i1, i2) and torch.equal(b1, b2)
