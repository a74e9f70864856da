"""Pillow's 8-bit resize, the same integers in vector loops: the decode stage's resize and crop.

Pillow resizes an 8-bit image in separable passes (``libImaging/Resample.c``). For each output
column (row) a pass sums a few input columns (rows), each times a fixed-point weight with 22
fractional bits, adds one half, shifts and clips to 8 bits. The weights come from the filter
evaluated in double precision; every step after that is integer arithmetic. So another
implementation of the same steps, with the weights computed by the same double operations in
the same order, gives the same bytes. The tests compare them with Pillow's, byte for byte.

Pillow's loops go one pixel and one channel at a time: 1.2 ms of a 500x375 JPEG's 1.6 ms resize
to test_vit's size is its horizontal pass. Here a pass adds whole rows of 8-bit lanes into 32-bit
sums, a loop the compiler (numba, LLVM) turns into SIMD instructions; a horizontal pass runs as a
vertical one on the transposed image, and a transpose of 4-byte pixels is one cheap copy. The
work is that of Pillow's passes, on the rows and columns the centre crop keeps.

Integer sums wrap modulo 2**32 in any order, and Pillow's own sums never overflow, so adding four
taps at a time gives Pillow's result exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import types
from PIL import Image

from consumer.pil_resize import SUPPORT, VECTOR_FILTERS

log = logging.getLogger(__name__)

_PRECISION_BITS = 22  # Resample.c: 32 bits, less 8 for the pixel and 2 for the filter's overshoot
# Rows (or columns) of input transposed at a time: a block of about 2 MiB of 4-byte pixels, so a
# 12-megapixel photo needs no full-size copy.
_BLOCK_BYTES = 2 << 20


class Weights(NamedTuple):
    """One pass's weights: output ``i`` reads inputs ``first[i]`` to ``first[i] + span[i] - 1``
    with ``weights[i, :span[i]]`` (zeros after)."""

    first: np.ndarray  # int32 (outputs,)
    span: np.ndarray  # int32 (outputs,)
    weights: np.ndarray  # int32 (outputs, taps)

    def reads(self) -> tuple[int, int]:
        """The input rows ``[start, stop)`` that these outputs read."""
        return int(self.first.min()), int((self.first + self.span).max())


def _filter(resample: Image.Resampling, x: np.ndarray) -> np.ndarray:
    """Resample.c's filter functions, operation for operation."""
    if resample == Image.Resampling.BOX:
        return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)
    a = np.abs(x)
    if resample == Image.Resampling.BILINEAR:
        return np.where(a < 1.0, 1.0 - a, 0.0)
    # Bicubic with a = -0.5; C folds (a + 2.0) and (a + 3.0) to these exact constants.
    near = ((1.5 * a - 2.5) * a) * a + 1
    far = (((a - 5) * a + 8) * a - 4) * -0.5
    return np.where(a < 1.0, near, np.where(a < 2.0, far, 0.0))


