"""The vector resize gives Pillow's bytes: every filter it takes, both orders of passes, blocks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from PIL import Image

import consumer.pil_resize as pil_resize
import consumer.resample as resample
from consumer.pil_resize import ResizeCrop
from tests.corpus import photo_array

FILTERS = sorted(pil_resize.VECTOR_FILTERS)

pytestmark = pytest.mark.skipif(
    not pil_resize._VECTOR_MACHINE, reason="Pillow does the resize on this machine"
)


def case(seed: int) -> tuple[Image.Image, ResizeCrop]:
    """A random image (a photo, or pixels of 0 and 255 only, the bicubic's worst overshoot) and
    a random resize of its shorter side and centre crop: down and up, thin and square."""
    rng = random.Random(seed)
    width, height = rng.randint(1, 420), rng.randint(1, 420)
    if rng.random() < 0.5:
        pixels = photo_array(width, height, seed)
    else:
        pixels = np.random.default_rng(seed).choice([0, 255], (height, width, 3)).astype(np.uint8)
    short = rng.randint(4, 300)
    crop = ResizeCrop(short, rng.randint(1, short), rng.randint(1, short), rng.choice(FILTERS))
    return Image.fromarray(pixels), crop


def pillows(image: Image.Image, crop: ResizeCrop) -> tuple[np.ndarray, tuple[int, int], tuple]:
    """Pillow's own resize (one call, its own order of passes) and crop, and the geometry."""
    size, top, left = crop._geometry(*image.size)
    box = (left, top, left + crop.width, top + crop.height)
    return np.asarray(image.resize(size, crop.resample).crop(box)), size, box


def unlike_pillow(seeds: range) -> list[int]:
    unlike = []
    for seed in seeds:
        image, crop = case(seed)
        expected, size, box = pillows(image, crop)
        if size == image.size:
            continue
        vertical_first = pil_resize.pillow_resizes_vertically_first(*image.size, *size)
        got = resample.resize_crop(image, size, box, crop.resample, vertical_first=vertical_first)
        assert got.shape == expected.shape and got.flags.c_contiguous
        if not np.array_equal(got, expected):
            unlike.append(seed)
    return unlike


def test_the_same_bytes_as_pillow_for_random_shapes_and_filters() -> None:
    # GIVEN 400 random images, resizes (down, up, one side only) and crops, every filter taken
    # WHEN the vector passes and Pillow resize and crop each THEN every byte is the same
    assert unlike_pillow(range(400)) == []


def test_blocks_of_a_few_rows_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN blocks of a row or a few (as a 12-megapixel photo's are, against its size)
    monkeypatch.setattr(resample, "_BLOCK_BYTES", 3000)

    # WHEN the same cases run block by block THEN the bytes are Pillow's still
    assert unlike_pillow(range(120)) == []


def test_the_wrong_order_of_passes_gives_other_bytes() -> None:
    # GIVEN an image that Pillow resizes horizontally first, and the vertical pass run first
    image = Image.fromarray(photo_array(500, 375, 3))
    crop = ResizeCrop(168, 160, 160, Image.Resampling.BICUBIC)
    expected, size, box = pillows(image, crop)
    assert not pil_resize.pillow_resizes_vertically_first(*image.size, *size)

    # WHEN the passes run in the other order THEN some pixels differ (each pass rounds to 8
    # bits), so the comparisons above can tell the orders apart
    got = resample.resize_crop(image, size, box, crop.resample, vertical_first=True)
    assert not np.array_equal(got, expected)


def test_weights_sum_to_one_and_end_in_zeros() -> None:
    # 500 -> 224 bicubic: 2.23 input pixels an output, the filter 4.46 wide either side.
    table = resample.weights(500, 224, Image.Resampling.BICUBIC, 0, 224)
    assert table.weights.shape == (224, 11)
    assert table.first[0] == 0 and table.span[0] == 6  # clipped at the left edge
    # Every output's weights sum to one, in 22 fractional bits, within the rounding of each.
    sums = table.weights.sum(axis=1)
    assert np.all(np.abs(sums - (1 << 22)) <= table.span)
    # Past each output's span, zeros.
    taps = np.arange(table.weights.shape[1])
    assert np.all(table.weights[taps[None, :] >= table.span[:, None]] == 0)


def test_weights_of_the_kept_outputs_are_those_of_the_whole_table() -> None:
    whole = resample.weights(500, 224, Image.Resampling.BICUBIC, 0, 224)
    kept = resample.weights(500, 224, Image.Resampling.BICUBIC, 32, 192)
    for mine, theirs in zip(kept, whole, strict=True):
        assert np.array_equal(mine, theirs[32:192])


def test_a_thin_strip_costs_only_the_crop() -> None:
    # GIVEN a 1x3000 strip: its short side to 256 makes it 768,000 rows tall
    image = Image.fromarray(photo_array(1, 3000, 4))
    crop = ResizeCrop(256, 224, 224, Image.Resampling.BICUBIC)
    assert resample.agrees_with_pillow()  # its own weights computed and cached first
    resample.weights.cache_clear()

    # WHEN it is resized and cropped THEN the pixels are Pillow's (its strip-wise passes), and the
    # weights computed and kept are the crop's 224 rows, not the 768,000
    assert np.array_equal(crop.to_array(image), np.asarray(crop(image)))
    assert resample.weights.cache_info().currsize == 2
    down = resample.weights(3000, 768000, Image.Resampling.BICUBIC, 383888, 384112)
    assert down.weights.shape[0] == 224


@pytest.mark.parametrize(
    "resample_filter",
    [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.BOX],
)
def test_to_array_takes_the_vector_passes_for_rgb(
    monkeypatch: pytest.MonkeyPatch, resample_filter: Image.Resampling
) -> None:
    # GIVEN Pillow's path made to fail
    def no_pillow(self: ResizeCrop, image: Image.Image) -> Image.Image:
        raise AssertionError("Pillow's passes ran")

    monkeypatch.setattr(ResizeCrop, "__call__", no_pillow)
    image = Image.fromarray(photo_array(500, 375, 1))

    # WHEN an RGB image is resized and cropped to an array THEN the vector passes did it
    got = ResizeCrop(256, 224, 224, resample_filter).to_array(image)
    assert got.shape == (224, 224, 3)


def test_the_weights_are_checked_against_pillows_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN this Pillow, whose weights the module computes
    resample.agrees_with_pillow.cache_clear()
    assert resample.agrees_with_pillow()

    # WHEN the weights come out one unit off for one shape (as a Pillow built otherwise could)
    real = resample.weights.__wrapped__

    def off_by_one(*args: object) -> resample.Weights:
        table = real(*args)
        if args[:2] == (375, 168):
            table.weights[0, 0] += 1
        return table

    monkeypatch.setattr(resample, "weights", off_by_one)
    resample.agrees_with_pillow.cache_clear()
    try:
        # THEN the check says so, with a warning, and to_array leaves the resize to Pillow
        assert not resample.agrees_with_pillow()
        assert "other weights" in caplog.text
        image = Image.fromarray(photo_array(500, 375, 5))
        crop = ResizeCrop(168, 160, 160, Image.Resampling.BICUBIC)
        assert np.array_equal(crop.to_array(image), np.asarray(crop(image)))
    finally:
        resample.agrees_with_pillow.cache_clear()


def test_loops_compile_without_a_cache_when_it_cannot_be_written(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a cache that cannot be saved (a full disk)
    njit: Any = resample.numba.njit

    def no_cache(*args: Any, cache: bool = False, **options: Any) -> Any:
        if cache:
            raise OSError(28, "No space left on device")
        return njit(*args, cache=cache, **options)

    monkeypatch.setattr(resample.numba, "njit", no_cache)

    # WHEN a kernel is compiled THEN it works uncached, and the log says so
    @resample._compiled([resample.types.void(resample.types.Array(resample.types.uint8, 1, "C"))])
    def fill(out):
        out[:] = 7

    out = np.zeros(5, np.uint8)
    fill(out)
    assert out.tolist() == [7] * 5
    assert "not cached" in caplog.text


@pytest.mark.parametrize(
    ("mode", "resample_filter"),
    [
        ("RGB", Image.Resampling.LANCZOS),  # its weights need sin: libm's, not numpy's
        ("RGB", Image.Resampling.NEAREST),
        ("L", Image.Resampling.BICUBIC),
    ],
)
def test_to_array_leaves_the_rest_to_pillow(mode: str, resample_filter: Image.Resampling) -> None:
    # GIVEN a filter or a mode that the vector passes do not take
    image = Image.fromarray(photo_array(300, 200, 2)).convert(mode)
    crop = ResizeCrop(256, 224, 224, resample_filter)

    # WHEN it is resized and cropped to an array THEN the array is Pillow's
    got = crop.to_array(image)
    assert got.flags.c_contiguous
    assert np.array_equal(got, np.asarray(crop(image)))
