"""--head and --normalize: CLIP towers keep their projection, vectors can be unit length.

The CLIP tower here is timm's own smallest one, TinyCLIP's ``vit_xsmall_patch16_clip_224``
(8M parameters, built in well under a second) with seeded random weights: the architecture and
the pretrained config (``num_classes=512``: the head is the 256 -> 512 image projection) are the
real ones, only the numbers in it are not.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

from consumer.config import Config
from consumer.decode import DecodeLimits
from consumer.errors import ConfigError
from consumer.model import is_embedding_tower, l2_normalize, resolve_head
from consumer.preprocess import ImagePreparer
from consumer.runtime import build_backbone
from tests.corpus import photo_jpeg

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"
BASE = ["--queue-url", QUEUE, "--output", "s3://feats/x/"]
CLIP = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"


def _config(model: str, *extra: str, weights: str = "random") -> Config:
    return Config.from_args(
        [
            *BASE,
            *("--model", model, "--weights", weights, "--seed", "7"),
            *("--device", "cpu", "--precision", "fp32"),
            *extra,
        ],
        {},
    )


def _images() -> list[bytes]:
    return [photo_jpeg(320, 240, seed=1), photo_jpeg(240, 320, seed=2)]


def _features(config: Config) -> tuple[np.ndarray, Any]:
    backbone, settings = build_backbone(config)
    prepare = ImagePreparer(backbone.spec, DecodeLimits())
    return backbone(backbone.stack([prepare(b) for b in _images()])), settings


def _timm_reference(name: str, seed: int, **kwargs: Any) -> np.ndarray:
    """timm's documented recipe with the model's own head, written apart from the consumer."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    batch = torch.stack(
        [cast(torch.Tensor, transform(Image.open(io.BytesIO(b)).convert("RGB"))) for b in _images()]
    )
    with torch.inference_mode():
        return cast(np.ndarray, model(batch).numpy())


# --- which models are CLIP towers ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_clip_224.openai",  # the example: head Linear(768, 512)
        "vit_large_patch14_clip_336.openai",
        "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m",
        "convnext_base.clip_laion2b",
        "convnext_large_mlp.clip_laion2b_ft_320",  # CLIP training continued: still a tower
        "resnet50_clip.openai",
        "eva02_large_patch14_clip_336.merged2b",
        "vitamin_base_224.datacomp1b_clip",
        "fastvit_mci0.apple_mclip",
        "vit_pe_core_base_patch16_224.fb",  # Perception Encoder: its head is the projection too
    ],
)
def test_clip_family_towers_keep_their_projection(name: str) -> None:
    assert resolve_head("auto", name, "avg") == "keep"


@pytest.mark.parametrize(
    "name",
    [
        "resnet50",
        "test_resnet",
        "vit_tiny_patch16_224",
        "vit_base_patch16_clip_224",  # its default tag is laion2b_ft_in12k_in1k: a classifier
        "vit_base_patch16_clip_224.openai_ft_in1k",
        "convnext_base.clip_laion2b_augreg_ft_in12k",
        "eva_giant_patch14_224.clip_ft_in1k",
        "resnet50_clip_gap.openai",  # no head at all
        "vit_base_patch16_siglip_224.webli",  # timm builds SigLIP towers without a head
    ],
)
def test_classifiers_and_headless_models_drop_the_head(name: str) -> None:
    assert resolve_head("auto", name, "avg") == "drop"


def test_every_tower_timm_knows_has_a_projection_sized_head() -> None:
    # GIVEN every pretrained config timm registers, sorted by the rule
    widths: dict[str, int] = {}
    for name in timm.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None
        if is_embedding_tower(cfg.to_dict()):
            widths[name] = cfg.num_classes

    # THEN the towers found are many, and none has a label set's width (ImageNet-1k, -12k,
    # -21k/22k): the rule never keeps a classifier's logits by mistake
    assert len(widths) >= 50
    assert set(widths.values()).isdisjoint({1000, 11821, 21841, 21843})
    assert widths["vit_base_patch16_clip_224.openai"] == 512


def test_explicit_choices_win_and_a_feature_map_has_no_head() -> None:
    assert resolve_head("drop", CLIP, "avg") == "drop"
    assert resolve_head("keep", "resnet50", "avg") == "keep"  # a classifier's logits, if asked
    assert resolve_head("auto", CLIP, "none") == "drop"
    with pytest.raises(ConfigError, match="--head keep"):
        resolve_head("keep", CLIP, "none")