# A few hundred outputs each (the crop's), so the cache stays small whatever the images: a
# table for every output of a 1x3000 strip resized to a 256-pixel short side (768,000 rows)
# would hold tens of MB, and the decode processes' address space is capped.
@lru_cache(maxsize=64)
def weights(
    in_size: int, out_size: int, resample: Image.Resampling, start: int, stop: int
) -> Weights:
    """Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` for resizing ``in_size``
    pixels to ``out_size`` (no box) with one of ``VECTOR_FILTERS``, in the same double
    operations and order, for outputs ``start`` to ``stop - 1`` only (each output's weights
    depend on nothing else)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[resample] * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    span = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    tap = np.arange(taps)
    offset = (tap[None, :] + first[:, None]).astype(np.float64)
    w = _filter(resample, ((offset - center[:, None]) + 0.5) * (1.0 / filterscale))
    w = np.where(tap[None, :] < span[:, None], w, 0.0)
    total = np.add.accumulate(w, axis=1)[:, -1:]  # running sums, as Resample.c adds them
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    scaled = w * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5))  # C's (int) cast truncates
    return Weights(first.astype(np.int32), span.astype(np.int32), fixed.astype(np.int32))


@lru_cache(maxsize=1)
def agrees_with_pillow() -> bool:
    """Whether :func:`weights` gives the installed Pillow's weights, checked once a process.

    Pillow resizes a 32-bit image with the same weights in double precision and rounds each
    output as ``normalize_coeffs_8bpc`` rounds a weight; an identity matrix times 2**22 so
    resized gives Pillow's 8-bit weights exactly. A Pillow built to fuse multiplies and adds (a
    distribution's x86-64-v3 build), or one whose filters changed, would show here, and the
    caller then leaves the resize to Pillow.
    """
    for resample in sorted(VECTOR_FILTERS):
        for in_size, out_size in ((500, 224), (375, 168), (257, 256), (37, 300), (7, 3), (300, 1)):
            identity = np.eye(in_size, dtype=np.int32) * (1 << _PRECISION_BITS)
            resized = Image.fromarray(identity).resize((out_size, in_size), resample)
            theirs = np.asarray(resized, dtype=np.int64).T  # (outputs, inputs)
            table = weights(in_size, out_size, resample, 0, out_size)
            ours = np.zeros((out_size, in_size), np.int64)
            for o in range(out_size):
                first, span = int(table.first[o]), int(table.span[o])
                ours[o, first : first + span] = table.weights[o, :span]
            if not np.array_equal(ours, theirs):
                log.warning(
                    "the installed Pillow resizes with other weights: Pillow does the resize",
                    extra={"fields": {"pillow": Image.__version__, "filter": resample.name}},
                )
                return False
    return True


_BYTES = types.Array(types.uint8, 2, "C")
# Pixels straight from Pillow's bytes are read-only; transposed ones are not.
_SOURCES = (_BYTES, types.Array(types.uint8, 2, "C", readonly=True))
_SIGNATURES = [
    types.void(
        source,
        types.Array(types.int32, 1, "C"),
        types.Array(types.int32, 1, "C"),
        types.Array(types.int32, 2, "C"),
        types.int64,
        _BYTES,
        types.int64,
    )
    for source in _SOURCES
]


def _compiled(signatures: Any) -> Callable[[Callable[..., None]], Any]:
    """numba's ``njit`` for these signatures, compiled when this module is imported: from its
    on-disk cache after the first time (about 0.15 s here, against 1.4 s to compile), and the
    fork server that starts the decode processes imports it once for all of them."""

    def compile_(function: Callable[..., None]) -> Any:
        try:
            return numba.njit(signatures, cache=True, nogil=True, boundscheck=False)(function)
        except Exception as exc:
            # No writable place for the cache (RuntimeError), a full disk (OSError), a cache
            # file cut short (EOFError): the loops still compile, only not from or to disk. An
            # import that raised here would take the fork server, and every decode, with it.
            log.warning(
                "the resize's compiled loops are not cached: each process compiles them",
                extra={"fields": {"function": function.__name__, "error": repr(exc)}},
            )
            return numba.njit(signatures, cache=False, nogil=True, boundscheck=False)(function)

    return compile_


@_compiled(_SIGNATURES)
def resample_rows(src, first, span, weights, shift, out, out_lo):
    """``out[o, out_lo + i]`` for every lane ``i`` of ``src``: the 8-bit clip of the weighted
    sum of ``src[first[o] - shift + j, i]`` over taps ``j``, as Resample.c."""
    half = np.int32(1 << (_PRECISION_BITS - 1))
    lanes = src.shape[1]
    acc = np.empty(lanes, np.int32)
    for o in range(out.shape[0]):
        acc[:] = half
        base = first[o] - shift
        taps = span[o]
        j = 0
        # Four taps per sweep of the sums: a quarter of the loads and stores of the sums.
        while j + 3 < taps:
            w0 = np.int32(weights[o, j])
            w1 = np.int32(weights[o, j + 1])
            w2 = np.int32(weights[o, j + 2])
            w3 = np.int32(weights[o, j + 3])
            r0 = src[base + j]
            r1 = src[base + j + 1]
            r2 = src[base + j + 2]
            r3 = src[base + j + 3]
            for i in range(lanes):
                acc[i] = np.int32(
                    acc[i]
                    + np.int32(r0[i]) * w0
                    + np.int32(r1[i]) * w1
                    + np.int32(r2[i]) * w2
                    + np.int32(r3[i]) * w3
                )
            j += 4
        while j < taps:
            w0 = np.int32(weights[o, j])
            r0 = src[base + j]
            for i in range(lanes):
                acc[i] = np.int32(acc[i] + np.int32(r0[i]) * w0)
            j += 1
        # Through a view of the row: indexing ``out[o, out_lo + i]`` here kept LLVM from
        # vectorising the sums above (0.26 ms against 0.09 for a 500x375 horizontal pass).
        row = out[o, out_lo : out_lo + lanes]
        for i in range(lanes):
            v = acc[i] >> _PRECISION_BITS
            row[i] = np.uint8(0 if v < 0 else (255 if v > 255 else v))


@_compiled([types.void(source, types.Array(types.uint8, 3, "C")) for source in _SOURCES])
def _drop_spare(pixels, out):
    """``out[r, c] = pixels[r, 4c : 4c + 3]``: the 4-byte pixels' RGB (numpy's strided copy of
    the same took 0.11 ms for 160x160 pixels, this 0.003)."""
    for r in range(out.shape[0]):
        source = pixels[r]
        target = out[r]
        for c in range(out.shape[1]):
            target[c, 0] = source[4 * c]
            target[c, 1] = source[4 * c + 1]
            target[c, 2] = source[4 * c + 2]


def _pixels(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of an RGB image as ``(rows, columns)`` 32-bit pixels (R, G, B and one spare)."""
    part = image if box == (0, 0, *image.size) else image.crop(box)
    rows, columns = box[3] - box[1], box[2] - box[0]
    return np.frombuffer(part.tobytes("raw", "RGBX"), np.uint32).reshape(rows, columns)


