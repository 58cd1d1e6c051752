"""fastacl.data.augmentation: the batched pipeline against the per-image definitions (fixed
parameters), and the random parameters against the rates of docs/acl-air.md section 1
(statistical, 5 sigma)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastacl.data import augmentation as A
from fastacl.data.reference import (
    adjust_hue_reference,
    augment_reference,
    crop_box_reference,
)

STRENGTHS = (1.0, 0.5, 0.1)
SIGMAS = 5.0


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_rate(observed: torch.Tensor, p: float):
    """A Bernoulli(p) sample's mean within 5 binomial standard deviations of p."""
    n = observed.numel()
    rate = observed.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= SIGMAS * sigma, f"rate {rate:.4f}, expected {p:.4f} +- {sigma:.4f}"


# ----------------------------------------------------------------------------------------------
# Fixed parameters: batched == per-image reference from the definitions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "channels, image, size, dtype",
    [
        (3, 16, 16, torch.uint8),
        (3, 32, 32, torch.uint8),  # 300 images of 32 x 32: split into CPU chunks
        (3, 13, 21, torch.float32),  # odd sizes, upscaling output, float input
        (3, 24, 10, torch.uint8),  # downscaling: the antialiasing filter
        (1, 28, 28, torch.uint8),  # the MNIST demo set
    ],
)
def test_apply_equals_per_image_reference(channels, image, size, dtype, interpolation):
    g = _generator(channels * 1000 + image)
    n = 300
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, channels, image, image), dtype=torch.uint8, generator=g)
    else:
        x = torch.rand((n, channels, image, image), generator=g)
    params = A.sample_augment_params(n, (image, image), 1.0, g)
    # Every branch is exercised: some images jittered, flipped, grayscale, some not.
    assert params.flip.any() and (~params.flip).any() and params.jitter.any()
    assert params.grayscale.any() and (~params.jitter).any()
    got = A.apply_augment(x, params, size=size, interpolation=interpolation)
    expected = augment_reference(x, params, size=size, interpolation=interpolation)
    assert got.shape == (n, channels, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resampling_matrices_equal_interpolate_with_antialias(interpolation):
    """Rows of the matrix = torchvision's resize of the crop (F.interpolate, antialias=True):
    PIL's filters, a = -0.5 for bicubic; crops up- and downscaled, including 1-pixel crops."""
    g = _generator(1)
    for in_size, out_size in [(32, 32), (9, 23), (40, 16), (5, 5)]:
        length = torch.randint(1, in_size + 1, (64,), generator=g)
        start = (torch.rand(64, generator=g) * (in_size - length + 1)).long()
        matrices = A.resampling_matrices(start, length, in_size, out_size, interpolation)
        line = torch.rand(in_size, in_size, generator=g, dtype=torch.float64)
        for b in range(64):
            crop = line[:, start[b] : start[b] + length[b]]
            expected = F.interpolate(
                crop[None, None], size=(in_size, out_size), mode=interpolation, antialias=True
            )[0, 0]
            got = line.float() @ matrices[b].T
            torch.testing.assert_close(got, expected.float(), atol=3e-6, rtol=0)


def test_bicubic_is_not_the_a075_convention():
    """The documented choice: PIL's a = -0.5, which differs from F.interpolate's a = -0.75."""
    g = _generator(2)
    x = torch.rand(1, 1, 8, 8, generator=g)
    full = torch.tensor([0])
    rows = A.resampling_matrices(full, torch.tensor([5]), 8, 16, "bicubic")
    out = rows[0] @ x[0, 0] @ rows[0].T  # crop rows/columns 0..4 upscaled to 16 x 16
    crop = x[..., :5, :5]
    pil = F.interpolate(crop, size=(16, 16), mode="bicubic", antialias=True)[0, 0]
    tensor = F.interpolate(crop, size=(16, 16), mode="bicubic", antialias=False)[0, 0]
    assert (out - pil).abs().max() < 1e-5
    assert (out - tensor).abs().max() > 1e-3


def test_hue_equals_torchvision_including_ties():
    """The closed-form HSV -> RGB against torchvision's six-sector table, over many hues and
    the tie cases (two channels at the max, gray pixels, black)."""
    g = _generator(3)
    x = torch.rand(64, 3, 8, 8, generator=g)
    x[:8, 1] = x[:8, 0]  # R == G
    x[8:16, 2] = x[8:16, 1]  # G == B
    x[16:24, :] = x[16:24, :1]  # gray
    x[24:28] = 0.0  # black
    x[28:32, 0] = 1.0
    shifts = torch.linspace(-0.5, 0.5, 64)
    shifts[:32] = torch.linspace(-0.1, 0.1, 32)
    got = A.adjust_hue(x, shifts)
    expected = torch.stack([adjust_hue_reference(x[b], float(shifts[b])) for b in range(64)])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


def test_one_channel_jitter_is_brightness_and_contrast_only():
    """On one channel saturation, hue and grayscale are the identity; brightness multiplies,
    contrast blends with the image mean (torchvision's behaviour on 1-channel tensors)."""
    g = _generator(4)
    x = torch.rand(16, 1, 28, 28, generator=g)
    factor = torch.full((16,), 1.3)
    assert torch.equal(A.adjust_saturation(x, factor), x)
    assert torch.equal(A.adjust_hue(x, torch.full((16,), 0.1)), x)
    assert torch.equal(A.rgb_to_grayscale(x), x)
    torch.testing.assert_close(A.adjust_brightness(x, factor), (1.3 * x).clamp(0, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(A.adjust_contrast(x, factor), (1.3 * x - 0.3 * mean).clamp(0, 1))
    out = A.augment(x, 1.0, g)
    assert out.shape == (16, 1, 28, 28)  # the crop size of the demo set is its image size


def test_crop_boxes_stay_inside_and_fall_back_like_torchvision():
    """Boxes are inside the image with the rule's sizes; where no attempt can fit (a very wide
    or tall image at small s), every box is torchvision's centre-crop fallback."""
    for height, width in [(8, 8), (8, 40), (40, 8)]:
        for strength in STRENGTHS:
            scale = A.crop_scale(strength)
            top, left, h, w = A.sample_crop_boxes(
                500, (height, width), scale, generator=_generator()
            )
            assert (h >= 1).all() and (w >= 1).all()
            assert (top >= 0).all() and (top + h <= height).all()
            assert (left >= 0).all() and (left + w <= width).all()
            reference = {
                crop_box_reference((height, width), scale, generator=_generator(seed))
                for seed in range(500)
            }
            sizes = set(zip(h.tolist(), w.tolist(), strict=True))
            assert sizes <= _possible_sizes(height, width, scale) | {b[2:] for b in reference}
    # 8 x 40 at s = 0.1: area >= 0.91 * 320 with ratio <= 4/3 needs h >= 14 > 8: never fits.
    fallback = crop_box_reference((8, 40), A.crop_scale(0.1))
    assert fallback == (0, 14, 8, 11)  # height 8, width round(8 * 4/3), centred
    boxes = torch.stack(A.sample_crop_boxes(100, (8, 40), A.crop_scale(0.1)), dim=1)
    assert (boxes == torch.tensor(fallback)).all()
    boxes = torch.stack(A.sample_crop_boxes(100, (40, 8), A.crop_scale(0.1)), dim=1)
    assert (boxes == torch.tensor(crop_box_reference((40, 8), A.crop_scale(0.1)))).all()


def _possible_sizes(height, width, scale):
    """The (h, w) torchvision's rule can return: a fine grid over (area, log-ratio) + fallback."""
    sizes = {(height, width)}
    area = height * width
    for a in np.linspace(scale[0], scale[1], 400):
        for lr in np.linspace(math.log(3 / 4), math.log(4 / 3), 400):
            w = round(math.sqrt(area * a * math.exp(lr)))
            h = round(math.sqrt(area * a / math.exp(lr)))
            if 0 < w <= width and 0 < h <= height:
                sizes.add((h, w))
    if width / height < 3 / 4:
        sizes.add((round(width / (3 / 4)), width))
    elif width / height > 4 / 3:
        sizes.add((height, round(height * 4 / 3)))
    return sizes


# ----------------------------------------------------------------------------------------------
# Statistics of the random parameters (thousands of samples, 5 sigma)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("image_size", [(8, 8), (8, 12)])
def test_crop_size_distribution_matches_reference_rule(strength, image_size):
    """Small images, where rounding matters: the distribution of (h, w) of the batched rule
    equals that of torchvision's per-image loop (each cell within 5 sigma), and offsets are
    uniform over the valid positions."""
    n = 4000
    scale = A.crop_scale(strength)
    g = _generator(10)
    reference = [crop_box_reference(image_size, scale, generator=g) for _ in range(n)]
    ref_sizes = [(h, w) for _, _, h, w in reference]
    top, left, h, w = A.sample_crop_boxes(n, image_size, scale, generator=_generator(11))
    sizes = list(zip(h.tolist(), w.tolist(), strict=True))
    for cell in set(ref_sizes) | set(sizes):
        p1 = sizes.count(cell) / n
        p2 = ref_sizes.count(cell) / n
        pooled = (p1 + p2) / 2
        sigma = math.sqrt(max(pooled * (1 - pooled), 1 / n) * 2 / n)
        assert abs(p1 - p2) <= SIGMAS * sigma, f"size {cell}: {p1:.4f} vs reference {p2:.4f}"
    # Offsets: (top + 0.5) / (H - h + 1) ~ U(0, 1) where there is room to move.
    room = (image_size[0] - h) > 0
    if room.sum() > 500:
        u = (top[room] + 0.5) / (image_size[0] - h[room] + 1)
        assert abs(u.mean().item() - 0.5) <= SIGMAS * math.sqrt(1 / 12 / room.sum().item())


@pytest.mark.parametrize("strength", STRENGTHS)
def test_crop_area_distribution_matches_the_spec(strength):
    """A large image (rounding negligible): area fraction ~ U(1 - 0.9 s, 1) accepted with
    probability P(|log r| <= -log a) = min(1, -log a / log(4/3)), up to 10 attempts, else the
    full image. Histogram and fallback rate against that density, 5 sigma per bin."""
    n = 20000
    side = 1000
    low = 1.0 - 0.9 * strength
    top, left, h, w = A.sample_crop_boxes(n, (side, side), (low, 1.0), generator=_generator(12))
    area = (h * w).double() / side**2
    fallback = (h == side) & (w == side)

    grid = np.linspace(low, 1.0, 200001)
    accept = np.minimum(1.0, -np.log(grid) / math.log(4 / 3))
    p_attempt = np.trapezoid(accept, grid) / (1.0 - low)
    p_fallback = (1.0 - p_attempt) ** 10
    _assert_rate(fallback, p_fallback)

    edges = np.linspace(low, 1.0, 11)
    accepted = area[~fallback].numpy()
    for lo_edge, hi_edge in zip(edges[:-1], edges[1:], strict=True):
        inside = (grid >= lo_edge) & (grid <= hi_edge)
        p_bin = np.trapezoid(accept[inside], grid[inside]) / np.trapezoid(accept, grid)
        observed = ((accepted >= lo_edge) & (accepted < hi_edge)).mean()
        sigma = math.sqrt(p_bin * (1 - p_bin) / len(accepted)) + 2e-3  # + rounding of h, w
        assert abs(observed - p_bin) <= SIGMAS * sigma, (lo_edge, observed, p_bin)
    ratio = (w.double() / h.double())[~fallback]
    assert ratio.min() >= 0.75 - 2e-3 and ratio.max() <= 4 / 3 + 2e-3


@pytest.mark.parametrize("strength", STRENGTHS)
def test_flip_jitter_grayscale_rates_and_factor_ranges(strength):
    n = 20000
    params = A.sample_augment_params(n, (8, 8), strength, _generator(13))
    _assert_rate(params.flip, 0.5)
    _assert_rate(params.jitter, 0.8 * strength)
    _assert_rate(params.grayscale, 0.2 * strength)
    magnitude = 0.4 * strength
    for name in ("brightness", "contrast", "saturation"):
        factor = getattr(params, name).double()
        assert factor.min() >= 1 - magnitude - 1e-6 and factor.max() <= 1 + magnitude + 1e-6
        # U(1 - m, 1 + m): mean 1, variance (2m)^2 / 12.
        sd = 2 * magnitude / math.sqrt(12)
        assert abs(factor.mean().item() - 1.0) <= SIGMAS * sd / math.sqrt(n)
        assert abs(factor.std().item() - sd) <= 0.05 * sd
    hue = params.hue.double()
    assert hue.abs().max() <= 0.1 * strength + 1e-7
    assert abs(hue.mean().item()) <= SIGMAS * (0.2 * strength / math.sqrt(12)) / math.sqrt(n)
    # The order of the 4 ops: each of the 24 permutations with probability 1/24.
    orders = params.jitter_order
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    sigma = math.sqrt(n * (1 / 24) * (23 / 24))
    assert (counts.double() - n / 24).abs().max() <= SIGMAS * sigma


@pytest.mark.parametrize("strength", STRENGTHS)
def test_rates_measured_on_the_outputs(strength):
    """Flip, jitter and grayscale detected from the augmented images agree image by image with
    the drawn parameters (so their rates are the documented ones, tested above)."""
    n = 3000
    g = _generator(14)
    params = A.sample_augment_params(n, (8, 8), strength, g)
    # A gray horizontal ramp in [0.2, 0.6]: crops keep it increasing, brightness / contrast keep
    # its order and do not clamp it, hue and saturation leave gray alone; a flip reverses it.
    ramp = torch.linspace(0.2, 0.6, 8).expand(n, 3, 8, 8).contiguous()
    out = A.apply_augment(ramp, params, interpolation="bilinear")
    flipped = out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)
    assert torch.equal(flipped, params.flip)

    colours = torch.rand(n, 3, 8, 8, generator=g)
    out = A.apply_augment(colours, params)
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert torch.equal(gray, params.grayscale)

    no_jitter = params.select(slice(None))
    no_jitter.jitter = torch.zeros_like(params.jitter)
    plain = A.apply_augment(colours, no_jitter)
    jittered = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-5
    assert torch.equal(jittered, params.jitter)


# ----------------------------------------------------------------------------------------------
# API: reproducibility, devices, errors, the DynAug schedule
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_views_and_output_range():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    first = A.augment(x, 0.7, _generator(5))
    second = A.augment(x, 0.7, _generator(5))
    other = A.augment(x, 0.7, _generator(6))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.min() >= 0 and first.max() <= 1


def test_output_size_option():
    x = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    assert A.augment(x, 1.0, _generator(), size=32).shape == (4, 3, 32, 32)
    assert A.augment(x, 1.0, _generator(), size=(40, 24)).shape == (4, 3, 40, 24)
    assert A.augment(x[:0], 1.0, _generator(), size=32).shape == (0, 3, 32, 32)


def test_errors_name_the_bad_value_and_the_choices():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\].*got 1.5"):
        A.augment(x, 1.5)
    with pytest.raises(ValueError, match="bicubic.*bilinear.*'nearest'"):
        A.augment(x, 1.0, interpolation="nearest")
    with pytest.raises(ValueError, match="C = 1 or 3 channels, got shape"):
        A.augment(torch.zeros(2, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="epoch must be in 1..10"):
        A.dynaug_strength(0, 10)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            A.augment(x, 1.0, torch.Generator(device="cuda"))


def test_dynaug_strength_schedule():
    """docs/acl-air.md section 1: 1.00 for epochs 1-50, 0.95 for 51-100, ..., 0.05 for 951-1000."""
    assert A.dynaug_strength(1, 1000) == 1.0
    assert A.dynaug_strength(50, 1000) == 1.0
    assert A.dynaug_strength(51, 1000) == 0.95
    assert A.dynaug_strength(1000, 1000) == 0.05
    stages = {A.dynaug_strength(e, 1000) for e in range(1, 1001)}
    assert len(stages) == 20 and min(stages) == 0.05
    # Short runs keep the shape with K = E / 20.
    assert A.dynaug_period(100) == 5 and A.dynaug_period(10) == 1
    assert A.dynaug_strength(100, 100, A.dynaug_period(100)) == 0.05
    assert all(0 < A.dynaug_strength(e, 7, A.dynaug_period(7)) <= 1 for e in range(1, 8))


@pytest.mark.gpu
def test_cuda_equals_cpu_for_the_same_parameters():
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    params = A.sample_augment_params(256, (32, 32), 1.0, _generator(7))
    cpu = A.apply_augment(x, params)
    cuda = A.apply_augment(x.cuda(), params)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
    same_seed = A.augment(x.cuda(), 1.0, _generator(7))
    torch.testing.assert_close(same_seed.cpu(), cpu, atol=1e-4, rtol=0)
