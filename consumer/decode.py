"""Decode: encoded image bytes to one RGB Pillow image, or a permanent failure with its reason.

Everything here treats the bytes as hostile. The object size and the header's pixel count are
checked before a single pixel is decoded (decompression bombs), only an allowed list of Pillow
plugins is ever asked to parse the data, truncated files are rejected rather than padded with grey,
and every mode Pillow can return is turned into RGB on purpose (16-bit scaled, alpha composited),
never by a conversion that silently clips or drops information.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from consumer.errors import PermanentError

# The formats the producer's default suffixes name. Anything else is refused before parsing:
# every extra plugin is extra attack surface (and some, like EPS, shell out to Ghostscript).
# (Multi-picture JPEGs from phones open through the JPEG plugin and report format "MPO".)
# AVIF comes before HEIF: both plugins accept the generic "mif1" brand, and only Pillow's AVIF
# plugin can decode AV1 (pillow-heif's libheif is built without it), while the AVIF plugin
# declines an HEVC file and lets the HEIF one have it.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")

# Register every plugin once, up front: Image.open(formats=...) looks names up in the registry,
# and WebP, TIFF and AVIF register only on a full init.
Image.init()


def _register_phone_formats() -> None:
    """HEIC/HEIF through pillow-heif, and one decoder thread per image for HEIF and AVIF.

    Runs at import, so every process that decodes (the consumer, each decode child, which
    imports this module in its fork server) can open HEIC. The consumer decodes one image per
    core at a time; codec threads on top would only contend for the same cores, and each one's
    stack counts against a decode child's address-space cap.
    """
    try:
        from PIL import AvifImagePlugin

        AvifImagePlugin.DEFAULT_MAX_THREADS = 1
    except ImportError:  # a Pillow without AVIF: such files fail as unsupported-format
        pass
    try:
        import pillow_heif
    except ImportError:  # likewise for HEIF
        return
    # Only the primary image is used: no thumbnails, depth maps or auxiliary images decoded.
    pillow_heif.register_heif_opener(
        thumbnails=False, depth_images=False, aux_images=False, decode_threads=1
    )


_register_phone_formats()

# Pillow's own bomb check warns above ~89 Mpx and raises above ~179 Mpx, from a process-global
# setting. Our explicit per-config limit (checked first, below) replaces it, so the warning is
# only noise in the logs.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Signatures of formats people upload (named as Pillow names them where it has a plugin): when no
# allowed plugin opens the data, these tell "unsupported-format" (a real image of a refused
# format) from "not-an-image" (garbage, or an allowed format whose header is damaged).
_KNOWN_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"icns", "ICNS"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"DDS ", "DDS"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
)
# ISO base media files (HEIF, AVIF, but also MP4 video) say what they are in their "ftyp" box:
# a major brand and a list of compatible ones. An AVIF may carry the generic "mif1" as its major
# brand, so every brand is looked at, and an AV1 brand anywhere makes it AVIF.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2"})

# A 16-bit sample maps to 8 bits by v / 257 (65535 -> 255 exactly), rounded to nearest.
_SIXTEEN_TO_EIGHT = 257.0


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What a single image may cost: encoded bytes, decoded pixels, and which formats open."""

    max_pixels: int = 100_000_000
    max_bytes: int = 64 * 1024 * 1024
    formats: tuple[str, ...] = ALLOWED_FORMATS


