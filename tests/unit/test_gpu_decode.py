"""``--decode cuda``'s tensor path, run on the CPU here (and on CUDA where there is one)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from consumer.decode import DecodeLimits
from consumer.errors import PermanentError
from consumer.gpu_decode import TensorImagePreparer
from consumer.preprocess import ImagePreparer, InputSpec
from tests.corpus import BAD_CASES, GOOD_CASES, photo_jpeg

# Measured on the CPU tensor path: at most 1 grey level from Pillow (rounding of the tensor
# resize), mean about 0.1-0.2. nvJPEG's IDCT may differ by a little more: see the gpu test.
CPU_MAX_LEVELS = 1


def _spec(model: str) -> InputSpec:
    return InputSpec.from_model(timm.create_model(model, pretrained=False, num_classes=0))


def _host(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    return pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (2000, 1500)])
def test_tensor_path_is_within_one_level_of_pillow(model: str, size: tuple[int, int]) -> None:
    spec = _spec(model)
    data = photo_jpeg(*size, seed=21)

    ours = TensorImagePreparer(spec, DecodeLimits(), torch.device("cpu"))(data)
    exact = ImagePreparer(spec, DecodeLimits())(data)

    assert isinstance(ours, torch.Tensor)  # it really took the tensor path
    diff = np.abs(_host(ours).astype(int) - exact.astype(int))
    assert diff.max() <= CPU_MAX_LEVELS


@pytest.mark.parametrize("name", ["rgb.png", "cmyk.jpg", "animated.gif", "gray16.png"])
def test_non_jpeg_and_cmyk_fall_back_to_the_exact_path(name: str) -> None:
    spec = _spec("test_resnet")

    ours = TensorImagePreparer(spec, DecodeLimits(), torch.device("cpu"))(GOOD_CASES[name])

    assert isinstance(ours, np.ndarray)
    assert np.array_equal(ours, ImagePreparer(spec, DecodeLimits())(GOOD_CASES[name]))


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_inputs_fail_with_the_exact_paths_code(name: str) -> None:
    data, code = BAD_CASES[name]
    preparer = TensorImagePreparer(_spec("test_resnet"), DecodeLimits(), torch.device("cpu"))

    with pytest.raises(PermanentError) as caught:
        preparer(data)

    assert caught.value.error_code == code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_path_is_close_to_pillow_on_cuda() -> None:
    spec = _spec("resnet50")
    data = photo_jpeg(500, 375, seed=22)

    ours = TensorImagePreparer(spec, DecodeLimits(), torch.device("cuda"))(data)

    assert isinstance(ours, torch.Tensor) and ours.is_cuda
    diff = np.abs(_host(ours).astype(int) - ImagePreparer(spec, DecodeLimits())(data).astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8
