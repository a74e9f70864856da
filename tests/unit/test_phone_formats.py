"""Phone photos: HEIC/HEIF (pillow-heif) and AVIF (Pillow's own plugin) decode like the rest.

Both decode paths are covered, in the consumer (threads) and in decode processes, because each
decode child must register the HEIF opener for itself. The files are made here, by the same
libraries' encoders, so no binary fixture is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from consumer import decode
from consumer.decode import DecodeLimits, decode_image, sniff_format
from consumer.decode_pool import ChildSpec, DecodeProcesses
from consumer.errors import PermanentError
from consumer.model import Backbone
from consumer.preprocess import ImagePreparer, InputSpec
from tests.corpus import encode, photo_array

FORMATS = ("HEIF", "AVIF")
SPEC = InputSpec((3, 64, 64), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875, "center")
LIMITS = DecodeLimits()


def _photo(width: int = 96, height: int = 72, seed: int = 4) -> Image.Image:
    return Image.fromarray(photo_array(width, height, seed))


def _rotated(fmt: str) -> bytes:
    """A 96x72 photo whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(_photo(), fmt, quality=95, exif=exif.tobytes())


def _mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def processes() -> Iterator[DecodeProcesses]:
    child = ChildSpec(
        SPEC.input_size,
        SPEC.interpolation,
        SPEC.mean,
        SPEC.std,
        SPEC.crop_pct,
        SPEC.crop_mode,
        LIMITS,
        draft=False,
        memory_bytes=1 << 30,
        consumer_pid=os.getpid(),
    )
    pool = DecodeProcesses(child, workers=1)
    yield pool
    pool.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_phone_photo_decodes_close_to_what_was_encoded(fmt: str) -> None:
    # GIVEN a photo saved as HEIC or AVIF (lossy, high quality)
    photo = _photo()
    data = encode(photo, fmt, quality=95)

    # WHEN decoded
    image = decode_image(data, LIMITS)

    # THEN it is the same RGB picture, up to the codec's loss (it smooths the photo's grain)
    assert image.mode == "RGB" and image.size == photo.size
    assert _mean_error(np.asarray(image), np.asarray(photo)) < 8


@pytest.mark.parametrize("fmt", FORMATS)
def test_solid_red_stays_red(fmt: str) -> None:
    pixels = np.asarray(decode_image(encode(Image.new("RGB", (64, 48), (255, 0, 0)), fmt), LIMITS))

    assert pixels[..., 0].min() >= 245
    assert pixels[..., 1:].max() <= 10


@pytest.mark.parametrize("fmt", FORMATS)
def test_exif_orientation_is_applied_as_for_jpeg(fmt: str) -> None:
    # GIVEN a 96x72 photo whose metadata says to turn it (HEIF carries this as an irot box,
    # applied by libheif; AVIF as EXIF, applied by the decoder like a JPEG's)
    upright = np.asarray(decode_image(_rotated(fmt), LIMITS))

    # THEN it comes out upright: 72 wide, 96 high, the stored pixels turned clockwise (and
    # not the other way, which would be as wide and as high)
    clockwise = np.rot90(np.asarray(_photo()), k=-1)
    anticlockwise = np.rot90(np.asarray(_photo()), k=1)
    assert upright.shape == clockwise.shape == (96, 72, 3)
    assert _mean_error(upright, clockwise) < 8
    assert _mean_error(upright, anticlockwise) > 3 * _mean_error(upright, clockwise)


@pytest.mark.parametrize("fmt", FORMATS)
def test_processes_give_the_thread_paths_pixels(fmt: str, processes: DecodeProcesses) -> None:
    # GIVEN the consumer's in-process preparer and a decode process, for the same model input
    exact = ImagePreparer(SPEC, LIMITS)
    for data in (encode(_photo(), fmt, quality=90), _rotated(fmt)):
        # WHEN each prepares the photo THEN the pixels are identical (the child can open it too)
        assert np.array_equal(processes(data), exact(data))