def decode_image(
    data: bytes, limits: DecodeLimits, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode ``data`` to an RGB image with EXIF orientation applied (first frame of animations).

    ``draft_size`` lets Pillow's JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT while keeping
    at least that size; it is applied only to JPEGs at least twice that size in both dimensions,
    where the result stays well above the resize target. Raises :class:`PermanentError` with
    code ``too-large``, ``unsupported-format``, ``not-an-image`` or ``truncated``.
    """
    image = open_checked(data, limits)
    if draft_size is not None and image.format in ("JPEG", "MPO"):
        _draft(image, draft_size)
    _load(image)
    return to_rgb(_oriented(image))


def open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Parse the header of ``data`` and apply every limit, decoding no pixels.

    The image returned is lazy (nothing loaded): callers decide how to decode it. Raises
    :class:`PermanentError` as :func:`decode_image` does.
    """
    if len(data) > limits.max_bytes:
        raise PermanentError(
            "too-large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes"
        )
    image = _open(data, limits.formats)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise PermanentError("not-an-image", f"{image.format} header declares {width}x{height}")
    if width * height > limits.max_pixels:
        raise PermanentError(
            "too-large",
            f"{image.format} of {width}x{height} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels",
        )
    return image


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    # An allowed format whose plugin is missing here (a Pillow without libavif, no pillow-heif)
    # is left out rather than handed to Image.open, which would fail on the unknown name.
    available = [name for name in formats if name in Image.OPEN]
    try:
        # Image.open parses the header only; pixels are decoded by load().
        return Image.open(io.BytesIO(data), formats=available)
    except Image.DecompressionBombError as exc:
        raise PermanentError("too-large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        known = sniff_format(data)
        if known in available:
            raise PermanentError("not-an-image", f"damaged {known} header") from exc
        if known in formats:
            raise PermanentError(
                "unsupported-format", f"{known}: no decoder for it is installed here"
            ) from exc
        if known is not None:
            raise PermanentError(
                "unsupported-format",
                f"{known} is not among the allowed formats ({', '.join(formats)})",
            ) from exc
        raise PermanentError("not-an-image", _describe(data)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # A recognised signature whose header is damaged: the plugin gave up while parsing it.
        raise PermanentError("not-an-image", f"unreadable header: {exc}") from exc


def sniff_format(data: bytes) -> str | None:
    """The name of a known image format from its leading bytes (Pillow's name where it has a
    plugin), or None."""
    head = data[:32]
    for offset, signature, name in _KNOWN_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    return _sniff_iso_media(data)


def _sniff_iso_media(data: bytes) -> str | None:
    """AVIF or HEIF, named from an ISO base media file's ftyp box; None for anything else."""
    if data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    box = data[8 : min(max(size, 16), 1024, len(data))]
    # The major brand, then (after a 4-byte minor version) the compatible brands.
    brands = {box[:4]} | {box[i : i + 4] for i in range(8, len(box) - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & (_HEVC_BRANDS | _HEIF_BRANDS):
        return "HEIF"
    return None


def _describe(data: bytes) -> str:
    if not data:
        return "the object is empty"
    return f"no allowed image format recognises the data ({len(data)} bytes, starts {data[:8]!r})"


def _draft(image: Image.Image, size: tuple[int, int]) -> None:
    width, height = image.size
    if width >= 2 * size[0] and height >= 2 * size[1]:
        # Keep the mode: only the DCT scale changes, so the colour path stays the exact one.
        image.draft(image.mode, size)


def _load(image: Image.Image) -> None:
    try:
        # A HEIF opens at its primary image, which need not be image 0 (a burst, an edit kept
        # beside the original); every other format opens at the first frame.
        if image.format != "HEIF":
            image.seek(0)
        image.load()
    except Image.DecompressionBombError as exc:
        raise PermanentError("too-large", str(exc)) from exc
    except RuntimeError as exc:
        if image.format != "HEIF":
            raise
        raise _heif_failure(exc) from exc
    except (OSError, EOFError, SyntaxError, ValueError, IndexError, struct.error) as exc:
        if image.format == "HEIF":
            raise _heif_failure(exc) from exc
        # Pillow reports a short file as "image file is truncated", "Truncated File Read" or a
        # broken data stream (struct.error escapes from some chunk parsers); with
        # LOAD_TRUNCATED_IMAGES off (the default) it never pads the missing part with grey.
        detail = f"{image.format} data ends early or is corrupt: {exc}"
        raise PermanentError("truncated", detail) from exc


def _heif_failure(exc: BaseException) -> PermanentError:
    """A HEIF that did not decode, by libheif's error as pillow-heif raises it ("code: subcode:
    message"): ValueError or EOFError for invalid or missing data, SyntaxError for a feature it
    does not support, RuntimeError for the rest (a codec not built in, a codec's own failure, a
    memory or security limit)."""
    text = " ".join(str(exc).split())
    if "Security limit exceeded" in text or text.startswith("Memory allocation error"):
        return PermanentError("too-large", f"HEIF: {text}")
    unsupported = isinstance(exc, SyntaxError) or (
        isinstance(exc, RuntimeError) and not text.startswith("Decoder plugin")
    )
    if unsupported:
        return PermanentError("unsupported-format", f"HEIF: {text}")
    return PermanentError("truncated", f"HEIF data ends early or is corrupt: {text}")


def _oriented(image: Image.Image) -> Image.Image:
    try:
        # In place: the image is ours, and without an Orientation tag exif_transpose would
        # otherwise return a full copy of the decoded pixels.
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except Exception:
        # A damaged EXIF block must not cost a good image its features: keep the stored pixels.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or dropping information.

    16-bit and 32-bit integer greyscale are scaled to 8 bits (Pillow's own ``convert("L")``
    clips them at 255); float images in [0, 1] are scaled by 255; transparency (alpha channels,
    palette transparency) is composited over white, which is how the image looks on a page.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        samples = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(samples / _SIXTEEN_TO_EIGHT), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        samples = np.asarray(image, dtype=np.float64)
        finite = samples[np.isfinite(samples)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(samples) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise PermanentError("unsupported-format", f"cannot convert mode {mode} to RGB") from exc