def _swapped(pixels: np.ndarray) -> np.ndarray:
    """4-byte pixels (``uint32``, or their bytes) transposed: ``(columns, rows)`` 32-bit."""
    return np.ascontiguousarray(pixels.view(np.uint32).T)


def resize_crop(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: Image.Resampling,
    *,
    vertical_first: bool,
) -> np.ndarray:
    """``image.resize(size, resample).crop(box)`` as a contiguous ``(height, width, 3)`` uint8
    array, with Pillow's passes in Pillow's order. ``image`` is RGB and ``size`` differs from
    its size; ``box`` (left, top, right, bottom) lies inside ``size``."""
    w, h = image.size
    left, top, right, bottom = box
    across = weights(w, size[0], resample, left, right) if size[0] != w else None
    down = weights(h, size[1], resample, top, bottom) if size[1] != h else None
    if vertical_first:
        out = _vertical_first(image, across, down, box)
    else:
        out = _horizontal_first(image, across, down, box)
    rgb = np.empty((bottom - top, right - left, 3), np.uint8)
    _drop_spare(np.ascontiguousarray(out.view(np.uint8)), rgb)
    return rgb


def _horizontal_first(
    image: Image.Image, across: Weights | None, down: Weights | None, box: tuple[int, int, int, int]
) -> np.ndarray:
    left, top, right, bottom = box
    start, stop = down.reads() if down is not None else (top, bottom)
    if across is None:  # the width stays: the kept columns of the rows the second pass reads
        rows = np.ascontiguousarray(_pixels(image, (left, start, right, stop)))
    else:
        rows = _swapped(_first_pass(image, across, start, stop, horizontal=True))
    if down is None:
        return rows[top - start : bottom - start]
    return _second_pass(rows.view(np.uint8), down, start)  # (kept rows, kept columns * 4)


def _vertical_first(
    image: Image.Image, across: Weights | None, down: Weights | None, box: tuple[int, int, int, int]
) -> np.ndarray:
    left, top, right, bottom = box
    start, stop = across.reads() if across is not None else (left, right)
    if down is None:  # the height stays: the kept rows of the columns the second pass reads
        rows = np.ascontiguousarray(_pixels(image, (start, top, stop, bottom)))
    else:
        rows = _first_pass(image, down, start, stop, horizontal=False).view(np.uint32)
    if across is None:
        return rows[:, left - start : right - start]
    columns = _swapped(rows).view(np.uint8)  # (columns read, kept rows * 4)
    return _swapped(_second_pass(columns, across, start).view(np.uint32))


def _first_pass(
    image: Image.Image, table: Weights, start: int, stop: int, *, horizontal: bool
) -> np.ndarray:
    """The first pass over the image's rows (``horizontal``) or columns ``[start, stop)``, block
    by block: ``(kept outputs, (stop - start) * 4)`` bytes, an output's line across the lanes."""
    w, h = image.size
    out = np.empty((len(table.first), (stop - start) * 4), np.uint8)
    step = max(1, _BLOCK_BYTES // ((w if horizontal else h) * 4))
    for line in range(start, stop, step):
        end = min(line + step, stop)
        if horizontal:  # the rows, transposed: a vertical pass does the horizontal one's work
            block = _swapped(_pixels(image, (0, line, w, end))).view(np.uint8)
        else:
            block = _pixels(image, (line, 0, end, h)).view(np.uint8)
        resample_rows(block, *table, 0, out, (line - start) * 4)
    return out


def _second_pass(lines: np.ndarray, table: Weights, start: int) -> np.ndarray:
    """The second pass over ``lines`` (``(lines read from start, lanes)`` bytes)."""
    out = np.empty((len(table.first), lines.shape[1]), np.uint8)
    resample_rows(lines, *table, start, out, 0)
    return out
