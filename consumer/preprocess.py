"""Preprocessing that comes from the model: timm's own eval transform, split at the tensor step.

The host runs timm's PIL stages (resize, crop) and hands the device uint8 pixels; the device does
``ToTensor``'s ``/255`` and ``Normalize``'s ``(x - mean) / std`` with the same operations in the
same order, so fp32 features equal ``timm.data.create_transform(**cfg)`` + model exactly, while the
host moves a quarter of the bytes and does no float work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from consumer.decode import DecodeLimits, decode_image
from consumer.pil_resize import array_stages, plain_stages


@dataclass(frozen=True, slots=True)
class InputSpec:
    """The model's data config (``timm.data.resolve_data_config``), the numbers of preprocessing."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> InputSpec:
        """Resolve the eval data config timm publishes for ``model``."""
        import timm.data

        cfg = timm.data.resolve_data_config(model=model)
        return cls(
            input_size=tuple(int(v) for v in cfg["input_size"]),  # type: ignore[arg-type]
            interpolation=str(cfg["interpolation"]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            crop_mode=str(cfg.get("crop_mode") or "center"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    @property
    def scale_size(self) -> int:
        """The resize target before the crop (timm: ``floor(size / crop_pct)``)."""
        return max(math.floor(s / self.crop_pct) for s in self.input_size[1:])


PilStages = Callable[[Image.Image], Image.Image]


def pil_stages(spec: InputSpec) -> PilStages:
    """timm's eval transform for ``spec`` up to (not including) its tensor conversion.

    Raises ``RuntimeError`` if timm's transform does not end in ToTensor + Normalize with the
    spec's mean and std: the device-side normalisation would then no longer be exact.
    """
    import timm.data
    from torchvision import transforms

    compose = timm.data.create_transform(**spec.as_dict(), is_training=False)
    stages = list(compose.transforms)
    names = [type(stage).__name__ for stage in stages]
    if names[-2:] not in (["MaybeToTensor", "Normalize"], ["ToTensor", "Normalize"]):
        raise RuntimeError(f"unexpected timm eval transform {names}: cannot split it exactly")
    normalize = stages[-1]
    # timm may hand Normalize float32 tensors; the device applies float32 too, so compare there.
    if not (
        np.array_equal(_float32(normalize.mean), _float32(spec.mean))
        and np.array_equal(_float32(normalize.std), _float32(spec.std))
    ):
        raise RuntimeError("timm's Normalize disagrees with the resolved data config")
    return transforms.Compose(stages[:-2])


def _float32(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    return np.asarray(values, dtype=np.float32)


def check_hwc(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``array``, contiguous, once it has the model's ``(H, W, 3)`` shape."""
    expected = (spec.height, spec.width, 3)
    if array.shape != expected:
        raise RuntimeError(f"preprocessed image has shape {array.shape}, expected {expected}")
    return np.ascontiguousarray(array)


class DeviceNormalizer:
    """uint8 NHWC batch on the device to the model's normalised float NCHW input.

    The NHWC buffer permuted to NCHW *is* channels_last memory: the one copy made, to float32,
    keeps that layout (or makes the batch contiguous, for a model that runs so). The arithmetic
    mirrors torchvision's ``to_tensor`` (``/255`` in float32) then ``Normalize`` (``-mean``,
    ``/std``) so that results are bit-identical to timm's transform.
    """

    def __init__(self, spec: InputSpec, device: torch.device) -> None:
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        # One float copy in the layout the model takes, then each step in place: the same
        # operations in the same order, so the same bits, without a fresh batch-sized tensor per
        # step. On a CPU each of those was allocated (38 MB at 64 x 224 x 224), faulted in page
        # by page and freed: 1.4 ms of CPU per image against 0.5 in place, measured here.
        x = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=layout, copy=True)
        x.div_(255)
        x.sub_(self.mean)
        return x.div_(self.std)


Pixels = np.ndarray | torch.Tensor
"""A prepared image: ``(H, W, 3)`` uint8, on the host (numpy) or already on the device (tensor)."""


class Preparer(Protocol):
    """Encoded image bytes to the model's input pixels, under ``limits``."""

    limits: DecodeLimits

    def __call__(self, data: bytes) -> Pixels: ...


class ImagePreparer:
    """Encoded image bytes to the model's uint8 ``(H, W, 3)`` input: decode, resize, crop.

    ``draft`` enables Pillow's JPEG DCT scaling to about the resize target first (faster for
    large JPEGs, within a measured tolerance of the exact path; off by default).
    """

    def __init__(self, spec: InputSpec, limits: DecodeLimits, *, draft: bool = False) -> None:
        self.spec = spec
        self.limits = limits
        timms = pil_stages(spec)  # also checks that the tensor steps split off exactly
        # The same pixels without the waste (see consumer.pil_resize), where the transform allows.
        self.stages = (
            plain_stages(spec.input_size, spec.interpolation, spec.crop_pct, spec.crop_mode)
            or timms
        )
        self.draft_size = (spec.scale_size, spec.scale_size) if draft else None
        self._to_array = array_stages(self.stages)

    def __call__(self, data: bytes) -> np.ndarray:
        image = decode_image(data, self.limits, draft_size=self.draft_size)
        return check_hwc(self._to_array(image), self.spec)
