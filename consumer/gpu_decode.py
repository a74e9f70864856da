"""``--decode cuda``: a micro-batch of encoded images to the model's uint8 input on the device.

On a GPU host Pillow's decode is the host work that limits resnet50-class models (2-3 ms of CPU
per 500x375 JPEG). :class:`GpuBatchDecoder` decodes a whole micro-batch's JPEGs in one call to
nvJPEG and resizes and crops them on the device; the host keeps only a header parse per image
(0.04-0.09 ms).

What goes where, decided per image on the host from the header alone (no pixel is decoded):

- Every limit of the exact path first (:func:`consumer.decode.open_checked`: bytes, pixel count,
  allowed formats); a refusal is that image's :class:`~consumer.errors.Failure`.
- Baseline or progressive JPEG in YCbCr or greyscale (Pillow mode ``RGB`` or ``L``) that ends in
  its EOI marker, with readable EXIF: the device.
- Everything else (PNG, WebP, GIF, TIFF, BMP, CMYK/YCCK JPEG, multi-picture MPO, a JPEG with bytes
  after its EOI or without one, that is a truncated one): the exact CPU path
  (:class:`~consumer.preprocess.ImagePreparer`), whose pixels join the same batch.
- A JPEG the device decoder refuses (``None``, an error, a size that disagrees with the header)
  goes to the exact CPU path too, which decodes it or raises the exact ``error-code``. One bad
  image never fails the batch.

EXIF orientation is read from the header by Pillow (the exact path's own reading) and applied to
the decoded tensor with flips and transposes, for both backends: torchvision ignores
``apply_exif_orientation`` on CUDA, and one reading keeps the two paths from disagreeing.

The resize and crop are timm's own eval stages (:func:`~consumer.preprocess.pil_stages`) applied
to float32 tensors, one call per distinct decoded size (images of one size are stacked), each
resize in Pillow's order (one pass per side, each rounded to 8 bits: horizontal first, but
vertical first where Pillow 13 takes it so), then rounded to uint8. Float32 on every device, so
the same code on ``device="cpu"`` measures the tolerance on a machine without a GPU: with
libjpeg-turbo (Pillow's decoder) the pixels equal the exact path's but for about 1% or fewer one
level apart. What remains is nvJPEG's IDCT and chroma upsampling:
features within a relative L2 error of 0.01 and a cosine similarity of at least 0.9999 (tested).

Backends. ``nvimgcodec`` (``pip install 'serverless-bottleneck[gpu]'``) is the default where it is
installed: its batched decode returns ``None`` for the images it cannot decode and decodes the rest,
it uses the hardware JPEG engines of A100/H100/H200/L4, and it is maintained for exactly this.
``torchvision``'s ``decode_jpeg(list, device="cuda")`` is the fallback: it ships with torch, but
torchvision 0.29 deprecates its decoders, and one undecodable image makes it raise for the whole
list (it returns no partial results), so a failed batch is decoded again one image at a time to
find the culprit. On ``device="cpu"`` it is libjpeg-turbo, the decoder Pillow uses.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from PIL import Image

from consumer.decode import DecodeLimits, open_checked
from consumer.errors import ConfigError, Failure, classify
from consumer.pil_resize import pillow_resizes_vertically_first
from consumer.preprocess import ImagePreparer, InputSpec, pil_stages

log = logging.getLogger(__name__)

BackendName = Literal["auto", "nvimgcodec", "torchvision"]
Route = Literal["device", "host", "device-refused"]
"""Where an image was decoded: on the device; on the host because of its header; on the host
because the device decoder refused it. A failed image keeps the route it failed on."""

# The resize filters that have a tensor implementation matching Pillow's within rounding.
# (torchvision's tensor "nearest" is not Pillow's, and box, hamming and lanczos have none.)
TENSOR_INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")

# Pixels stacked into one float32 resize call (12 bytes each): 64 Mpx is 768 MiB of device
# memory, four 12 Mpx photos or 340 500x375 images.
MAX_RESIZE_PIXELS = 64_000_000

_EXIF_ORIENTATION = 0x0112
_JPEG_EOI = b"\xff\xd9"


class JpegDecoder(Protocol):
    """A batched JPEG decoder: encoded JPEGs to ``(3, H, W)`` uint8 RGB tensors on its device.

    Pixels are returned as stored (no EXIF orientation). ``None`` marks an image it could not
    decode; it must not raise for one bad image.
    """

    name: str

    def __call__(self, items: Sequence[bytes]) -> list[torch.Tensor | None]: ...


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """The decoded micro-batch: the images that decoded, and a failure for each one that did not.

    ``pixels`` is ``(len(indices), 3, H, W)`` uint8 on the device in channels_last memory, so
    :attr:`nhwc` is a contiguous view. Row ``r`` is item ``indices[r]`` (ascending).
    """

    pixels: torch.Tensor
    indices: tuple[int, ...]
    failures: dict[int, Failure]
    routes: tuple[Route, ...]

    @property
    def nhwc(self) -> torch.Tensor:
        """The ``(N, H, W, 3)`` view that :meth:`consumer.model.Backbone.submit` takes."""
        return self.pixels.permute(0, 2, 3, 1)


class GpuBatchDecoder:
    """Encoded images to the model's uint8 input on ``device``, a micro-batch at a time.

    ``backend`` names the JPEG decoder (``auto``: nvimgcodec where installed on CUDA, else
    torchvision) or is a :class:`JpegDecoder`. ``host`` is the exact CPU path (default: an
    :class:`~consumer.preprocess.ImagePreparer` in this process; the crash-isolated
    :class:`~consumer.decode_pool.DecodeProcesses` fit too). ``host_pool`` runs it for the images
    that need it while the device decodes the rest; without one they run in the calling thread.
    :meth:`decode` may be called from several threads (the device work takes turns). Raises
    :class:`ConfigError` if timm's transform for ``spec`` has no tensor version.
    """

    def __init__(
        self,
        spec: InputSpec,
        limits: DecodeLimits,
        device: torch.device,
        backend: BackendName | JpegDecoder = "auto",
        *,
        host: Callable[[bytes], np.ndarray] | None = None,
        host_pool: Executor | None = None,
    ) -> None:
        if spec.interpolation not in TENSOR_INTERPOLATIONS:
            raise ConfigError(
                f"--decode cuda: the model resizes with {spec.interpolation!r}, which has no "
                f"tensor implementation ({', '.join(TENSOR_INTERPOLATIONS)}); use --decode pil"
            )
        self.spec = spec
        self.limits = limits
        self.device = device
        self.host = host or ImagePreparer(spec, limits)
        self.host_pool = host_pool
        self.jpeg = backend if not isinstance(backend, str) else make_jpeg_decoder(backend, device)
        self.stages = tensor_stages(spec)
        # Not every timm stage runs on tensors (crop_mode "border" pads with a per-channel fill):
        # try them once, on a wide image.
        try:
            self.crop([torch.zeros((3, spec.height + 3, 3 * spec.width), dtype=torch.uint8)])
        except Exception as exc:
            raise ConfigError(
                f"--decode cuda: timm's eval transform for this model ({spec.crop_mode} crop) "
                f"does not run on tensors ({exc}); use --decode pil"
            ) from None
        self._device_lock = threading.Lock()

    def decode(self, items: Sequence[bytes]) -> DecodedBatch:
        """Decode, resize and crop ``items``; a failure per image that cannot be decoded.

        Raises only for what no single image causes (the device failing while the batch is
        assembled); per-image problems, including device refusals, end in ``failures``.
        """
        routes: list[Route] = ["host"] * len(items)
        failures: dict[int, Failure] = {}
        on_host: dict[int, Future[np.ndarray]] = {}
        for_device: dict[int, DeviceJob] = {}
        for index, data in enumerate(items):
            try:
                job = route(data, self.limits)
            except Exception as exc:
                failures[index] = classify(exc)
                continue
            if job is None:
                on_host[index] = self._on_host(data)
            else:
                for_device[index] = job

        groups: list[tuple[list[int], torch.Tensor]] = []
        if for_device:
            with self._device_lock:
                groups, refused = self._on_device(items, for_device)
            for index in refused:
                routes[index] = "device-refused"
                on_host[index] = self._on_host(items[index])
            for rows, _ in groups:
                for index in rows:
                    routes[index] = "device"

        host_pixels: dict[int, np.ndarray] = {}
        for index, future in on_host.items():
            try:
                host_pixels[index] = future.result()
            except Exception as exc:
                failures[index] = classify(exc)
        return self._assemble(groups, host_pixels, failures, routes)

    def _on_host(self, data: bytes) -> Future[np.ndarray]:
        if self.host_pool is not None:
            return self.host_pool.submit(self.host, data)
        future: Future[np.ndarray] = Future()
        try:
            future.set_result(self.host(data))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _on_device(
        self, items: Sequence[bytes], jobs: dict[int, DeviceJob]
    ) -> tuple[list[tuple[list[int], torch.Tensor]], list[int]]:
        """Decode, orient, resize and crop on the device: the cropped groups, and the refused."""
        indices = list(jobs)
        decoded = self.jpeg([items[i] for i in indices])
        refused: list[int] = []
        by_size: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for index, image in zip(indices, decoded, strict=True):
            if image is None or not _as_declared(image, jobs[index].size):
                refused.append(index)
                continue
            oriented = orient(image, jobs[index].orientation)
            by_size.setdefault(tuple(oriented.shape), []).append((index, oriented))
        groups: list[tuple[list[int], torch.Tensor]] = []
        for members in _chunks(list(by_size.values())):
            rows = [index for index, _ in members]
            try:
                groups.append((rows, self.crop([image for _, image in members])))
            except Exception:
                # Out of device memory on a group of huge images, say: the host path still has
                # the exact answer for each of them.
                log.warning(
                    "device resize failed; %d images go to the CPU", len(rows), exc_info=True
                )
                refused.extend(rows)
        if refused:
            log.debug("device decoder refused %d of %d JPEGs", len(refused), len(indices))
        return groups, refused

    def crop(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """timm's resize and crop for same-size ``(3, h, w)`` uint8 images: ``(k, 3, H, W)`` uint8.

        In float32 on every device, so the CPU computes what the GPU computes (up to the order of
        float sums): that is what lets the tolerance be tested without a GPU.
        """
        batch = torch.stack(list(images)).to(torch.float32)
        for stage in self.stages:
            batch = stage(batch)
        return batch.round_().clamp_(0, 255).to(torch.uint8)

    def _assemble(
        self,
        groups: list[tuple[list[int], torch.Tensor]],
        host_pixels: dict[int, np.ndarray],
        failures: dict[int, Failure],
        routes: list[Route],
    ) -> DecodedBatch:
        decoded = sorted([i for rows, _ in groups for i in rows] + list(host_pixels))
        row_of = {index: row for row, index in enumerate(decoded)}
        pixels = torch.empty(
            (len(decoded), 3, self.spec.height, self.spec.width),
            dtype=torch.uint8,
            device=self.device,
        ).contiguous(memory_format=torch.channels_last)
        for rows, cropped in groups:
            pixels[_rows(rows, row_of)] = cropped
        if host_pixels:
            hosted = torch.from_numpy(np.stack(list(host_pixels.values())))
            if self.device.type == "cuda":
                # Pinned and non_blocking: a pageable copy would wait for the previous batch's
                # forward pass, still queued on the same stream.
                hosted = hosted.pin_memory()
            on_device = hosted.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            pixels[_rows(list(host_pixels), row_of)] = on_device
        return DecodedBatch(pixels, tuple(decoded), failures, tuple(routes))


Stage = Callable[[torch.Tensor], torch.Tensor]


def tensor_stages(spec: InputSpec) -> list[Stage]:
    """timm's eval stages for ``spec`` (up to the tensor conversion), for float ``(N, 3, h, w)``
    pixel values, each resize done in Pillow's order (see :func:`pillow_order`)."""
    from timm.data.transforms import ResizeKeepRatio
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(spec.interpolation)
    compose: Any = pil_stages(spec)  # a torchvision Compose
    return [
        pillow_order(stage, mode)
        if isinstance(stage, transforms.Resize | ResizeKeepRatio)
        else cast(Stage, stage)
        for stage in compose.transforms
    ]


