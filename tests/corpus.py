"""A corpus of images for tests: realistic photos, every Pillow mode, and hostile inputs.

Everything is generated in memory from fixed seeds, so the corpus is the same on every machine
and needs no files in the repository.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image


def photo_array(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, photo-like ``(height, width, 3)`` uint8 array: gradients, blobs and grain.

    Real photos are mostly low-frequency; pure noise would make every resize and JPEG test
    meaningless (and JPEG files unrealistically large).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.3)
        wave = np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        ramp = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
        channels.append(0.5 + 0.3 * wave + 0.2 * ramp)
    image = np.stack(channels, axis=-1)
    for _ in range(4):  # a few soft blobs, like objects in a scene
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(-0.4, 0.4, size=3)
    image += rng.normal(0, 0.02, size=image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


@cache
def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG of the given size (cached: tests ask for the same ones often)."""
    return encode(Image.fromarray(photo_array(width, height, seed)), "JPEG", quality=quality)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved in ``fmt`` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(width: int = 64, height: int = 48, seed: int = 7) -> Image.Image:
    return Image.fromarray(photo_array(width, height, seed))


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 64x48 JPEG whose EXIF says to rotate it (6: 90 degrees clockwise, so 48x64 upright)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(_photo(), "JPEG", quality=95, exif=exif.tobytes())


def gray16_png(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``values`` (uint16)."""
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def animated_gif() -> bytes:
    """Three frames: red, green, blue; decoders must return the red first frame."""
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "lime", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height``, with almost no pixels.

    The file a decompression bomb starts with: the decoder must refuse it from the header alone.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rgba_png() -> bytes:
    rgba = _photo().convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    return encode(rgba, "PNG")


def _palette_transparent_png() -> bytes:
    image = _photo().quantize(16)
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


def _build_good() -> dict[str, bytes]:
    photo = _photo()
    gray = photo.convert("L")
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64)
    return {
        "rgb.jpg": encode(photo, "JPEG", quality=90),
        "gray.jpg": encode(gray, "JPEG", quality=90),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=90),
        "progressive.jpg": encode(photo, "JPEG", quality=85, progressive=True),
        "exif-rotated.jpg": exif_rotated_jpeg(),
        "rgb.png": encode(photo, "PNG"),
        "gray.png": encode(gray, "PNG"),
        "gray-alpha.png": encode(gray.convert("LA"), "PNG"),
        "palette.png": encode(photo.quantize(64), "PNG"),
        "palette-transparent.png": _palette_transparent_png(),
        "rgba.png": _rgba_png(),
        "gray16.png": gray16_png(ramp),
        "bilevel.png": encode(gray.convert("1"), "PNG"),
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"),
        "animated.gif": animated_gif(),
        "rgb.webp": encode(photo, "WEBP", quality=90),
        "rgba.webp": encode(photo.convert("RGBA"), "WEBP", lossless=True),
        "rgb.bmp": encode(photo, "BMP"),
        "rgb.tiff": encode(photo, "TIFF"),
        "cmyk.tiff": encode(photo.convert("CMYK"), "TIFF"),
    }


def _build_bad() -> dict[str, tuple[bytes, str]]:
    jpeg = photo_jpeg(320, 240, seed=11)
    png = encode(_photo(160, 120, seed=12), "PNG")
    return {
        "text.jpg": (b"hello, this is a text file and not an image\n" * 3, "not-an-image"),
        "empty.jpg": (b"", "not-an-image"),
        "html.png": (b"<!doctype html><html><body>404 Not Found</body></html>", "not-an-image"),
        "bad-header.png": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8, "not-an-image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) * 2 // 3], "truncated"),
        "icon.ico": (encode(_photo(32, 32), "ICO"), "unsupported-format"),
        "document.pdf": (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
            "unsupported-format",
        ),
        "bomb-20000x20000.png": (png_header(20_000, 20_000), "too-large"),
        "bomb-12000x10000.png": (png_header(12_000, 10_000), "too-large"),
    }


GOOD_CASES: dict[str, bytes] = _build_good()
"""Every mode and format the consumer accepts, each small; all must decode to RGB."""

BAD_CASES: dict[str, tuple[bytes, str]] = _build_bad()
"""Hostile or broken inputs, each with the ``error-code`` the contract gives it."""
