"""The backbone: a timm model without its classifier, on the chosen device and precision.

:class:`Backbone` takes uint8 NHWC batches (pinned host memory on CUDA), copies them without
blocking, normalises on the device and runs the forward pass under ``torch.inference_mode``,
returning float32 features: the pooled pre-logits vector (``pool="avg"``, the n-1 layer) or the
unpooled feature map (``pool="none"``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from consumer.errors import ConfigError
from consumer.preprocess import DeviceNormalizer, InputSpec
from consumer.weights import BAKE_HINT, WeightsSource

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA device when one is visible, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def select_precision(spec: str, device: torch.device) -> str:
    """``auto`` is bf16 on a CUDA device that supports it, else fp32."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if spec == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16: not supported on the CPU (use bf16 or fp32)")
    return spec


def create_model(name: str, weights: WeightsSource) -> tuple[torch.nn.Module, str]:
    """Build ``name`` without its classifier and load ``weights``; return it and its identity.

    Unknown models and unavailable pretrained weights raise :class:`ConfigError` in one line.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    try:
        if weights.kind == "random":
            # Seeded so that two workers (or a test and the consumer) get the same numbers.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(weights.seed)
                model = timm.create_model(name, pretrained=False, **kwargs)
        elif weights.kind == "file":
            # timm's own loader: it drops the classifier and applies the model's filter_fn.
            overlay = {"file": str(weights.file)}
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        else:
            model = timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"--model: {name!r} is not a timm model") from None
        raise ConfigError(
            f"--weights {_describe(weights)}: cannot load into {name}: {_line(exc)}"
        ) from None
    except (OSError, ValueError) as exc:
        if weights.kind == "pretrained":
            raise ConfigError(
                f"--weights pretrained: no cached weights for {name} and the Hugging Face hub is "
                f"unreachable ({type(exc).__name__}); {BAKE_HINT}"
            ) from None
        raise ConfigError(
            f"--weights {_describe(weights)}: cannot load into {name}: {_line(exc)}"
        ) from None
    model.eval()
    return model, _identity(model, weights)


def _identity(model: torch.nn.Module, weights: WeightsSource) -> str:
    if weights.kind != "pretrained":
        return weights.identity
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("architecture", "")
    return f"pretrained:{source}"


def model_label(model: torch.nn.Module, requested: str) -> str:
    """The resolved ``architecture.tag`` (``resnet50`` resolves to its default tag)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch and tag:
        return f"{arch}.{tag}"
    return str(arch or requested)


def _describe(weights: WeightsSource) -> str:
    return str(weights.file) if weights.file else weights.kind


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


@dataclass(frozen=True, slots=True)
class PendingFeatures:
    """Features of one batch whose device-to-host copy may still be in flight."""

    host: torch.Tensor
    ready: torch.cuda.Event | None

    def result(self) -> np.ndarray:
        """Wait for the copy and return float32 features, one row per image."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


class Backbone:
    """A model ready for inference: device, precision, memory format and pooling fixed."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: InputSpec,
        *,
        device: torch.device,
        precision: str,
        pool: str,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        self.spec = spec
        self.device = device
        self.precision = precision
        self.pool = pool
        self.channels_last = channels_last
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        # What --pool asks for: timm's pooled pre-logits (num_classes=0) or the feature map.
        forward = model if pool == "avg" else model.forward_features
        self._forward = cast(Callable[[torch.Tensor], torch.Tensor], forward)
        self.compiled = compile
        if compile:
            # dynamic=True: the last batch of a burst is smaller, and a recompile per batch
            # size would stall the device for seconds each time.
            self._forward = cast(
                Callable[[torch.Tensor], torch.Tensor], torch.compile(self._forward, dynamic=True)
            )
        self.normalize = DeviceNormalizer(spec, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def stack(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """One uint8 ``(N, H, W, 3)`` batch, in pinned memory when the device is CUDA.

        Images already on the device (``--decode cuda``) are stacked there; a batch mixing them
        with host images (Pillow fallbacks) copies the host ones over.
        """
        if any(isinstance(image, torch.Tensor) for image in images):
            return torch.stack(
                [
                    image.to(self.device, non_blocking=True)
                    if isinstance(image, torch.Tensor)
                    else torch.from_numpy(image).to(self.device, non_blocking=True)
                    for image in images
                ]
            )
        out = torch.empty(
            (len(images), *images[0].shape), dtype=torch.uint8, pin_memory=self.pin_memory
        )
        np.stack(images, out=out.numpy())
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_PRECISIONS[self.precision])

    def submit(self, batch: torch.Tensor) -> PendingFeatures:
        """Start the forward pass for a uint8 ``(N, H, W, 3)`` batch; return without waiting."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            x = self.normalize(x, channels_last=self.channels_last)
            with self._autocast():
                out = self._forward(x)
            out = out.float()
            if self.device.type != "cuda":
                return PendingFeatures(out.contiguous(), None)
            host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(out, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return PendingFeatures(host, ready)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Synchronous :meth:`submit`: the features of ``batch`` as a float32 array."""
        return self.submit(batch).result()

    def warm_up(self, batch_size: int) -> None:
        """Run full and single-image batches once, so compilation and cuDNN's algorithm search
        happen before the first message is received, not while its visibility runs."""
        for n in sorted({batch_size, 1}, reverse=True):
            self(torch.zeros((n, self.spec.height, self.spec.width, 3), dtype=torch.uint8))

    def feature_shape(self) -> tuple[int, ...]:
        """The per-image output shape, found with one zero image (cheap, and always right)."""
        probe = torch.zeros((1, self.spec.height, self.spec.width, 3), dtype=torch.uint8)
        return tuple(self(probe).shape[1:])