def pillow_order(resize: Any, mode: Any) -> Stage:
    """A timm resize stage done as Pillow's resampler does it: one pass per side, each rounded
    to 8 bits, in the order the installed Pillow takes (horizontal first but where Pillow 13
    takes the vertical first: images over twice as tall as wide); a pass is skipped where that
    side keeps its size.

    One 2-D resize in float rounds once and leaves 13-20% of the pixels one level from Pillow's;
    these two passes leave about 1% or fewer (often none); the two in the other order, 10-20%.
    The output size is the stage's own, found on a meta tensor (no pixels).
    """
    from torchvision.transforms import functional

    def resize_like_pillow(pixels: torch.Tensor) -> torch.Tensor:
        height, width = resize(torch.empty(pixels.shape[-3:], device="meta")).shape[-2:]
        in_height, in_width = pixels.shape[-2:]
        if pillow_resizes_vertically_first(in_width, in_height, width, height):
            sides = [[height, in_width], [height, width]]
        else:
            sides = [[in_height, width], [height, width]]
        for side in sides:
            if side != list(pixels.shape[-2:]):
                pixels = functional.resize(pixels, side, mode, antialias=True)
                pixels = pixels.round_().clamp_(0, 255)
        return pixels

    return resize_like_pillow


def _rows(indices: list[int], row_of: dict[int, int]) -> torch.Tensor:
    return torch.tensor([row_of[i] for i in indices], dtype=torch.long)


