"""Parity: the consumer's features equal timm's own eval transform + model (fp32, CPU)."""

from __future__ import annotations

import io
from typing import Any, cast

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from consumer.config import Config
from consumer.decode import DecodeLimits
from consumer.preprocess import DeviceNormalizer, ImagePreparer, InputSpec
from consumer.runtime import build_backbone
from tests.corpus import photo_jpeg

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"


def _images() -> list[bytes]:
    # Landscape, portrait, smaller than the crop (upscaled), and a panorama.
    sizes = [(500, 375), (375, 500), (96, 80), (900, 200)]
    return [photo_jpeg(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def _png(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="PNG")
    return out.getvalue()


def _reference(arch: str, images: list[bytes], pool: str, seed: int) -> np.ndarray:
    """timm's documented recipe, written independently of the consumer's code."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    batch = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.inference_mode():
        out = model(batch) if pool == "avg" else cast(Any, model).forward_features(batch)
    return out.numpy()


def _consumer(
    arch: str, images: list[bytes], pool: str, seed: int, channels_last: bool
) -> np.ndarray:
    config = Config.from_args(
        [
            *("--queue-url", QUEUE, "--output", "s3://feats/x/", "--model", arch),
            *("--weights", "random", "--seed", str(seed), "--pool", pool, "--device", "cpu"),
            *("--precision", "fp32", "--channels-last", str(channels_last)),
        ],
        {},
    )
    backbone, _ = build_backbone(config)
    prepare = ImagePreparer(backbone.spec, DecodeLimits())
    return backbone(backbone.stack([prepare(b) for b in images]))


def _max_relative(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
def test_the_models_input_is_timms_tensor_bit_for_bit(channels_last: bool) -> None:
    # GIVEN timm's eval transform, and the consumer's uint8 pixels of the same photos, batched
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    spec = InputSpec.from_model(model)
    prepare = ImagePreparer(spec, DecodeLimits())
    images = _images()
    batch = torch.from_numpy(np.stack([prepare(b) for b in images]))
    ref = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])

    # WHEN the device-side normaliser turns the batch into the model's input
    ours = DeviceNormalizer(spec, torch.device("cpu"))(batch, channels_last=channels_last)

    # THEN it is timm's tensor exactly, in the layout asked for
    assert torch.equal(ours, ref)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert ours.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_pooled_features_match_timm(arch: str) -> None:
    # GIVEN a CNN or a ViT with seeded random weights and four differently shaped photos
    images = _images()
    # WHEN the consumer computes features, and timm's own transform + model does too
    ours = _consumer(arch, images, "avg", seed=3, channels_last=True)
    ref = _reference(arch, images, "avg", seed=3)
    # THEN they agree to 1e-5 (relative to the largest feature), image by image
    assert ours.shape == ref.shape
    assert _max_relative(ours, ref) < 1e-5


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_unpooled_feature_maps_match_timm(arch: str) -> None:
    images = [_png(b) for b in _images()[:2]]
    ours = _consumer(arch, images, "none", seed=5, channels_last=False)
    ref = _reference(arch, images, "none", seed=5)
    assert ours.shape == ref.shape
    assert _max_relative(ours, ref) < 1e-5


def test_different_seeds_give_different_features() -> None:
    # The check above must be able to fail: other weights, other numbers.
    images = _images()[:1]
    ours = _consumer("test_resnet", images, "avg", seed=1, channels_last=True)
    ref = _reference("test_resnet", images, "avg", seed=2)
    assert _max_relative(ours, ref) > 1e-3
