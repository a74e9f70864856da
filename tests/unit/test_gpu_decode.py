"""``--decode cuda``'s batched decoder: routing, fallbacks and tolerance.

Everything but the ``gpu`` tests runs on the CPU: torchvision's ``decode_jpeg`` (libjpeg-turbo)
stands in for nvJPEG, the same resize and crop code runs on CPU tensors, and a fake device decoder
refuses chosen images. The ``gpu`` tests run the real backends where CUDA exists.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps

from consumer.decode import DecodeLimits
from consumer.errors import ConfigError, PermanentError
from consumer.gpu_decode import (
    BackendName,
    DecodedBatch,
    DeviceJob,
    GpuBatchDecoder,
    NvImgCodecDecoder,
    TorchvisionDecoder,
    make_jpeg_decoder,
    orient,
    route,
)
from consumer.preprocess import DeviceNormalizer, ImagePreparer, InputSpec
from tests.corpus import BAD_CASES, GOOD_CASES, encode, photo_array, photo_jpeg

# The tolerance for features from the device path against the exact CPU path.
MAX_RELATIVE_L2 = 0.01
MIN_COSINE = 0.9999

# With libjpeg-turbo on both sides only the resize's rounding differs: in Pillow's order (two
# passes, rounded between) at most one level on about 1% of the pixels or fewer; one float
# resize would leave 13-20% of them one level off.
MAX_LEVELS = 1
MAX_MEAN_LEVELS = 0.02

CPU = torch.device("cpu")
LIMITS = DecodeLimits()
HOST_FORMATS = ["rgb.png", "gray16.png", "rgba.webp", "animated.gif", "rgb.tiff", "cmyk.jpg"]


@cache
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


@cache
def _spec(name: str = "test_resnet") -> InputSpec:
    return InputSpec.from_model(_model(name))


def _photo(width: int, height: int, seed: int, **params: object) -> bytes:
    return encode(Image.fromarray(photo_array(width, height, seed)), "JPEG", **params)


def _exif_jpeg(orientation: int, width: int = 301, height: int = 211) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _photo(width, height, seed=40 + orientation, quality=92, exif=exif.tobytes())


def _damaged_jpeg() -> bytes:
    """A JPEG whose entropy-coded data is scrambled in the middle but that still ends in EOI:
    nothing in its header says so, only decoding finds it."""
    jpeg = photo_jpeg(320, 240, seed=11)
    return jpeg[:2000] + bytes(b ^ 0x55 for b in jpeg[2000:4000]) + jpeg[4000:]


def _varied_jpegs() -> dict[str, bytes]:
    """The tolerance corpus: sizes, aspect ratios, subsampling, greyscale, progressive, EXIF."""
    corpus = {
        "500x375": photo_jpeg(500, 375, seed=1),
        "portrait 375x500": photo_jpeg(375, 500, seed=2),
        "odd 333x251": _photo(333, 251, seed=3, quality=85),
        "large 2000x1500": photo_jpeg(2000, 1500, seed=4),
        "tall 300x700 (a screenshot's shape)": photo_jpeg(300, 700, seed=12),
        "small 97x61 (upscaled)": _photo(97, 61, seed=5),
        "4:4:4 q95": _photo(480, 320, seed=6, quality=95, subsampling=0),
        "4:2:0 q60": _photo(480, 320, seed=7, quality=60, subsampling=2),
        "greyscale": encode(Image.fromarray(photo_array(400, 300, 8)).convert("L"), "JPEG"),
        "progressive": _photo(450, 300, seed=9, progressive=True),
    }
    corpus.update({f"exif orientation {o}": _exif_jpeg(o) for o in range(2, 9)})
    return corpus


VARIED_JPEGS = _varied_jpegs()


class FakeDeviceDecoder:
    """The CPU's libjpeg-turbo in the device decoder's place, refusing or misreading on demand."""

    name = "fake"

    def __init__(self, refuse: Sequence[bytes] = (), misread: Sequence[bytes] = ()) -> None:
        self.real = TorchvisionDecoder(CPU)
        self.refuse = set(refuse)
        self.misread = set(misread)
        self.asked: list[bytes] = []

    def __call__(self, items: Sequence[bytes]) -> list[torch.Tensor | None]:
        self.asked.extend(items)
        decoded = self.real(items)
        out: list[torch.Tensor | None] = []
        for data, image in zip(items, decoded, strict=True):
            if data in self.refuse:
                out.append(None)
            elif data in self.misread and image is not None:
                out.append(image[:, 1:, :])
            else:
                out.append(image)
        return out


def _exact(spec: InputSpec, data: bytes) -> np.ndarray:
    return ImagePreparer(spec, LIMITS)(data)


def _exact_code(data: bytes) -> str:
    with pytest.raises(PermanentError) as caught:
        _exact(_spec(), data)
    return caught.value.error_code


def _row(batch: DecodedBatch, index: int) -> np.ndarray:
    return batch.nhwc[batch.indices.index(index)].cpu().numpy()


def _assert_rounding_only(ours: np.ndarray, exact: np.ndarray) -> None:
    diff = np.abs(ours.astype(int) - exact.astype(int))
    assert diff.max() <= MAX_LEVELS
    assert diff.mean() <= MAX_MEAN_LEVELS


def _features(model_name: str, nhwc: torch.Tensor) -> torch.Tensor:
    normalize = DeviceNormalizer(_spec(model_name), CPU)
    with torch.inference_mode():
        return _model(model_name)(normalize(nhwc.cpu(), channels_last=False))


def _relative_l2_and_cosine(ours: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    relative = ((ours - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    cosine = torch.nn.functional.cosine_similarity(ours, exact, dim=1).min().item()
    return relative, cosine


# ---- tolerance: the device path's arithmetic, on the CPU ------------------------------------


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])  # bilinear, bicubic
def test_features_are_within_tolerance_of_the_exact_path(model: str) -> None:
    # GIVEN a varied corpus of JPEGs, one batch, and the exact path's input for each
    spec = _spec(model)
    names, items = list(VARIED_JPEGS), list(VARIED_JPEGS.values())
    exact = torch.from_numpy(np.stack([_exact(spec, data) for data in items]))

    # WHEN the batch decoder decodes them with libjpeg-turbo and resizes them as tensors
    batch = GpuBatchDecoder(spec, LIMITS, CPU, "torchvision").decode(items)

    # THEN every image took the tensor path, its pixels differ by rounding only, and its
    # features are within the tolerance
    assert batch.routes == ("device",) * len(items) and batch.indices == tuple(range(len(items)))
    ours, reference = _features(model, batch.nhwc), _features(model, exact)
    for i, name in enumerate(names):
        _assert_rounding_only(batch.nhwc[i].numpy(), exact[i].numpy())
        relative, cosine = _relative_l2_and_cosine(ours[i : i + 1], reference[i : i + 1])
        assert relative <= MAX_RELATIVE_L2, name
        assert cosine >= MIN_COSINE, name


def test_the_tolerance_catches_a_crop_two_pixels_off() -> None:
    # GIVEN the exact input of three photos, and the same input shifted by two pixels
    spec = _spec("test_resnet")
    items = [VARIED_JPEGS[name] for name in ("500x375", "odd 333x251", "large 2000x1500")]
    exact = torch.from_numpy(np.stack([_exact(spec, data) for data in items]))
    shifted = torch.roll(exact, shifts=2, dims=2)

    # WHEN their features are compared as the tolerance test compares them
    relative, cosine = _relative_l2_and_cosine(
        _features("test_resnet", shifted), _features("test_resnet", exact)
    )

    # THEN the error a plausible bug makes is outside the tolerance: the test above can fail
    assert relative > MAX_RELATIVE_L2
    assert cosine < MIN_COSINE


@pytest.mark.parametrize(
    ("input_size", "crop_mode"), [((3, 160, 224), "center"), ((3, 192, 160), "squash")]
)
def test_non_square_and_squash_crops_match_timm_up_to_rounding(
    input_size: tuple[int, int, int], crop_mode: str
) -> None:
    # GIVEN a model whose input is not square, or whose crop squashes
    spec = InputSpec(input_size, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.9, crop_mode)
    items = [VARIED_JPEGS["500x375"], VARIED_JPEGS["portrait 375x500"]]

    # WHEN decoded as tensors
    batch = GpuBatchDecoder(spec, LIMITS, CPU, "torchvision").decode(items)

    # THEN the pixels have the model's shape and differ from timm's by rounding only
    for i, data in enumerate(items):
        _assert_rounding_only(_row(batch, i), _exact(spec, data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_tensors_is_pillows_exif_transpose(orientation: int) -> None:
    # GIVEN stored pixels that are not square and not symmetric, and an EXIF orientation
    stored = photo_array(7, 4, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(stored)
    image.info["exif"] = exif.tobytes()

    # WHEN the tensor path orients them
    ours = orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0)

    # THEN the result is exactly what Pillow's exif_transpose makes
    assert np.array_equal(ours.numpy(), np.asarray(ImageOps.exif_transpose(image)))


# ---- routing from the header ------------------------------------------------------------------


def _keep_rgb_jpeg() -> bytes:
    return encode(Image.fromarray(photo_array(64, 48, 3)), "JPEG", keep_rgb=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GOOD_CASES["rgb.jpg"], DeviceJob((64, 48), 1)),
        (GOOD_CASES["gray.jpg"], DeviceJob((64, 48), 1)),
        (GOOD_CASES["progressive.jpg"], DeviceJob((64, 48), 1)),
        (GOOD_CASES["exif-rotated.jpg"], DeviceJob((64, 48), 6)),
        (GOOD_CASES["cmyk.jpg"], None),
        (GOOD_CASES["rgb.png"], None),
        (GOOD_CASES["rgb.webp"], None),
        (_keep_rgb_jpeg(), None),
        (GOOD_CASES["rgb.jpg"] + b"\x00" * 16, None),
        (BAD_CASES["truncated.jpg"][0], None),
    ],
    ids=[
        "baseline",
        "greyscale",
        "progressive",
        "exif",
        "cmyk",
        "png",
        "webp",
        "stored-as-rgb",
        "trailing-bytes",
        "truncated",
    ],
)
def test_route_sends_only_plain_complete_jpegs_to_the_device(
    data: bytes, expected: DeviceJob | None
) -> None:
    assert route(data, LIMITS) == expected


@pytest.mark.parametrize(
    "name", ["text.jpg", "empty.jpg", "icon.ico", "document.pdf", "bomb-20000x20000.png"]
)
def test_route_refuses_from_the_header_with_the_exact_paths_code(name: str) -> None:
    data, code = BAD_CASES[name]

    with pytest.raises(PermanentError) as caught:
        route(data, LIMITS)

    assert caught.value.error_code == code


# ---- fallbacks, with a fake device decoder -------------------------------------------------


def test_other_formats_go_to_the_host_and_are_exact() -> None:
    # GIVEN a batch of formats the device never decodes, around one JPEG
    fake = FakeDeviceDecoder()
    items = [GOOD_CASES[name] for name in HOST_FORMATS] + [GOOD_CASES["rgb.jpg"]]

    # WHEN decoded
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, fake).decode(items)

    # THEN only the JPEG was offered to the device; the others are the exact path's pixels
    assert fake.asked == [GOOD_CASES["rgb.jpg"]]
    assert batch.routes == ("host",) * len(HOST_FORMATS) + ("device",)
    assert not batch.failures
    for i, name in enumerate(HOST_FORMATS):
        assert np.array_equal(_row(batch, i), _exact(_spec(), GOOD_CASES[name])), name


def test_jpegs_the_device_refuses_are_decoded_exactly_on_the_host() -> None:
    # GIVEN a device decoder that refuses a progressive JPEG and misreads a baseline one
    progressive, baseline, kept = (
        GOOD_CASES["progressive.jpg"],
        VARIED_JPEGS["odd 333x251"],
        GOOD_CASES["rgb.jpg"],
    )
    fake = FakeDeviceDecoder(refuse=[progressive], misread=[baseline])

    # WHEN the three are decoded in one batch
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, fake).decode([progressive, baseline, kept])

    # THEN the refused and the misread ones are the exact path's pixels, the other the device's
    assert batch.routes == ("device-refused", "device-refused", "device")
    assert batch.indices == (0, 1, 2) and not batch.failures
    assert np.array_equal(_row(batch, 0), _exact(_spec(), progressive))
    assert np.array_equal(_row(batch, 1), _exact(_spec(), baseline))


def test_a_damaged_jpeg_the_device_refuses_gets_the_exact_paths_code() -> None:
    # GIVEN a JPEG damaged inside its data (its header and EOI are intact)
    damaged = _damaged_jpeg()
    fake = FakeDeviceDecoder(refuse=[damaged])

    # WHEN it is decoded between two good images
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, fake).decode(
        [GOOD_CASES["rgb.jpg"], damaged, GOOD_CASES["gray.jpg"]]
    )

    # THEN it fails alone, with the exact path's code, after the device was asked
    assert damaged in fake.asked
    assert batch.routes[1] == "device-refused"
    assert batch.failures[1].error_code == _exact_code(damaged) == "truncated"
    assert batch.failures[1].permanent
    assert batch.indices == (0, 2)


def test_torchvision_refusals_are_found_one_by_one() -> None:
    # GIVEN torchvision's decoder, which raises for a whole list when one image is damaged
    decoder = TorchvisionDecoder(CPU)

    # WHEN a list holds a damaged JPEG between two good ones
    decoded = decoder([GOOD_CASES["rgb.jpg"], _damaged_jpeg(), GOOD_CASES["gray.jpg"]])

    # THEN only the damaged one is None
    assert [image is None for image in decoded] == [False, True, False]


class FakeNvImgCodec(types.ModuleType):
    """The slice of ``nvidia.nvimgcodec`` 0.9's API that the adapter uses, decoding on the CPU
    (the names and signatures were checked against the 0.9.0.20 wheel)."""

    class BackendKind:
        HW_GPU_ONLY, GPU_ONLY, HYBRID_CPU_GPU, CPU_ONLY = "hw", "gpu", "hybrid", "cpu"

    class ColorSpec:
        SRGB = "srgb"

    def __init__(
        self, refuse: Sequence[bytes] = (), fail: bool = False, no_nvjpeg: bool = False
    ) -> None:
        super().__init__("nvidia.nvimgcodec")
        self.refuse, self.fail, self.no_nvjpeg = set(refuse), fail, no_nvjpeg
        self.created: dict[str, object] = {}

    def Backend(self, kind: str) -> str:  # noqa: N802 - the library's name
        return kind

    def DecodeParams(self, **params: object) -> dict[str, object]:  # noqa: N802
        return params

    def CodeStream(self, data: bytes) -> bytes:  # noqa: N802
        if not data.startswith(b"\xff\xd8"):
            raise RuntimeError("Could not parse the code stream")
        return data

    def Decoder(self, **settings: object) -> FakeNvImgCodec:  # noqa: N802
        self.created = settings
        return self

    def decode(self, streams: list[bytes], **kwargs: object) -> list[torch.Tensor | None]:
        if self.fail:
            raise RuntimeError("nvimgcodec: CUDA error")
        decoded = TorchvisionDecoder(CPU)(streams)
        return [
            None
            if self.no_nvjpeg or data in self.refuse or image is None
            else image.permute(1, 2, 0).contiguous()
            for data, image in zip(streams, decoded, strict=True)
        ]


@pytest.fixture
def fake_nvimgcodec(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNvImgCodec]:
    def install(**kwargs: Any) -> FakeNvImgCodec:
        codec = FakeNvImgCodec(**kwargs)
        parent = sys.modules.get("nvidia") or types.ModuleType("nvidia")
        monkeypatch.setitem(sys.modules, "nvidia", parent)
        monkeypatch.setattr(parent, "nvimgcodec", codec, raising=False)
        monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", codec)
        monkeypatch.setattr(
            torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=7)
        )
        return codec

    return install


def test_nvimgcodec_adapter_maps_its_nones_and_errors_per_image(
    fake_nvimgcodec: Callable[..., FakeNvImgCodec],
) -> None:
    # GIVEN nvimgcodec (faked on the CPU) refusing one JPEG, and bytes it cannot even parse
    refused = GOOD_CASES["progressive.jpg"]
    codec = fake_nvimgcodec(refuse=[refused])
    decoder = NvImgCodecDecoder(torch.device("cuda:0"))

    # WHEN a batch holds a good JPEG, the refused one and the unparsable bytes
    decoded = decoder([GOOD_CASES["rgb.jpg"], refused, b"not a jpeg"])

    # THEN the good one is its (3, H, W) pixels, the other two None; only GPU backends, no EXIF
    # rotation by the library (the host's reading applies it), fancy upsampling as libjpeg does
    expected = TorchvisionDecoder(CPU)([GOOD_CASES["rgb.jpg"]])[0]
    assert decoded[0] is not None and expected is not None
    assert torch.equal(decoded[0], expected)
    assert decoded[1:] == [None, None]
    assert codec.created["backends"] == ["hw", "gpu", "hybrid"]
    assert codec.created["options"] == ":fancy_upsampling=1"
    assert decoder._params == {"apply_exif_orientation": False, "color_spec": "srgb"}


def test_nvimgcodec_failing_a_whole_batch_sends_it_to_the_host(
    fake_nvimgcodec: Callable[..., FakeNvImgCodec],
) -> None:
    fake_nvimgcodec(fail=True)

    decoded = NvImgCodecDecoder(torch.device("cuda:0"))([GOOD_CASES["rgb.jpg"]] * 2)

    assert decoded == [None, None]


def test_auto_takes_nvimgcodec_on_cuda_when_it_decodes(
    fake_nvimgcodec: Callable[..., FakeNvImgCodec],
) -> None:
    fake_nvimgcodec()

    assert make_jpeg_decoder("auto", torch.device("cuda:0")).name == "nvimgcodec"


def test_nvimgcodec_without_its_nvjpeg_library_is_a_config_error(
    fake_nvimgcodec: Callable[..., FakeNvImgCodec],
) -> None:
    # GIVEN nvimgcodec installed without libnvjpeg: it loads, then returns None for every image
    fake_nvimgcodec(no_nvjpeg=True)

    # WHEN it is asked for by name THEN it is refused at start-up, not image by image
    with pytest.raises(ConfigError, match="cannot decode a JPEG"):
        make_jpeg_decoder("nvimgcodec", torch.device("cuda:0"))


def test_every_bad_input_fails_alone_with_its_code() -> None:
    # GIVEN every hostile input of the corpus mixed with good images in one batch
    fake = FakeDeviceDecoder()
    bad_names = sorted(BAD_CASES)
    good = [GOOD_CASES["rgb.jpg"], GOOD_CASES["rgb.png"]]
    items = [good[0], *(BAD_CASES[name][0] for name in bad_names), good[1]]

    # WHEN decoded
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, fake).decode(items)

    # THEN each bad one has the contract's code, the good ones decoded, and no truncated file
    # reached the device
    codes = {name: batch.failures[i + 1].error_code for i, name in enumerate(bad_names)}
    assert codes == {name: BAD_CASES[name][1] for name in bad_names}
    assert batch.indices == (0, len(items) - 1)
    assert batch.pixels.shape == (2, 3, _spec().height, _spec().width)
    assert BAD_CASES["truncated.jpg"][0] not in fake.asked


def test_a_failed_device_resize_sends_those_images_to_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a device whose resize fails for one size of image (out of memory, say)
    decoder = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder())
    large, small = VARIED_JPEGS["large 2000x1500"], VARIED_JPEGS["500x375"]
    real_crop = decoder.crop

    def crop(images: Sequence[torch.Tensor]) -> torch.Tensor:
        if images[0].shape[-1] == 2000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_crop(images)

    monkeypatch.setattr(decoder, "crop", crop)

    # WHEN a batch holds that size and another
    batch = decoder.decode([large, small])

    # THEN the large one is the exact path's pixels, the other the device's
    assert batch.routes == ("device-refused", "device")
    assert np.array_equal(_row(batch, 0), _exact(_spec(), large))


def test_same_size_images_share_one_resize_in_input_order() -> None:
    # GIVEN four images, three of one size, in a mixed order
    decoder = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder())
    a, b, c = (photo_jpeg(500, 375, seed=s) for s in (31, 32, 33))
    other = VARIED_JPEGS["portrait 375x500"]
    calls: list[int] = []
    real_crop = decoder.crop

    def crop(images: Sequence[torch.Tensor]) -> torch.Tensor:
        calls.append(len(images))
        return real_crop(images)

    decoder.crop = crop  # type: ignore[method-assign]

    # WHEN decoded
    batch = decoder.decode([a, other, b, c])

    # THEN two resize calls made them, and each row is its own image
    assert sorted(calls) == [1, 3]
    for i, data in enumerate([a, other, b, c]):
        _assert_rounding_only(_row(batch, i), _exact(_spec(), data))


def test_host_pool_gives_the_same_batch() -> None:
    items = [GOOD_CASES["rgb.png"], GOOD_CASES["rgb.jpg"], BAD_CASES["truncated.png"][0]]
    inline = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder()).decode(items)

    with ThreadPoolExecutor(2) as pool:
        pooled = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder(), host_pool=pool)
        batch = pooled.decode(items)

    assert torch.equal(batch.pixels, inline.pixels)
    assert batch.indices == inline.indices == (0, 1)
    assert batch.failures == inline.failures and batch.failures[2].error_code == "truncated"


def test_a_host_path_passed_in_decodes_the_host_images() -> None:
    # GIVEN a host path (crash-isolated decode processes, say) whose decoder dies on one image
    exact = ImagePreparer(_spec(), LIMITS)
    crashing = GOOD_CASES["rgb.tiff"]

    def host(data: bytes) -> np.ndarray:
        if data == crashing:
            raise PermanentError("decoder-crashed", "the decoder process died of SIGSEGV")
        return exact(data)

    decoder = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder(), host=host)

    # WHEN a batch holds that image, another host image and a JPEG
    batch = decoder.decode([GOOD_CASES["rgb.png"], crashing, GOOD_CASES["rgb.jpg"]])

    # THEN that image fails alone with the host path's code; the others decoded
    assert batch.failures[1].error_code == "decoder-crashed"
    assert batch.indices == (0, 2)
    assert batch.routes == ("host", "host", "device")


def test_an_empty_batch_is_an_empty_tensor() -> None:
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder()).decode([])

    assert batch.pixels.shape == (0, 3, _spec().height, _spec().width)
    assert batch.indices == () and batch.failures == {}


def test_the_batch_is_channels_last_so_nhwc_is_contiguous() -> None:
    batch = GpuBatchDecoder(_spec(), LIMITS, CPU, FakeDeviceDecoder()).decode(
        [GOOD_CASES["rgb.jpg"], GOOD_CASES["rgb.png"]]
    )

    assert batch.pixels.dtype == torch.uint8
    assert batch.nhwc.shape == (2, _spec().height, _spec().width, 3)
    assert batch.nhwc.is_contiguous()


# ---- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interpolation", "crop_mode"), [("lanczos", "center"), ("bicubic", "border")]
)
def test_a_transform_without_a_tensor_version_is_a_config_error(
    interpolation: str, crop_mode: str
) -> None:
    spec = InputSpec((3, 160, 160), interpolation, (0.5,) * 3, (0.5,) * 3, 0.9, crop_mode)

    with pytest.raises(ConfigError, match="--decode cuda"):
        GpuBatchDecoder(spec, LIMITS, CPU, FakeDeviceDecoder())


def test_auto_is_torchvision_on_the_cpu() -> None:
    assert make_jpeg_decoder("auto", CPU).name == "torchvision"


def test_nvimgcodec_on_the_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nvimgcodec"):
        make_jpeg_decoder("nvimgcodec", CPU)


# ---- on a real GPU --------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_backend(name: BackendName) -> BackendName:
    if name == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec", reason="the [gpu] extra is not installed")
    return name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "torchvision"])
@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_cuda_features_are_within_tolerance(backend: BackendName, model: str) -> None:
    # GIVEN the varied corpus and the exact path's input for each image
    spec = _spec(model)
    items = list(VARIED_JPEGS.values())
    exact = torch.from_numpy(np.stack([_exact(spec, data) for data in items]))

    # WHEN nvJPEG decodes them and the GPU resizes them
    cuda = torch.device("cuda")
    batch = GpuBatchDecoder(spec, LIMITS, cuda, _cuda_backend(backend)).decode(items)

    # THEN the features (computed on the CPU, to measure the decode alone) are within tolerance
    assert batch.pixels.is_cuda and not batch.failures
    assert batch.routes.count("device") >= len(items) - 1  # progressive may be refused
    ours, reference = _features(model, batch.nhwc), _features(model, exact)
    for i, name in enumerate(VARIED_JPEGS):
        relative, cosine = _relative_l2_and_cosine(ours[i : i + 1], reference[i : i + 1])
        assert relative <= MAX_RELATIVE_L2, name
        assert cosine >= MIN_COSINE, name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "torchvision"])
def test_cuda_fallbacks_keep_every_code_and_the_host_formats_exact(backend: BackendName) -> None:
    # GIVEN every hostile input, the host-only formats and a damaged JPEG in one batch
    bad_names = sorted(BAD_CASES)
    damaged = _damaged_jpeg()
    items = [BAD_CASES[n][0] for n in bad_names] + [GOOD_CASES[n] for n in HOST_FORMATS]
    items.append(damaged)
    decoder = GpuBatchDecoder(_spec(), LIMITS, torch.device("cuda"), _cuda_backend(backend))

    # WHEN decoded on the GPU
    batch = decoder.decode(items)

    # THEN the codes are the contract's, the host formats are exact, and the damaged JPEG either
    # decoded on the device or failed with the exact path's code
    codes = {name: batch.failures[i].error_code for i, name in enumerate(bad_names)}
    assert codes == {name: BAD_CASES[name][1] for name in bad_names}
    for offset, name in enumerate(HOST_FORMATS):
        index = len(bad_names) + offset
        assert batch.routes[index] == "host"
        assert np.array_equal(_row(batch, index), _exact(_spec(), GOOD_CASES[name])), name
    last = len(items) - 1
    if last in batch.failures:
        assert batch.failures[last].error_code == _exact_code(damaged)
    else:
        assert batch.routes[last] == "device"


@pytest.mark.gpu
@needs_cuda
def test_auto_prefers_nvimgcodec_where_installed() -> None:
    pytest.importorskip("nvidia.nvimgcodec", reason="the [gpu] extra is not installed")

    assert make_jpeg_decoder("auto", torch.device("cuda")).name == "nvimgcodec"
