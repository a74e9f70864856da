"""timm's eval resize and centre crop in Pillow alone, for processes that must not import torch.

A decode process that imports torch costs seconds to start and hundreds of MB of address space,
which would make a memory limit on it meaningless. For the transform nearly every timm model
uses (``crop_mode`` center, a square resize target, ``crop_pct`` <= 1) this module does exactly
what torchvision's ``Resize(int)`` and ``CenterCrop`` do on a PIL image: the same output size
arithmetic, the same Pillow resampling passes in Pillow's order, the same crop box, so the pixels
are identical (the tests compare them with :func:`consumer.preprocess.pil_stages` byte for
byte). Any other transform returns ``None`` from :func:`plain_stages` and the caller uses timm's
own.

The decode paths call :meth:`ResizeCrop.to_array`, which runs the same passes in
:mod:`consumer.resample` (Pillow's integer arithmetic in vector loops, a fifth of the CPU) for
an RGB image and a filter whose weights it computes exactly, and Pillow's otherwise.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL
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
# The largest strip of input copied out to spare a pass the rest. Here a 10 MiB strip (a
# 2000x1500 photo's) copied in 0.4 to 0.8 ms and saved 0.8 to 3.7 ms of resampling; strips of
# 31 to 41 MiB (a 12-megapixel photo's) took 2 to 22 ms, as the allocator reused memory or
# faulted in fresh pages, and could cost more than they saved.
_MAX_STRIP_BYTES = 16 << 20
# Each filter's support in input pixels at scale 1 (libImaging/Resample.c).
SUPPORT = {
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}


def _vertical_first_rule(version: str) -> Callable[[int, int, int, int], bool] | None:
    """Whether this Pillow's one resize call runs its vertical pass first, by release.

    The passes' order changes the pixels (each pass rounds to 8 bits), and Pillow chooses it:
    up to 12.1, horizontal first always; 13.0's ``ImagingResampleInner`` goes vertical first
    when the height shrinks by more than twice as many pixels as the width, which is every
    photo over twice as tall as wide (a phone's screenshot) resized to a short side. Any other
    release (12.2 and 12.3 send images over 100 times taller than wide vertically first, from
    Python; later ones are not known yet) gets ``None``: one call, exact and slower.
    """
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) == (13, 0):
        return lambda w, h, out_w, out_h: h - out_h > 0 and h - out_h > 2 * (w - out_w)
    if (major, minor) < (12, 2) and major >= 11:
        return lambda w, h, out_w, out_h: False
    return None


_VERTICAL_FIRST = _vertical_first_rule(PIL.__version__)
ArrayStages = Callable[[Image.Image], np.ndarray]
# The filters whose weights consumer.resample computes as Pillow does (plain arithmetic: the
# others use sin, whose last bit may differ between libm and numpy), on the machines whose Pillow
# wheels round after every operation: x86-64's are built for the baseline instruction set, which
# has no fused multiply-add; elsewhere (aarch64) the C compiler may fuse.
VECTOR_FILTERS = frozenset(
    {Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}
)
_VECTOR_MACHINE = platform.machine().lower() in ("x86_64", "amd64")


def pillow_resizes_vertically_first(
    width: int, height: int, out_width: int, out_height: int
) -> bool:
    """Whether the installed Pillow resizes ``width`` x ``height`` to the output size vertical
    pass first (False where its rule is not known: horizontal first, as Pillow long did)."""
    return _VERTICAL_FIRST is not None and _VERTICAL_FIRST(width, height, out_width, out_height)


@dataclass(frozen=True, slots=True)
class ResizeCrop:
    """Resize the shorter side to ``short`` with ``resample``, then crop ``height`` x ``width``.

    Pillow resizes in two separable passes, each rounding to 8 bits, and each output row of
    the horizontal pass (column of the vertical) depends only on the same row (column) of its
    input. Done as separate calls in Pillow's own order, the passes do only what the centre
    crop keeps: the first runs on the strip of input that the kept outputs of the second
    read (a portrait photo's horizontal pass skips a third of its rows), the second only on
    the kept rows or columns. The pixels are those of the one call, byte for byte.
    """

    short: int
    height: int
    width: int
    resample: Image.Resampling

    def _geometry(self, w: int, h: int) -> tuple[tuple[int, int], int, int]:
        """torchvision's resize target for a ``w`` x ``h`` image and the crop's top and left."""
        if w <= h:
            size = (self.short, int(self.short * h / w))
        else:
            size = (int(self.short * w / h), self.short)
        return size, round((size[1] - self.height) / 2.0), round((size[0] - self.width) / 2.0)

    @property
    def vectorised(self) -> bool:
        """Whether :meth:`to_array` can resize RGB images with :mod:`consumer.resample` (which
        then also checks, once, that its weights are the installed Pillow's)."""
        return self.resample in VECTOR_FILTERS and _VECTOR_MACHINE and _VERTICAL_FIRST is not None

    def load_vector_passes(self) -> None:
        """Load :mod:`consumer.resample` (its compiled loops, and its check against Pillow)
        now, where :meth:`to_array` will use it: at start-up, not under the first image, and
        in a decode process before its address space is capped."""
        if self.vectorised:
            from consumer import resample

            resample.agrees_with_pillow()

    def to_array(self, image: Image.Image) -> np.ndarray:
        """``np.asarray(self(image))``, a contiguous ``(height, width, 3)`` uint8 array: for an
        RGB image and the filters whose weights :mod:`consumer.resample` computes as Pillow
        does, by its vector passes (the same bytes, about a fifth of the CPU); else by Pillow."""
        w, h = image.size
        size, top, left = self._geometry(w, h)
        rule = _VERTICAL_FIRST
        if image.mode == "RGB" and size != (w, h) and self.vectorised and rule is not None:
            # Here, not at the top: numba costs a process about 114 MiB, and the consumer's own
            # process imports this module without resizing (the decode processes do).
            from consumer import resample

            if resample.agrees_with_pillow():
                box = (left, top, left + self.width, top + self.height)
                return resample.resize_crop(
                    image, size, box, self.resample, vertical_first=rule(w, h, *size)
                )
        return np.ascontiguousarray(np.asarray(self(image), dtype=np.uint8))

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        size, top, left = self._geometry(w, h)
        if size == (w, h):  # torchvision returns the image itself when nothing changes
            return image.crop((left, top, left + self.width, top + self.height))
        if self.resample == Image.Resampling.NEAREST or _VERTICAL_FIRST is None:
            # Nearest is one lookup per pixel, not two passes; an unknown Pillow, one call.
            image = image.resize(size, self.resample)
            return image.crop((left, top, left + self.width, top + self.height))
        if _VERTICAL_FIRST(w, h, *size):
            return self._vertical_first(image, size, top, left)
        return self._horizontal_first(image, size, top, left)

    def _horizontal_first(
        self, image: Image.Image, size: tuple[int, int], top: int, left: int
    ) -> Image.Image:
        w, h = image.size
        first, last = self._strip(h, size[1], top, self.height, across=w)
        if size[0] != w:
            if (first, last) != (0, h):
                image = image.crop((0, first, w, last))
            image = image.resize((size[0], last - first), self.resample)
            # The kept columns at full height again, as the vertical pass's coefficients need;
            # the rows outside the strip are zeros that no kept output row reads.
            image = image.crop((left, -first, left + self.width, h - first))
        else:
            image = image.crop((left, 0, left + self.width, h))
        if size[1] != h:
            image = image.resize((self.width, size[1]), self.resample)
        return image.crop((0, top, self.width, top + self.height))

    def _vertical_first(
        self, image: Image.Image, size: tuple[int, int], top: int, left: int
    ) -> Image.Image:
        w, h = image.size  # the height shrinks: Pillow's rule says so
        first, last = self._strip(w, size[0], left, self.width, across=h)
        if (first, last) != (0, w):
            image = image.crop((first, 0, last, h))
        image = image.resize((last - first, size[1]), self.resample)
        # The kept rows at full width again (columns outside the strip are zeros never read).
        image = image.crop((-first, top, w - first, top + self.height))
        if size[0] != w:
            image = image.resize((size[0], self.height), self.resample)
        return image.crop((left, 0, left + self.width, self.height))

    def _strip(
        self, in_size: int, out_size: int, first: int, count: int, *, across: int
    ) -> tuple[int, int]:
        """The input rows (or columns) ``[start, stop)`` that the second pass reads for its kept
        outputs ``first`` to ``first + count - 1``; all ``in_size`` of them where the strip,
        ``across`` pixels long, would cost more to copy out than it saves."""
        if out_size == in_size:  # that side keeps its size: the kept outputs are the inputs
            start, stop = first, first + count
        else:
            start, stop = _inputs_read(in_size, out_size, first, count, SUPPORT[self.resample])
        if (stop - start) * across * 4 > _MAX_STRIP_BYTES:  # Pillow stores RGB in 4 bytes
            return 0, in_size
        return start, stop


def _inputs_read(
    in_size: int, out_size: int, first: int, count: int, support: float
) -> tuple[int, int]:
    """The input rows (or columns) ``[start, stop)`` that Pillow's resampling of ``in_size`` to
    ``out_size`` reads for outputs ``first`` to ``first + count - 1``.

    Pillow's own arithmetic (``precompute_coeffs`` in libImaging/Resample.c: the filter centred
    at ``(i + 0.5) * scale``, its support widened by the scale when downsampling, the ends
    rounded and clipped), widened by one either side so that a Pillow built with other
    floating-point contractions cannot read outside the strip.
    """
    scale = in_size / out_size
    reach = support * max(scale, 1.0)
    start = int((first + 0.5) * scale - reach + 0.5)
    stop = int((first + count - 0.5) * scale + reach + 0.5)
    return max(start - 1, 0), min(stop + 1, in_size)


def array_stages(stages: Callable[[Image.Image], Image.Image]) -> ArrayStages:
    """``stages`` (a :class:`ResizeCrop` or timm's own) ending in the contiguous uint8 array."""
    if isinstance(stages, ResizeCrop):
        stages.load_vector_passes()
        return stages.to_array
    return lambda image: np.ascontiguousarray(np.asarray(stages(image), dtype=np.uint8))


def plain_stages(
    input_size: tuple[int, int, int], interpolation: str, crop_pct: float, crop_mode: str
) -> ResizeCrop | None:
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
