"""The backbone: a timm model with or without its head, on the chosen device and precision.

:class:`Backbone` takes uint8 NHWC batches (pinned host memory on CUDA), copies them without
blocking, normalises on the device and runs the forward pass under ``torch.inference_mode``,
returning float32 features: the pooled vector (``pool="avg"``), before the model's head (a
classifier's pre-logits, the n-1 layer) or after it (a CLIP image tower's projection), optionally
L2-normalised; or the unpooled feature map (``pool="none"``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from consumer.errors import ConfigError
from consumer.preprocess import DeviceNormalizer, InputSpec
from consumer.weights import BAKE_HINT, WeightsSource

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Image towers of contrastive image-text models whose timm head is the projection into the joint
# space, by the names timm gives them: "clip" (OpenAI CLIP, OpenCLIP, EVA-CLIP, MetaCLIP, DFN,
# TinyCLIP, MobileCLIP's "mclip", ViTamin's "datacomp1b_clip", the CLIP ResNets and ConvNeXts)
# and "pe_core" (Meta's Perception Encoder). SigLIP towers are left out: timm builds them with
# no head (their attention pool's output is the embedding), so keep and drop are the same.
_EMBEDDING_FAMILIES = ("clip", "pe_core")
# timm tags a tower fine-tuned into a classifier with the label set it learnt ("openai_ft_in1k",
# "laion2b_ft_in12k_in1k", "clip_laion2b_augreg_ft_in1k_384"): its head is then a classifier.
_CLASSIFIER_TAG = re.compile(r"(?:^|[_./-])in(?:1|12|21|22)k(?:[_./-]|$)")


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


def is_embedding_tower(pretrained_cfg: Mapping[str, Any]) -> bool:
    """Whether a timm pretrained config is a CLIP-family image tower whose head is a projection.

    Three things must hold: the names (architecture, tag, hub id) say CLIP or Perception Encoder,
    the config declares a head (``num_classes`` > 0: 512, 640, 768, 1024... for the projection's
    width), and the tag names no classification fine-tune (``in1k``, ``in12k``, ``in21k``,
    ``in22k``). Over timm's pretrained configs this splits them cleanly: every tower found has a
    projection-sized head, every CLIP-named model left out has 0, 1000 or 11821 outputs.
    """
    names = " ".join(
        str(pretrained_cfg.get(key) or "") for key in ("architecture", "tag", "hf_hub_id")
    ).lower()
    return (
        int(pretrained_cfg.get("num_classes") or 0) > 0
        and any(family in names for family in _EMBEDDING_FAMILIES)
        and _CLASSIFIER_TAG.search(names) is None
    )


def resolve_head(requested: str, name: str, pool: str) -> str:
    """``keep`` or ``drop`` for ``--head``: ``auto`` keeps a CLIP-family tower's head only.

    With ``--pool none`` the feature map comes before any head: ``drop``, and ``keep`` is an
    error. ``auto`` reads the model's pretrained config, without building the model.
    """
    if pool != "avg":
        if requested == "keep":
            raise ConfigError("--head keep: needs --pool avg (the feature map precedes the head)")
        return "drop"
    if requested != "auto":
        return requested
    cfg = _pretrained_cfg(name)
    return "keep" if cfg is not None and is_embedding_tower(cfg) else "drop"


def _pretrained_cfg(name: str) -> Mapping[str, Any] | None:
    """timm's pretrained config for ``name`` (the default tag when none is given); None for an
    architecture timm has no config for (create_model then reports an unknown model)."""
    import timm.models

    if name.startswith("hf-hub:"):
        try:
            # The hub's config.json, from the cache or the hub: what create_model reads too.
            loaded = timm.models.load_model_config_from_hf(name[len("hf-hub:") :])
        except Exception as exc:
            raise ConfigError(
                f"--head auto: cannot read the config of {name} ({type(exc).__name__}); "
                "pass --head keep or --head drop"
            ) from None
        return cast("Mapping[str, Any]", loaded[0])
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a known architecture with an unknown tag
        raise ConfigError(f"--model: {_line(exc)}") from None
    return None if cfg is None else cfg.to_dict()


def create_model(
    name: str, weights: WeightsSource, *, head: str = "drop"
) -> tuple[torch.nn.Module, str]:
    """Build ``name`` with its head (``keep``) or without it (``drop``) and load ``weights``;
    return it and its identity.

    Unknown models and unavailable pretrained weights raise :class:`ConfigError` in one line.
    """
    import timm

    # num_classes=0 replaces the head by an identity (timm's pre-logits); left out, the model
    # keeps the head its pretrained config declares, and its weights are loaded with it.
    kwargs: dict[str, Any] = {"num_classes": 0} if head == "drop" else {}
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


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm, in float32 on the features' device; a zero row stays
    zero (divided by 1, not by 0: never NaN)."""
    norm = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return features / torch.where(norm > 0, norm, torch.ones_like(norm))


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
        normalize: str = "none",
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        if normalize != "none" and pool != "avg":
            raise ConfigError(f"--normalize {normalize}: needs --pool avg")
        self.spec = spec
        self.device = device
        self.precision = precision
        self.pool = pool
        self.l2 = normalize == "l2"
        self.channels_last = channels_last
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        # What --pool asks for: the model's pooled output (pre-logits when it was built with
        # num_classes=0, the head's output when its head was kept) or the feature map.
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
            if self.l2:
                out = l2_normalize(out)
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