@dataclass(frozen=True, slots=True)
class DeviceJob:
    """A JPEG the device may decode: its stored size (width, height) and EXIF orientation."""

    size: tuple[int, int]
    orientation: int


def route(data: bytes, limits: DecodeLimits) -> DeviceJob | None:
    """Decide from the header of ``data`` whether the device may decode it (None: the exact CPU
    path). Raises :class:`PermanentError` for what the exact path refuses from the header."""
    image = open_checked(data, limits)
    # CMYK/YCCK JPEGs need Adobe's inversion, and MPO is several JPEGs in one file: Pillow's.
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or _stored_as_rgb(image):
        return None
    # A JPEG that does not end in EOI is truncated (or carries trailing bytes): nvJPEG may fill
    # the missing part silently, where Pillow names the failure exactly.
    if not data.endswith(_JPEG_EOI):
        return None
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        # The exact path keeps the stored pixels of damaged EXIF; it decides here too.
        return None
    return DeviceJob(image.size, orientation if orientation in _ORIENT else 1)


def _stored_as_rgb(image: Image.Image) -> bool:
    # libjpeg's rule for 3-component JPEGs without YCbCr (an Adobe marker with transform 0, or
    # components named R, G, B): decoders that assume YCbCr would shift every colour.
    ids = tuple(layer[0] for layer in getattr(image, "layer", ()))
    return image.info.get("adobe_transform") == 0 or ids == (82, 71, 66)


