"""Per-image reference of the augmentation, written from torchvision's definitions (loops welcome).

The oracle for tests/data/test_augment.py and the per-image baseline of
benchmarks/bench_augment.py; not used by the library itself. Each function follows the code of
torchvision.transforms (v0.2x, tensor functional) line by line, so that the batched version in
fastacl.data.augmentation is checked against the definition, not against itself:
- crop_box_reference: RandomResizedCrop.get_params (one image, Python loop over attempts);
- resized_crop_reference: F.resized_crop = slice, then F.interpolate(antialias=True) as
  torchvision's tensor resize does by default;
- the adjust_* functions: F_t.adjust_* with torchvision's own _rgb2hsv / _hsv2rgb (the six-sector
  table), not fastacl's closed form;
- augment_reference: the whole pipeline on one image for given parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastacl.data.augmentation import AugmentParams


def crop_box_reference(
    image_size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params for one image: (top, left, height, width)."""
    height, width = image_size
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = math.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item()
        )
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_reference(
    image: torch.Tensor, top: int, left: int, height: int, width: int, size, interpolation: str
) -> torch.Tensor:
    """Crop one float image [C, H, W] and resize it as torchvision's tensor resize (antialias)."""
    crop = image[:, top : top + height, left : left + width]
    out = F.interpolate(
        crop[None], size=size, mode=interpolation, align_corners=False, antialias=True
    )[0]
    return out


def _blend(image1: torch.Tensor, image2: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * image1 + (1.0 - ratio) * image2).clamp(0, 1.0)


def rgb_to_grayscale_reference(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1:
        return image.clone()
    r, g, b = image.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def adjust_brightness_reference(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(image, torch.zeros_like(image), factor)


def adjust_contrast_reference(image: torch.Tensor, factor: float) -> torch.Tensor:
    if image.shape[-3] == 3:
        mean = torch.mean(rgb_to_grayscale_reference(image), dim=(-3, -2, -1), keepdim=True)
    else:
        mean = torch.mean(image, dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


def adjust_saturation_reference(image: torch.Tensor, factor: float) -> torch.Tensor:
    if image.shape[-3] == 1:
        return image
    return _blend(image, rgb_to_grayscale_reference(image), factor)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = hr + hg + hb
    h = torch.fmod((h / 6.0 + 1.0), 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32)
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(dim=-3) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), a4)


def adjust_hue_reference(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    if image.shape[-3] == 1:
        return image
    hsv = _rgb2hsv(image)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + hue_factor) % 1.0
    return _hsv2rgb(torch.stack((h, s, v), dim=-3))


_ADJUST_REFERENCE = (
    adjust_brightness_reference,
    adjust_contrast_reference,
    adjust_saturation_reference,
    adjust_hue_reference,
)


def augment_reference(
    x: torch.Tensor, params: AugmentParams, size=None, interpolation: str = "bicubic"
) -> torch.Tensor:
    """The pipeline image by image for given parameters (the oracle for apply_augment)."""
    if size is None:
        size = (x.shape[-2], x.shape[-1])
    elif isinstance(size, int):
        size = (size, size)
    images = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    outputs = []
    for b in range(x.shape[0]):
        image = resized_crop_reference(
            images[b],
            int(params.top[b]),
            int(params.left[b]),
            int(params.height[b]),
            int(params.width[b]),
            size,
            interpolation,
        ).clamp(0.0, 1.0)
        if params.flip[b]:
            image = image.flip(-1)
        if params.jitter[b]:
            factors = [
                params.brightness[b],
                params.contrast[b],
                params.saturation[b],
                params.hue[b],
            ]
            for op in params.jitter_order[b].tolist():
                image = _ADJUST_REFERENCE[op](image, float(factors[op]))
        if params.grayscale[b] and image.shape[0] == 3:
            image = rgb_to_grayscale_reference(image).expand(3, -1, -1)
        outputs.append(image)
    return torch.stack(outputs)
