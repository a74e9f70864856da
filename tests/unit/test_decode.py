"""Decoding hostile bytes to RGB: every mode right, every bad input refused with its code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from consumer.decode import DecodeLimits, decode_image, sniff_format, to_rgb
from consumer.errors import PermanentError
from tests.corpus import (
    BAD_CASES,
    GOOD_CASES,
    animated_gif,
    encode,
    exif_rotated_jpeg,
    gray16_png,
    photo_array,
    photo_jpeg,
)

LIMITS = DecodeLimits()


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_every_accepted_mode_decodes_to_rgb_of_its_size(name: str) -> None:
    image = decode_image(GOOD_CASES[name], LIMITS)

    assert image.mode == "RGB"
    expected = {"one-pixel.png": (1, 1), "animated.gif": (32, 32), "exif-rotated.jpg": (48, 64)}
    assert image.size == expected.get(name, (64, 48))


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_every_bad_input_is_refused_with_its_code(name: str) -> None:
    data, code = BAD_CASES[name]

    with pytest.raises(PermanentError) as caught:
        decode_image(data, LIMITS)

    assert caught.value.error_code == code
    assert caught.value.detail  # a reason a person can act on, never empty
    assert "\n" not in caught.value.detail


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)

    pixels = np.asarray(decode_image(gray16_png(values), LIMITS))

    expected = np.rint(values / 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey stays grey


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # invisible: must become the white page
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque: kept

    pixels = np.asarray(decode_image(encode(rgba, "PNG"), LIMITS))

    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [10, 20, 30]


def test_half_transparent_grey_alpha_blends() -> None:
    la = Image.new("LA", (1, 1), (0, 128))

    pixel = np.asarray(decode_image(encode(la, "PNG"), LIMITS))[0, 0]

    assert abs(int(pixel[0]) - 127) <= 1


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)

    pixels = np.asarray(decode_image(encode(image, "PNG", transparency=0), LIMITS))

    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [200, 0, 0]


def test_animation_yields_its_first_frame() -> None:
    pixel = np.asarray(decode_image(animated_gif(), LIMITS))[16, 16]

    assert pixel.tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    upright = np.asarray(decode_image(exif_rotated_jpeg(orientation=6), LIMITS))
    stored = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg(orientation=6))).convert("RGB"))

    # Orientation 6 means "rotate 90 degrees clockwise to view": the stored pixels turned.
    assert upright.shape == (64, 48, 3)
    assert np.array_equal(upright, np.rot90(stored, k=-1))


def test_cmyk_comes_back_close_to_the_rgb_it_was_made_from() -> None:
    rgb = Image.fromarray(photo_array(64, 48, seed=3))

    decoded = decode_image(encode(rgb.convert("CMYK"), "TIFF"), LIMITS)

    diff = np.abs(np.asarray(decoded, dtype=int) - np.asarray(rgb, dtype=int))
    assert diff.max() <= 1


def test_float_images_in_unit_range_are_scaled() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))

    pixels = np.asarray(to_rgb(image))[0, :, 0]

    assert pixels.tolist() == [0, 128, 255]


def test_byte_limit_is_checked_before_parsing() -> None:
    data = photo_jpeg(64, 48, seed=1)

    with pytest.raises(PermanentError) as caught:
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))

    assert caught.value.error_code == "too-large"


def test_pixel_limit_comes_from_the_configuration() -> None:
    data = photo_jpeg(64, 48, seed=1)

    with pytest.raises(PermanentError) as caught:
        decode_image(data, DecodeLimits(max_pixels=64 * 48 - 1))
    decode_image(data, DecodeLimits(max_pixels=64 * 48))  # exactly at the limit is fine

    assert caught.value.error_code == "too-large"
    assert "64x48" in caught.value.detail


def test_a_format_left_off_the_allowed_list_is_unsupported() -> None:
    with pytest.raises(PermanentError) as caught:
        decode_image(photo_jpeg(64, 48, seed=1), DecodeLimits(formats=("PNG",)))

    assert caught.value.error_code == "unsupported-format"
    assert "JPEG" in caught.value.detail


def test_draft_scales_only_large_jpegs_and_keeps_at_least_the_target() -> None:
    large = photo_jpeg(2000, 1500, seed=5)
    small = photo_jpeg(500, 375, seed=5)

    drafted = decode_image(large, LIMITS, draft_size=(256, 256))
    untouched = decode_image(small, LIMITS, draft_size=(256, 256))

    assert drafted.size == (500, 375)  # 1/4 scale: the smallest still >= 256 on both sides
    assert untouched.size == (500, 375)
    assert decode_image(large, LIMITS).size == (2000, 1500)


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"%PDF-1.7", "PDF"),
        (b"\x00\x00\x00\x18ftypheic", "HEIF"),
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"just text", None),
    ],
)
def test_sniff_names_formats_from_their_signature(head: bytes, name: str | None) -> None:
    assert sniff_format(head) == name