def test_hub_models_are_judged_by_their_config_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN models named by their Hugging Face repository (the config as timm parses it)
    configs = {
        "timm/vit_base_patch16_clip_224.openai": {
            "architecture": "vit_base_patch16_clip_224",
            "num_classes": 512,
        },
        "timm/vit_base_patch16_clip_224.openai_ft_in1k": {
            "architecture": "vit_base_patch16_clip_224",
            "num_classes": 1000,
        },
    }

    def load(model_id: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
        if model_id not in configs:
            raise OSError("offline and not cached")
        cfg = configs[model_id] | {"hf_hub_id": model_id}
        return cfg, str(cfg["architecture"]), {}

    monkeypatch.setattr(timm.models, "load_model_config_from_hf", load)

    # THEN the tower keeps its projection, its fine-tuned classifier does not
    assert resolve_head("auto", "hf-hub:timm/vit_base_patch16_clip_224.openai", "avg") == "keep"
    assert (
        resolve_head("auto", "hf-hub:timm/vit_base_patch16_clip_224.openai_ft_in1k", "avg")
        == "drop"
    )
    # AND a config that cannot be read is one line that says what to do
    with pytest.raises(ConfigError, match="pass --head keep or --head drop"):
        resolve_head("auto", "hf-hub:someone/unknown", "avg")
    # AND an explicit choice needs no config at all
    assert resolve_head("drop", "hf-hub:someone/unknown", "avg") == "drop"


def test_an_unknown_tag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--model"):
        resolve_head("auto", "resnet50.no_such_tag", "avg")


# --- the features ----------------------------------------------------------------------------


def test_a_clip_tower_gives_its_projection_by_default() -> None:
    # GIVEN a CLIP image tower and the default --head auto
    ours, settings = _features(_config(CLIP))

    # THEN the features are the head's output: the 512-wide image embedding, not the 256-wide
    # vector before the projection, and equal to timm's own model with its head (same weights)
    assert settings.head == "keep"
    assert ours.shape == (2, 512)
    reference = _timm_reference(CLIP, seed=7)
    assert float(np.abs(ours - reference).max() / np.abs(reference).max()) < 1e-5


def test_head_drop_gives_the_vector_before_the_projection() -> None:
    dropped, settings = _features(_config(CLIP, "--head", "drop"))
    _, kept_settings = _features(_config(CLIP))

    assert settings.head == "drop"
    assert dropped.shape == (2, 256)  # the tower's width
    reference = _timm_reference(CLIP, seed=7, num_classes=0)
    assert float(np.abs(dropped - reference).max() / np.abs(reference).max()) < 1e-5
    # AND the two are told apart wherever a file is judged current
    assert settings.fingerprint() != kept_settings.fingerprint()


def test_kept_head_weights_come_from_a_weights_file(tmp_path: Path) -> None:
    # GIVEN a CLIP tower saved whole, projection included (as one bakes a checkpoint)
    torch.manual_seed(3)
    saved = timm.create_model(CLIP, pretrained=False).eval()
    path = tmp_path / "tower.safetensors"
    save_file(saved.state_dict(), str(path))

    # WHEN the consumer loads the file
    ours, settings = _features(_config(CLIP, weights=str(path)))

    # THEN the projection's weights are the file's: the features are the saved model's
    reference = _timm_reference(CLIP, seed=3)
    assert settings.head == "keep"
    assert float(np.abs(ours - reference).max() / np.abs(reference).max()) < 1e-5


@pytest.mark.parametrize(
    ("model", "precision"), [("test_resnet", "fp32"), ("test_resnet", "bf16"), (CLIP, "fp32")]
)
def test_normalize_l2_gives_unit_vectors_in_the_same_direction(model: str, precision: str) -> None:
    # GIVEN the same model with and without --normalize l2
    raw, _ = _features(_config(model, "--precision", precision))
    unit, settings = _features(_config(model, "--precision", precision, "--normalize", "l2"))

    # THEN every vector has length 1 (computed in float32 even under bf16), pointing the same way
    assert settings.normalize == "l2"
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, expected, atol=1e-5)


def test_a_zero_vector_stays_zero_never_nan() -> None:
    features = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])

    out = l2_normalize(features)

    assert torch.isfinite(out).all()
    assert out[0].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out[1], torch.tensor([0.6, 0.0, 0.8]))


def test_defaults_are_unchanged_for_classifiers() -> None:
    # GIVEN a classification backbone and no new option
    ours, settings = _features(_config("test_resnet"))

    # THEN it is today's pre-logits, unnormalised (test_parity checks the numbers exactly)
    assert (settings.head, settings.normalize) == ("drop", "none")
    assert ours.shape == (2, timm.create_model("test_resnet").num_features)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)


# --- configuration ---------------------------------------------------------------------------


def test_options_come_from_flags_and_the_environment() -> None:
    assert (Config.from_args(BASE, {}).head, Config.from_args(BASE, {}).normalize) == (
        "auto",
        "none",
    )
    env = {"BOTTLENECK_HEAD": "drop", "BOTTLENECK_NORMALIZE": "l2"}
    config = Config.from_args(BASE, env)
    assert (config.head, config.normalize) == ("drop", "l2")
    assert Config.from_args([*BASE, "--head", "keep"], env).head == "keep"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--head", "keep", "--pool", "none"], {}, "--head keep"),
        (["--pool", "none"], {"BOTTLENECK_HEAD": "keep"}, "--head keep"),
        (["--normalize", "l2", "--pool", "none"], {}, "--normalize l2"),
        (["--head", "projection"], {}, "--head"),
        ([], {"BOTTLENECK_NORMALIZE": "l1"}, "BOTTLENECK_NORMALIZE"),
    ],
)
def test_bad_combinations_are_one_line_naming_the_option(
    args: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_args([*BASE, *args], env)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_the_console_script_exits_2_for_keep_with_a_feature_map(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *BASE, "--head", "keep", "--pool", "none"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--head keep: needs --pool avg" in lines[0]
