"""The ACL / DynACL augmentation (docs/acl-air.md section 1) on a whole batch, on its device.

Per view, in this order, with torchvision's semantics:
  1. RandomResizedCrop(size, scale=(1 - 0.9 s, 1), ratio=(3/4, 4/3))
  2. horizontal flip, p = 0.5 (never annealed)
  3. with probability 0.8 s: ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s), its 4 ops in a random order
  4. grayscale with probability 0.2 s
Output: float32 in [0, 1]. No normalisation (the model normalises internally).

Two steps, so that tests can fix the randomness: `sample_augment_params` draws every random
number of the batch at once (on the host, from a CPU torch.Generator), `apply_augment` applies
them with batched tensor ops on x's device. `augment` is the two in sequence. No per-image loop.

Conventions (where torchvision leaves a choice, or where this differs from it):
- Crop + resize + flip are one separable linear map per image: out = Wy @ x @ Wx^T with per-image
  resampling matrices Wy [size, H], Wx [size, W] built from the crop box (batched matmul). The
  weights are those of PIL's resampling filters, which is also what torchvision's tensor resize
  does by default (F.interpolate with antialias=True): bicubic is Keys' cubic with a = -0.5 (NOT
  the a = -0.75 of F.interpolate(antialias=False) / grid_sample), bilinear is the triangle; the
  filter is widened by the scale when a crop is downscaled (antialiasing, as PIL), taps are
  limited to the crop box and renormalised. Equal to F.interpolate(crop, antialias=True) to
  float32 rounding (tests/data/test_augment.py). The published code resizes PIL uint8 images and
  so rounds to 1/255 after the resize; we keep float32 and clamp to [0, 1] after the resize (the
  bicubic overshoot is clamped, as PIL's uint8 output is).
- Grayscale uses torchvision's tensor weights 0.2989 R + 0.587 G + 0.114 B (PIL: 0.299, 0.587,
  0.114).
- One channel (the MNIST demo set): the crop size is the image size (28); brightness and contrast
  act on the one channel (contrast blends with the image mean), saturation, hue and grayscale are
  the identity (torchvision does the same on a 1-channel tensor). The random draws are the same
  as for RGB, so a seed gives the same crops and flips whatever the channel count.
- Randomness: parameters are drawn from a CPU generator (default: torch's global CPU generator)
  and reach x's device in one packed, pinned, non-blocking copy (plus one for the jitter
  subsets), so a seed gives the same views on CPU and CUDA and the host never waits for the
  device. The per-sample draw follows torchvision's rule in batched form, so the random stream
  differs from torchvision's (same distribution, not the same numbers).
- ColorJitter's random order is vectorised by slots: in slot k, the images whose k-th op is op j
  get op j in one call on that subset (subsets known on the host, so no device sync).
- On a CUDA device the resize matmuls follow torch.backends.cuda.matmul.allow_tf32: if a caller
  enables TF32 the resize is accurate to ~1e-3 instead of ~1e-6 (harmless for augmentation).
- On a CPU, batches are processed in cache-sized chunks (memory-bound elementwise passes run
  ~1.5x faster); on CUDA the whole batch goes at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = [
    "AugmentParams",
    "INTERPOLATIONS",
    "JITTER_OPS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_augment",
    "augment",
    "crop_scale",
    "dynaug_period",
    "dynaug_strength",
    "resampling_matrices",
    "rgb_to_grayscale",
    "sample_augment_params",
    "sample_crop_boxes",
]

INTERPOLATIONS = ("bicubic", "bilinear")
# Order of the ColorJitter ops in AugmentParams.jitter_order (torchvision's fn_idx numbering).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

# torchvision's RandomResizedCrop: ratio range, attempts before the centre-crop fallback.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# rgb_to_grayscale weights of torchvision's tensor functional (ITU-R 601-2 luma, rounded there).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# CPU only: images per chunk so that one chunk's float32 output is about this size (cache-sized).
_CPU_CHUNK_BYTES = 3 * 2**19


# ----------------------------------------------------------------------------------------------
# DynAug schedule (docs/acl-air.md section 1)
# ----------------------------------------------------------------------------------------------
def dynaug_strength(epoch: int, epochs: int, period: int = 50) -> float:
    """DynACL's augmentation strength s(e) = 1 - floor((e - 1) / K) * K / E, for epoch e = 1..E.

    With the published E = 1000, K = 50 it is 1.00 for epochs 1-50, 0.95 for 51-100, ..., 0.05
    for the last 50. Shorter runs keep the shape with K = E / 20 (`dynaug_period(epochs)`).
    ACL uses s = 1 throughout. s is always in (0, 1] because (e - 1) < E.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must be in 1..{epochs} (1-based, as in the papers), got {epoch}")
    if period < 1:
        raise ValueError(f"period must be >= 1 epoch, got {period}; use dynaug_period(epochs)")
    # (E - floor((e - 1) / K) K) / E: the same value, one rounding (0.05, not 0.05000000000000004).
    return (epochs - ((epoch - 1) // period) * period) / epochs


def dynaug_period(epochs: int) -> int:
    """The DynAug period K for an E-epoch run: E / 20 (20 stages), at least 1 (docs/acl-air.md
    section 5)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return max(1, int(epochs / 20 + 0.5))


def crop_scale(strength: float) -> tuple[float, float]:
    """RandomResizedCrop area range at strength s: (1 - 0.9 s, 1)."""
    return (1.0 - 0.9 * strength, 1.0)


# ----------------------------------------------------------------------------------------------
# Random parameters (batched, on the host)
# ----------------------------------------------------------------------------------------------
@dataclass
class AugmentParams:
    """Every random choice of one augmented batch of B images (CPU tensors, one row per image).

    Crop box in input pixels: rows top..top+height-1, columns left..left+width-1.
    jitter_order[b] is the order in which image b gets the 4 ColorJitter ops (indices into
    JITTER_OPS); the factors are used only where `jitter` is True.
    """

    top: torch.Tensor  # int64 [B]
    left: torch.Tensor  # int64 [B]
    height: torch.Tensor  # int64 [B]
    width: torch.Tensor  # int64 [B]
    flip: torch.Tensor  # bool [B]
    jitter: torch.Tensor  # bool [B]: ColorJitter applied (probability 0.8 s)
    brightness: torch.Tensor  # float32 [B], in [1 - 0.4 s, 1 + 0.4 s]
    contrast: torch.Tensor  # float32 [B], in [1 - 0.4 s, 1 + 0.4 s]
    saturation: torch.Tensor  # float32 [B], in [1 - 0.4 s, 1 + 0.4 s]
    hue: torch.Tensor  # float32 [B], in [-0.1 s, 0.1 s]
    jitter_order: torch.Tensor  # int64 [B, 4], each row a permutation of 0..3
    grayscale: torch.Tensor  # bool [B] (probability 0.2 s)

    def __len__(self) -> int:
        return self.top.shape[0]

    def select(self, index) -> AugmentParams:
        """The parameters of a subset of the images (index: slice, bool mask or indices)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength must be in (0, 1] (1 = ACL's full augmentation, DynACL anneals it down "
            f"to 0.05), got {strength}"
        )
    return strength


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator, got one on {generator.device}: augmentation "
            "parameters are drawn on the host (a few numbers per image) and copied to the "
            "images' device, so that a seed gives the same views on every device"
        )


def _uniform(shape, low: float, high: float, generator) -> torch.Tensor:
    """U[low, high) in float64 (torchvision draws float32 and computes in Python floats)."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_crop_boxes(
    batch_size: int,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop.get_params for a whole batch: (top, left, height, width).

    Per image: up to 10 attempts of area fraction ~ U(scale) and aspect ratio ~ logU(ratio),
    w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first attempt with
    0 < w <= W and 0 < h <= H wins and its position is uniform over the valid offsets. If none
    fits, the centre crop of the largest box whose ratio is within `ratio`. All 10 attempts are
    drawn for every image (rejection sampling made branch-free); the result has the same
    distribution as torchvision's loop. Rounding is round-half-to-even as Python's round().
    """
    height, width = image_size
    area = height * width
    attempts = (batch_size, CROP_ATTEMPTS)
    target_area = area * _uniform(attempts, scale[0], scale[1], generator)
    log_ratio = _uniform(attempts, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # First valid attempt per image (argmax returns the first maximum).
    first = valid.long().argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)

    # Fallback when all 10 attempts fail: torchvision's centre crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)

    # Offsets uniform over 0..H-h and 0..W-w (torch.randint's distribution), centre on fallback.
    u = torch.rand((batch_size, 2), generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - h + 1)).long().clamp_(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).long().clamp_(max=width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def sample_augment_params(
    batch_size: int,
    image_size: tuple[int, int],
    strength: float,
    generator: torch.Generator | None = None,
) -> AugmentParams:
    """Draw the random parameters of `batch_size` views at strength s (docs/acl-air.md
    section 1)."""
    strength = _check_strength(strength)
    _check_generator(generator)
    top, left, height, width = sample_crop_boxes(
        batch_size, tuple(image_size), crop_scale(strength), CROP_RATIO, generator
    )
    coins = torch.rand((batch_size, 3), generator=generator)
    flip = coins[:, 0] < 0.5
    jitter = coins[:, 1] < 0.8 * strength
    grayscale = coins[:, 2] < 0.2 * strength
    # ColorJitter(b, c, s, h): factors U[max(0, 1 - b), 1 + b] and U[-h, h] (torchvision).
    magnitude = 0.4 * strength
    factors = _uniform((batch_size, 3), max(0.0, 1.0 - magnitude), 1.0 + magnitude, generator)
    hue = _uniform((batch_size,), -0.1 * strength, 0.1 * strength, generator)
    # A uniformly random permutation of the 4 ops per image: argsort of i.i.d. uniforms.
    jitter_order = torch.rand((batch_size, 4), generator=generator).argsort(dim=1)
    return AugmentParams(
        top=top,
        left=left,
        height=height,
        width=width,
        flip=flip,
        jitter=jitter,
        brightness=factors[:, 0].float(),
        contrast=factors[:, 1].float(),
        saturation=factors[:, 2].float(),
        hue=hue.float(),
        jitter_order=jitter_order,
        grayscale=grayscale,
    )


# ----------------------------------------------------------------------------------------------
# Crop + resize + flip: per-image resampling matrices
# ----------------------------------------------------------------------------------------------
def _cubic_filter(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's BICUBIC; support 2)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle_filter(x: torch.Tensor) -> torch.Tensor:
    """The bilinear (triangle) kernel, support 1."""
    return (1.0 - x.abs()).clamp_(min=0.0)


# Kernel and its support (half-width in input pixels before stretching), per interpolation.
_FILTERS = {"bicubic": (_cubic_filter, 2.0), "bilinear": (_triangle_filter, 1.0)}


def resampling_matrices(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    interpolation: str,
    reverse: torch.Tensor | None = None,
    taps: int | None = None,
) -> torch.Tensor:
    """[B, out_size, in_size] float32 matrices M with (M @ line) = the crop
    line[start : start + length] resized to out_size, as PIL and torchvision's tensor resize
    (F.interpolate(antialias=True, align_corners=False)) resize it.

    Output pixel o samples the crop at centre c = scale (o + 0.5), scale = length / out_size; crop
    pixel t gets weight filter((t + 0.5 - c) / max(scale, 1)) (the filter is stretched when
    downscaling: antialiasing), pixels outside the crop get 0, and each row is normalised to 1
    (the taps cut at the crop edge are renormalised, as PIL does). Only the `taps` pixels under
    the filter are evaluated, then scattered into the dense matrix.
    start, length: int tensors [B] on the device the matrices are built on. reverse: optional
    bool [B]; where True the output order is reversed (the horizontal flip). taps: pixels under
    the widest filter; pass it from host-side lengths to avoid reading `length` back from a GPU.
    """
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    kernel, support = _FILTERS[interpolation]
    if taps is None:
        taps = _filter_taps(int(length.max()) if length.numel() else 1, out_size, interpolation)
    device = start.device
    length = length.to(torch.float64)
    scale = length / out_size
    stretch = scale.clamp(min=1.0)[:, None, None]
    output_pixel = torch.arange(out_size, device=device, dtype=torch.float64).expand(len(scale), -1)
    if reverse is not None:
        output_pixel = torch.where(reverse[:, None], out_size - 1 - output_pixel, output_pixel)
    centre = (scale[:, None] * (output_pixel + 0.5))[:, :, None]
    # First crop pixel under the filter (PIL's xmin), then `taps` consecutive pixels.
    first = torch.floor(centre - support * stretch + 0.5).clamp_(min=0.0)
    crop_pixel = first + torch.arange(taps, device=device, dtype=torch.float64)
    weights = kernel((crop_pixel + 0.5 - centre) / stretch)
    weights = weights * (crop_pixel < length[:, None, None])
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # Taps past the crop have weight 0; clamping their index keeps the scatter in bounds.
    index = (start.to(torch.float64)[:, None, None] + crop_pixel).clamp_(max=in_size - 1).long()
    matrices = torch.zeros(start.shape[0], out_size, in_size, device=device, dtype=torch.float32)
    return matrices.scatter_add_(2, index, weights.to(torch.float32))


def _filter_taps(longest: int, out_size: int, interpolation: str) -> int:
    """Input pixels under the filter for the most downscaled crop (a crop of `longest` pixels)."""
    support = _FILTERS[interpolation][1]
    return math.ceil(2.0 * support * max(longest / out_size, 1.0)) + 1


# ----------------------------------------------------------------------------------------------
# ColorJitter and grayscale: torchvision's tensor semantics, one factor per image
# ----------------------------------------------------------------------------------------------
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] -> [n, 1, H, W] luma (torchvision's weights); a 1-channel image is its own."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply by the factor (blend with black), clamp to [0, 1]."""
    return (x * _per_image(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean of the image's grayscale version (a constant image), clamp."""
    factor = _per_image(factor)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (factor * x + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image, clamp; the identity on one channel."""
    if x.shape[1] == 1:
        return x
    factor = _per_image(factor)
    return (factor * x + (1.0 - factor) * rgb_to_grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue: RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB; identity on one channel.

    The hue is torchvision's (_rgb2hsv, same tie-breaking between equal channels). The way back
    uses that a hue rotation keeps v = max and chroma = max - min: in sixths of a turn, h6 = 6 h
    in [0, 6),
      channel_n = v - chroma * ramp(n + h6),  n = 5, 3, 1 for R, G, B,
    with ramp(k) = clamp(min(k, 4 - k), 0, 1) taken mod 6: the closed form of torchvision's
    six-sector table (equal up to float rounding). As k = n + h6 lies in [1, 11), the periodic
    ramp is the two bumps centred at 2 and 8: ramp = clamp(2 - ||k - 5| - 3|, 0, 1), so the
    modulo is taken once on the hue plane, not on three channels. About a third of the passes
    of the table form (and no max-with-indices).
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    divisor = torch.where(chroma == 0, 1.0, chroma)
    red_max = value == r
    green_max = (value == g) & ~red_max
    # torchvision's three cases (max in R, else in G, else in B), in sixths of a turn.
    hue6 = torch.where(
        red_max,
        (g - b) / divisor,
        torch.where(green_max, 2.0 + (b - r) / divisor, 4.0 + (r - g) / divisor),
    )
    hue6 = torch.remainder(hue6 + 6.0 * shift.view(-1, 1, 1), 6.0)
    # k - 5 for the R, G, B sectors n = 5, 3, 1.
    # (arange, not torch.tensor: building a constant from a list is a blocking copy on a GPU)
    offsets = torch.arange(0.0, -6.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k_minus_5 = offsets + hue6.unsqueeze(1)
    ramp = (2.0 - (k_minus_5.abs_() - 3.0).abs_()).clamp_(0.0, 1.0)
    # Between min and max by construction: no clamp needed.
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without making the host wait for the device's queue (pinned + async)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# Column layout of the per-image parameters packed for one host -> device copy.
_PACKED = ("top", "left", "height", "width", "flip", "grayscale") + JITTER_OPS


def _pack(params: AugmentParams, device: torch.device) -> dict[str, torch.Tensor]:
    """All per-image parameters on `device` in one copy (float64 holds the ints exactly)."""
    packed = torch.stack([getattr(params, name).to(torch.float64) for name in _PACKED], dim=1)
    columns = _to_device(packed, device).unbind(dim=1)
    on_device = dict(zip(_PACKED, columns, strict=True))
    for name in ("top", "left", "height", "width"):
        on_device[name] = on_device[name].long()
    for name in ("flip", "grayscale"):
        on_device[name] = on_device[name] != 0
    for name in JITTER_OPS:
        on_device[name] = on_device[name].to(torch.float32)
    return on_device


def _jitter_subsets(params: AugmentParams, device: torch.device) -> list[list[torch.Tensor]]:
    """subsets[slot][op]: indices of the jittered images whose slot-th ColorJitter op is op.

    Computed on the host, where the parameters live, and sent in one copy: selecting them on
    the device would need a device -> host read of their sizes (a synchronisation).
    """
    chosen = [
        torch.nonzero(params.jitter & (params.jitter_order[:, slot] == op))[:, 0]
        for slot in range(4)
        for op in range(4)
    ]
    sizes = [len(c) for c in chosen]
    flat = _to_device(torch.cat(chosen), device).split(sizes)
    return [list(flat[4 * slot : 4 * slot + 4]) for slot in range(4)]


def _color_jitter(
    x: torch.Tensor, factors: dict[str, torch.Tensor], subsets: list[list[torch.Tensor]]
) -> torch.Tensor:
    """ColorJitter on the jittered images, each with its own op order, in place.

    Vectorised by slots: in slot k, the images whose k-th op is op j get op j, as one batched
    call on that subset; so each op runs once per jittered image.
    """
    for slot_subsets in subsets:
        for op, chosen in enumerate(slot_subsets):
            if chosen.numel() == 0:
                continue
            factor = factors[JITTER_OPS[op]].index_select(0, chosen)
            x.index_copy_(0, chosen, _JITTER_FUNCTIONS[op](x.index_select(0, chosen), factor))
    return x


def apply_augment(
    x: torch.Tensor,
    params: AugmentParams,
    size: int | tuple[int, int] | None = None,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Apply given parameters to a batch: crop + resize + flip, ColorJitter, grayscale.

    x: uint8 [B, C, H, W] (0..255) or float [B, C, H, W] in [0, 1], C = 1 or 3, on any device.
    params: from sample_augment_params (CPU tensors). size: output size (int or (h, w)); default
    the input size (32 for CIFAR, 96 for STL-10, 28 for the MNIST demo set).
    Returns float32 [B, C, size, size] in [0, 1] on x's device.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"x must be a batch [B, C, H, W] with C = 1 or 3 channels, got shape {tuple(x.shape)}"
        )
    if len(params) != x.shape[0]:
        raise ValueError(f"params are for {len(params)} images, the batch has {x.shape[0]}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if size is None:
        size = (x.shape[-2], x.shape[-1])
    elif isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    if x.shape[0] == 0:
        return torch.empty((0, x.shape[1], *size), device=x.device)
    if x.device.type == "cpu" and x.shape[0] > 1:
        # On a CPU the elementwise passes are memory-bound: chunks whose float32 views stay in
        # the cache run ~1.5x faster than the whole batch (measured: 32 x 32, 128 images).
        per_image = 4 * x.shape[1] * max(size[0] * size[1], x.shape[-2] * x.shape[-1])
        chunk = max(1, _CPU_CHUNK_BYTES // per_image)
        if chunk < x.shape[0]:
            return torch.cat(
                [
                    _apply(
                        x[i : i + chunk], params.select(slice(i, i + chunk)), size, interpolation
                    )
                    for i in range(0, x.shape[0], chunk)
                ]
            )
    return _apply(x, params, size, interpolation)


def _apply(
    x: torch.Tensor, params: AugmentParams, size: tuple[int, int], interpolation: str
) -> torch.Tensor:
    device = x.device
    on_device = _pack(params, device)
    # Crop + resize + flip: out = Wy @ x @ Wx^T with per-image resampling matrices.
    rows = resampling_matrices(
        on_device["top"],
        on_device["height"],
        x.shape[-2],
        size[0],
        interpolation,
        taps=_filter_taps(int(params.height.max()), size[0], interpolation),
    )
    columns = resampling_matrices(
        on_device["left"],
        on_device["width"],
        x.shape[-1],
        size[1],
        interpolation,
        reverse=on_device["flip"],
        taps=_filter_taps(int(params.width.max()), size[1], interpolation),
    )
    if x.dtype == torch.uint8:
        rows = rows.mul_(1.0 / 255.0)  # uint8 -> [0, 1] folded into the matrix (saves a pass)
    out = torch.matmul(
        torch.matmul(rows[:, None], x.to(torch.float32)), columns.transpose(1, 2)[:, None]
    )
    # The cubic overshoots; PIL's uint8 output is clamped, and ColorJitter expects [0, 1].
    out = out.clamp_(0.0, 1.0)
    if bool(params.jitter.any()):
        out = _color_jitter(out, on_device, _jitter_subsets(params, device))
    if out.shape[1] == 3 and bool(params.grayscale.any()):
        gray = on_device["grayscale"][:, None, None, None]
        out = torch.where(gray, rgb_to_grayscale(out).expand_as(out), out)
    return out


def augment(
    x: torch.Tensor,
    strength: float,
    generator: torch.Generator | None = None,
    interpolation: str = "bicubic",
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """One random view per image of the batch x (docs/acl-air.md section 1 at strength s), on x's
    device.

    x: uint8 [B, C, H, W] or float in [0, 1] (CPU or CUDA); strength: s in (0, 1];
    generator: a CPU torch.Generator (None: torch's global one); interpolation: "bicubic" (the AIR
    code; PIL's a = -0.5) or "bilinear" (the DynACL code); size: output size, default the input's.
    Returns float32 [B, C, size, size] in [0, 1]. See the module docstring for the conventions.
    """
    params = sample_augment_params(x.shape[0], (x.shape[-2], x.shape[-1]), strength, generator)
    return apply_augment(x, params, size=size, interpolation=interpolation)