@pytest.mark.parametrize("fmt", FORMATS)
def test_phone_photos_get_features_like_the_same_photo_as_png(fmt: str) -> None:
    # GIVEN a model and the same photo as PNG (lossless) and as HEIC or AVIF
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    spec = InputSpec.from_model(model)
    backbone = Backbone(model, spec, device=torch.device("cpu"), precision="fp32", pool="avg")
    prepare = ImagePreparer(spec, LIMITS)
    photo = _photo(320, 240, seed=9)

    # WHEN the consumer's preparer and the model compute features for both
    features = backbone(
        backbone.stack([prepare(encode(photo, "PNG")), prepare(encode(photo, fmt, quality=95))])
    )

    # THEN they describe the same picture
    png, phone = features
    cosine = float(png @ phone / (np.linalg.norm(png) * np.linalg.norm(phone)))
    assert np.isfinite(phone).all()
    assert cosine > 0.99


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.98])
def test_a_cut_short_file_fails_permanently_with_its_own_code(fmt: str, keep: float) -> None:
    data = encode(_photo(160, 120, seed=2), fmt, quality=90)

    with pytest.raises(PermanentError) as caught:
        decode_image(data[: int(len(data) * keep)], LIMITS)

    # A header cut short is "not-an-image" (damaged header), pixel data cut short "truncated"
    assert caught.value.error_code in {"not-an-image", "truncated"}
    assert caught.value.detail and "\n" not in caught.value.detail


def test_a_heic_with_its_pixel_data_missing_is_truncated() -> None:
    # GIVEN a HEIC whose header is whole (all of libheif's metadata comes first) but whose
    # compressed picture ends early, as from an interrupted upload
    data = encode(_photo(160, 120, seed=2), "HEIF", quality=90)

    with pytest.raises(PermanentError) as caught:
        decode_image(data[: len(data) * 3 // 4], LIMITS)

    assert caught.value.error_code == "truncated"
    assert caught.value.detail.startswith("HEIF")


def test_an_av1_heif_without_the_avif_brand_is_unsupported_not_a_crash() -> None:
    # GIVEN an AV1-coded HEIF labelled only with the generic "mif1" brand: Pillow's AVIF plugin
    # declines it, pillow-heif accepts it, and its libheif has no AV1 decoder (a RuntimeError)
    avif = encode(Image.new("RGB", (64, 48), (255, 0, 0)), "AVIF")
    size = int.from_bytes(avif[:4], "big")
    relabelled = avif[:size].replace(b"avif", b"mif1") + avif[size:]

    with pytest.raises(PermanentError) as caught:
        decode_image(relabelled, LIMITS)

    assert caught.value.error_code == "unsupported-format"
    assert "AV1" in caught.value.detail


def test_the_pixel_limit_applies_before_decoding() -> None:
    data = encode(_photo(), "HEIF")

    with pytest.raises(PermanentError) as caught:
        decode_image(data, DecodeLimits(max_pixels=96 * 72 - 1))

    assert caught.value.error_code == "too-large"
    assert "96x72" in caught.value.detail


@pytest.mark.parametrize("fmt", FORMATS)
def test_left_off_the_allowed_list_they_are_unsupported(fmt: str) -> None:
    with pytest.raises(PermanentError) as caught:
        decode_image(encode(_photo(), fmt), DecodeLimits(formats=("JPEG", "PNG")))

    assert caught.value.error_code == "unsupported-format"
    assert fmt in caught.value.detail


def test_an_allowed_format_without_an_installed_decoder_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a process where no plugin opens HEIF (pillow-heif missing)
    data = encode(_photo(), "HEIF")
    monkeypatch.delitem(decode.Image.OPEN, "HEIF")

    # WHEN a HEIC arrives THEN it is dead-lettered with the reason, never skipped or crashed on
    with pytest.raises(PermanentError) as caught:
        decode_image(data, LIMITS)

    assert caught.value.error_code == "unsupported-format"
    assert "no decoder" in caught.value.detail


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08free"


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (_ftyp(b"heic", b"mif1", b"heic"), "HEIF"),
        (_ftyp(b"mif1", b"mif1", b"heic", b"miaf"), "HEIF"),
        (_ftyp(b"avif", b"avif", b"mif1", b"miaf"), "AVIF"),
        (_ftyp(b"mif1", b"miaf", b"MA1B", b"mif1", b"avif"), "AVIF"),  # the brand late in the box
        (_ftyp(b"isom", b"isom", b"mp41"), None),  # MP4 video: not an image format
    ],
)
def test_sniff_reads_every_brand_of_the_ftyp_box(head: bytes, name: str | None) -> None:
    assert sniff_format(head) == name