_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip((-2, -1)),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.flip((-2, -1)).transpose(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(..., H, W)`` pixels as stored to upright, as Pillow's ``exif_transpose`` does."""
    return _ORIENT[orientation](image)


def _as_declared(image: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether a decoded image is ``(3, H, W)`` uint8 of the header's size: anything else is a
    decoder's misreading, and the exact path decodes that image instead."""
    width, height = size
    return image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width)


def _chunks(
    same_size: list[list[tuple[int, torch.Tensor]]],
) -> list[list[tuple[int, torch.Tensor]]]:
    """Split groups of same-size images so that one resize call holds at most
    :data:`MAX_RESIZE_PIXELS` of float32 input (any single image always fits a chunk)."""
    chunks: list[list[tuple[int, torch.Tensor]]] = []
    for members in same_size:
        per_image = members[0][1].shape[-1] * members[0][1].shape[-2]
        step = max(1, MAX_RESIZE_PIXELS // per_image)
        chunks.extend(members[start : start + step] for start in range(0, len(members), step))
    return chunks


def make_jpeg_decoder(backend: BackendName, device: torch.device) -> JpegDecoder:
    """The named batched JPEG decoder on ``device``, checked on a small JPEG before use.

    ``auto`` is nvimgcodec on CUDA where it is installed and works, else torchvision. Raises
    :class:`ConfigError` if the named backend is missing or cannot decode.
    """
    if backend == "auto":
        if device.type == "cuda":
            try:
                return make_jpeg_decoder("nvimgcodec", device)
            except ConfigError as exc:
                log.info("nvimgcodec unavailable, decoding JPEGs with torchvision: %s", exc)
        return make_jpeg_decoder("torchvision", device)
    decoder: JpegDecoder
    try:
        if backend == "nvimgcodec":
            decoder = NvImgCodecDecoder(device)
        elif backend == "torchvision":
            decoder = TorchvisionDecoder(device)
        else:
            raise ConfigError(f"--decode cuda: unknown JPEG backend {backend!r}")
        probe = decoder([_PROBE_JPEG])[0]
    except (ImportError, RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(
            f"--decode cuda: the {backend} JPEG decoder cannot start: {exc}"
        ) from None
    if probe is None or tuple(probe.shape) != (3, 8, 16):
        # nvimgcodec without its nvjpeg wheel loads fine and then refuses every image.
        raise ConfigError(f"--decode cuda: the {backend} JPEG decoder cannot decode a JPEG")
    return decoder


def _probe_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(buffer, "JPEG")
    return buffer.getvalue()


_PROBE_JPEG = _probe_jpeg()


class NvImgCodecDecoder:
    """nvImageCodec's batched decode on a CUDA device; ``None`` for what it cannot decode.

    Only its GPU backends are allowed: what they refuse goes to Pillow, the exact path, rather
    than to nvImageCodec's own CPU decoder. Fancy (smooth) chroma upsampling is what libjpeg and
    so Pillow do by default.
    """

    name = "nvimgcodec"

    def __init__(self, device: torch.device) -> None:
        from nvidia import nvimgcodec  # the optional [gpu] extra

        if device.type != "cuda":
            raise ValueError(f"nvimgcodec decodes on CUDA devices, not {device}")
        self._codec: Any = nvimgcodec
        self.device = device
        kinds = (
            nvimgcodec.BackendKind.HW_GPU_ONLY,
            nvimgcodec.BackendKind.GPU_ONLY,
            nvimgcodec.BackendKind.HYBRID_CPU_GPU,
        )
        self._decoder = nvimgcodec.Decoder(
            device_id=torch.cuda.current_device() if device.index is None else device.index,
            backends=[nvimgcodec.Backend(kind) for kind in kinds],
            options=":fancy_upsampling=1",
        )
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB
        )

    def __call__(self, items: Sequence[bytes]) -> list[torch.Tensor | None]:
        streams = {i: self._parse(data) for i, data in enumerate(items)}
        parsed = {i: stream for i, stream in streams.items() if stream is not None}
        out: list[torch.Tensor | None] = [None] * len(items)
        if not parsed:
            return out
        try:
            images = self._decoder.decode(
                list(parsed.values()),
                params=self._params,
                cuda_stream=torch.cuda.current_stream(self.device).cuda_stream,
            )
        except Exception:
            # Every image still has the host path: a slow batch, not a lost one.
            log.warning("nvimgcodec failed on a whole batch", exc_info=True)
            return out
        for index, image in zip(parsed, images, strict=True):
            if image is not None:
                # HWC interleaved RGB on the device; the CHW view costs nothing.
                out[index] = torch.from_dlpack(image).permute(2, 0, 1)
        return out

    def _parse(self, data: bytes) -> Any:
        try:
            return self._codec.CodeStream(data)
        except Exception:
            return None


class TorchvisionDecoder:
    """torchvision's ``decode_jpeg`` on a list: batched nvJPEG on CUDA, libjpeg-turbo on the CPU.

    It raises for the whole list when one image fails, so a failed batch is decoded again one
    image at a time and only the culprits become ``None``.
    """

    name = "torchvision"

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB

    def __call__(self, items: Sequence[bytes]) -> list[torch.Tensor | None]:
        # decode_jpeg needs writable CPU tensors; copying a few hundred kB costs microseconds.
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in items]
        try:
            return list(self._decode(encoded))
        except RuntimeError:
            return [self._one(tensor) for tensor in encoded]

    def _one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode([encoded])[0]
        except RuntimeError:
            return None

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        return cast(
            list[torch.Tensor], self._decode_jpeg(encoded, mode=self._rgb, device=self.device)
        )
