"""timm's eval resize and centre crop in Pillow alone, for processes that must not import torch.

A decode process that imports torch costs seconds to start and hundreds of MB of address space,
which would make a memory limit on it meaningless. For the transform nearly every timm model
uses (``crop_mode`` center, a square resize target, ``crop_pct`` <= 1) this module does exactly
what torchvision's ``Resize(int)`` and ``CenterCrop`` do on a PIL image: the same output size
arithmetic, the same Pillow resampling call, the same crop box, so the pixels are identical (the
tests compare them with :func:`consumer.preprocess.pil_stages` byte for byte). Any other
transform returns ``None`` from :func:`plain_stages` and the caller uses timm's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

# torchvision's InterpolationMode names, as timm's data config spells them, to Pillow's filters.
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True, slots=True)
class ResizeCrop:
    """Resize the shorter side to ``short`` with ``resample``, then crop ``height`` x ``width``."""

    short: int
    height: int
    width: int
    resample: Image.Resampling

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w <= h:
            size = (self.short, int(self.short * h / w))
        else:
            size = (int(self.short * w / h), self.short)
        if size != (w, h):  # torchvision returns the image itself when nothing changes
            image = image.resize(size, self.resample)
        w, h = image.size
        top = round((h - self.height) / 2.0)
        left = round((w - self.width) / 2.0)
        return image.crop((left, top, left + self.width, top + self.height))


def plain_stages(
    input_size: tuple[int, int, int], interpolation: str, crop_pct: float, crop_mode: str
) -> Callable[[Image.Image], Image.Image] | None:
    """The torch-free equivalent of timm's eval transform for these settings, or ``None``."""
    _, height, width = input_size
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    resample = _FILTERS.get(interpolation)
    if (
        crop_mode not in ("center", "")
        or scale[0] != scale[1]
        or resample is None
        or scale[0] < max(height, width)  # crop_pct > 1 pads in torchvision: not handled here
    ):
        return None
    return ResizeCrop(scale[0], height, width, resample)
