"""The torch-free resize and crop give exactly the pixels of timm's own eval transform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import consumer.pil_resize as pil_resize
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
    InputSpec((3, 224, 224), "box", MEAN, STD, 0.875, "center"),
    InputSpec((3, 224, 224), "hamming", MEAN, STD, 0.875, "center"),
]
# Both sides resized, one side only (256 is 224 / 0.875), none, and odd shapes; portrait ones,
# whose horizontal pass runs on a strip of the rows, large ones (a phone's 1080x1920), and ones
# over twice as tall as wide (a phone's screenshot), which Pillow 13 resizes vertically first.
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
    (300, 1200),
    (1080, 1920),
    (2000, 1499),
    (1080, 2340),
    (257, 600),
]


def shapes_unlike_timm(spec: InputSpec) -> list[tuple[int, int]]:
    """The shapes of :data:`SIZES` whose pixels the torch-free resize and crop for ``spec``
    (as an image, and as an array) do not give exactly as timm's eval transform does (each the
    model's size either way)."""
    ours = plain_stages(spec.input_size, spec.interpolation, spec.crop_pct, spec.crop_mode)
    timms = pil_stages(spec)
    assert ours is not None
    unlike = []
    for seed, (width, height) in enumerate(SIZES):
        image = Image.fromarray(photo_array(width, height, seed))
        expected, got = np.asarray(timms(image)), np.asarray(ours(image))
        array = ours.to_array(image)  # the vector passes, where they apply (consumer.resample)
        assert got.shape == array.shape == expected.shape == (spec.height, spec.width, 3)
        if not (np.array_equal(got, expected) and np.array_equal(array, expected)):
            unlike.append((width, height))
    return unlike


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.input_size[1]}-{s.interpolation}-{s.crop_pct}"
)
def test_same_pixels_as_timm_for_every_shape(spec: InputSpec) -> None:
    # GIVEN timm's eval transform and the torch-free one for the same settings
    # WHEN both resize and crop the same images THEN the pixels are identical, byte for byte
    assert shapes_unlike_timm(spec) == []


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


def test_large_photos_skip_the_strip_and_keep_timms_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a strip limit that every image here passes (as a 12-megapixel photo's does)
    monkeypatch.setattr(pil_resize, "_MAX_STRIP_BYTES", 0)

    # WHEN each is resized and cropped with the passes on whole images THEN the pixels are timm's
    assert shapes_unlike_timm(SPECS[0]) == []
    assert shapes_unlike_timm(SPECS[5]) == []


@pytest.mark.skipif(pil_resize._VERTICAL_FIRST is None, reason="this Pillow resizes in one call")
def test_the_passes_run_in_pillows_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the installed Pillow's order of passes, turned around
    rule = pil_resize._VERTICAL_FIRST
    assert rule is not None
    monkeypatch.setattr(pil_resize, "_VERTICAL_FIRST", lambda *shape: not rule(*shape))

    # WHEN every shape is resized and cropped in the wrong order THEN some pixels differ: the
    # order is part of the result, and the shapes above tell
    assert shapes_unlike_timm(SPECS[0]) != []


def test_an_unknown_pillow_gets_the_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a Pillow release whose order of passes this module does not know
    assert pil_resize._vertical_first_rule("14.0.0") is None
    assert pil_resize._vertical_first_rule("12.2.0") is None
    assert pil_resize._vertical_first_rule("13.1.0") is None
    assert pil_resize._vertical_first_rule("13.0.0.dev0") is not None
    monkeypatch.setattr(pil_resize, "_VERTICAL_FIRST", None)

    # WHEN it resizes and crops THEN the pixels are timm's still (one call, then the crop)
    assert shapes_unlike_timm(SPECS[0]) == []


def test_pillows_rules_by_release() -> None:
    # Pillow 13: vertical first when the height shrinks by over twice the width's pixels.
    rule_13 = pil_resize._vertical_first_rule("13.0.0")
    assert rule_13 is not None
    assert rule_13(300, 1200, 256, 1024)  # 176 rows less against 44 columns
    assert not rule_13(300, 600, 256, 512)  # 88 against 44: not over twice
    assert not rule_13(200, 1200, 256, 1536)  # the height grows
    # Before 12.2: horizontal first, always.
    rule_11 = pil_resize._vertical_first_rule("11.2.1")
    assert rule_11 is not None
    assert not rule_11(300, 1200, 256, 1024)
