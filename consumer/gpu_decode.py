"""``--decode cuda``: JPEGs decoded by nvJPEG and resized on the GPU, the rest by Pillow.

On a GPU host Pillow's decode is the host work that limits resnet50-class models (about 2 ms of
CPU per 500x375 JPEG). torchvision's ``decode_jpeg(device="cuda")`` moves it to the GPU's JPEG
engine; the resize and crop then run on the decoded tensor with the same torchvision transforms
timm's eval transform uses (antialiased), so the only differences from the exact path are the
JPEG decoder's IDCT and upsampling and the tensor resize's rounding: a tolerance measured in the
tests, never a silent default.

Every limit of the exact path still applies first (Pillow parses the header only: bytes, pixel
count, format). Anything that is not a baseline RGB/greyscale JPEG (PNG, CMYK JPEG, ...) or that
nvJPEG fails on goes through Pillow, which then also gives the exact failure code (truncated, ...).
The same code runs on the CPU (``device="cpu"``), which is how it is tested without a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from consumer.decode import DecodeLimits, open_checked
from consumer.preprocess import ImagePreparer, InputSpec, pil_stages


class TensorImagePreparer:
    """Encoded bytes to the model's ``(H, W, 3)`` uint8 input, as a tensor on ``device``."""

    def __init__(self, spec: InputSpec, limits: DecodeLimits, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.spec = spec
        self.limits = limits
        self.device = device
        self.fallback = ImagePreparer(spec, limits)
        # timm's Resize/CenterCrop objects accept CHW tensors as well as PIL images.
        self.stages = cast(Callable[[torch.Tensor], torch.Tensor], pil_stages(spec))
        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        # nvJPEG handles are per device and torchvision's single-image path is not documented
        # as thread-safe; the GPU work is short, so the decode threads take turns.
        self._lock = threading.Lock() if device.type == "cuda" else None

    def __call__(self, data: bytes) -> np.ndarray | torch.Tensor:
        header = open_checked(data, self.limits)
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return self.fallback(data)
        try:
            return self._on_device(data)
        except RuntimeError:
            # nvJPEG refuses some valid files (unusual subsampling, progressive on old drivers)
            # and all damaged ones: Pillow then decodes it, or names the failure exactly.
            return self.fallback(data)

    def _on_device(self, data: bytes) -> torch.Tensor:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self._lock is None:
            return self._prepare(encoded)
        with self._lock:
            return self._prepare(encoded)

    def _prepare(self, encoded: torch.Tensor) -> torch.Tensor:
        image = self._decode_jpeg(
            encoded, mode=self._rgb, device=self.device, apply_exif_orientation=True
        )
        cropped = self.stages(image)
        expected = (3, self.spec.height, self.spec.width)
        if tuple(cropped.shape) != expected:
            raise RuntimeError(f"resized tensor has shape {tuple(cropped.shape)}, not {expected}")
        return cropped.permute(1, 2, 0).contiguous()
