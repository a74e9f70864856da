"""The torch-free resize and crop give exactly the pixels of timm's own eval transform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from consumer.pil_resize import plain_stages
from consumer.preprocess import InputSpec, pil_stages
from tests.corpus import photo_array

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPECS = [
    InputSpec((3, 224, 224), "bicubic", MEAN, STD, 0.875, "center"),  # resnet50.a1_in1k-like
    InputSpec((3, 224, 224), "bilinear", MEAN, STD, 0.95, "center"),
    InputSpec((3, 160, 160), "bicubic", MEAN, STD, 1.0, "center"),
    InputSpec((3, 32, 32), "bicubic", MEAN, STD, 0.9, "center"),  # timm's test_* models
    InputSpec((3, 160, 160), "bicubic", MEAN, STD, 0.875, "center"),  # test_vit
    InputSpec((3, 224, 224), "lanczos", MEAN, STD, 0.9, "center"),
    InputSpec((3, 224, 224), "nearest", MEAN, STD, 0.875, "center"),
]
# Both sides resized, one side only (256 is 224 / 0.875), none, and odd shapes.
SIZES = [
    (500, 375),
    (375, 500),
    (224, 224),
    (257, 256),
    (1000, 37),
    (3, 640),
    (97, 31),
    (256, 300),
    (301, 256),
    (256, 256),
    (1200, 900),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.input_size[1]}-{s.interpolation}-{s.crop_pct}"
)
def test_same_pixels_as_timm_for_every_shape(spec: InputSpec) -> None:
    # GIVEN timm's eval transform and the torch-free one for the same settings
    ours = plain_stages(spec.input_size, spec.interpolation, spec.crop_pct, spec.crop_mode)
    timms = pil_stages(spec)
    assert ours is not None
    for seed, (width, height) in enumerate(SIZES):
        image = Image.fromarray(photo_array(width, height, seed))

        # WHEN both resize and crop the same image
        expected = np.asarray(timms(image))
        got = np.asarray(ours(image))

        # THEN the pixels are identical, byte for byte
        assert got.shape == expected.shape == (spec.height, spec.width, 3)
        assert np.array_equal(got, expected), (width, height)


@pytest.mark.parametrize(
    ("input_size", "interpolation", "crop_pct", "crop_mode"),
    [
        ((3, 224, 224), "bicubic", 0.875, "squash"),
        ((3, 224, 224), "bicubic", 0.875, "border"),
        ((3, 224, 256), "bicubic", 0.875, "center"),  # not a square resize target
        ((3, 224, 224), "bicubic", 1.15, "center"),  # would pad
        ((3, 224, 224), "random", 0.875, "center"),
    ],
)
def test_any_other_transform_is_left_to_timm(
    input_size: tuple[int, int, int], interpolation: str, crop_pct: float, crop_mode: str
) -> None:
    assert plain_stages(input_size, interpolation, crop_pct, crop_mode) is None
