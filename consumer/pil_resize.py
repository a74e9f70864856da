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
        top = round((size[1] - self.height) / 2.0)
        left = round((size[0] - self.width) / 2.0)
        if size == (w, h):  # torchvision returns the image itself when nothing changes
            return image.crop((left, top, left + self.width, top + self.height))
        if self.resample == Image.Resampling.NEAREST:  # one lookup per pixel, not two passes
            image = image.resize(size, self.resample)
            return image.crop((left, top, left + self.width, top + self.height))
        # Pillow resizes in two separable passes, horizontal then vertical, each rounding to
        # 8 bits; done as two calls, the columns the crop drops leave between the passes and the
        # vertical pass (a third of the work) does only the ones kept. The pixels are those of
        # the one call (the passes are the same code on the same rows), without its waste.
        if size[0] != w:
            image = image.resize((size[0], h), self.resample)
        image = image.crop((left, 0, left + self.width, h))
        if size[1] != h:
            image = image.resize((self.width, size[1]), self.resample)
        return image.crop((0, top, self.width, top + self.height))


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
