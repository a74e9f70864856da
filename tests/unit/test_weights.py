"""--weights: local safetensors/.pth files, s3:// URIs (cached), pretrained offline, random."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from consumer.config import Config
from consumer.errors import ConfigError
from consumer.runtime import build_backbone
from consumer.weights import resolve_weights

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"
ARCH = "test_resnet"


def _config(weights: str, cache: Path | None = None) -> Config:
    args = ["--queue-url", QUEUE, "--output", "s3://feats/x/", "--model", ARCH]
    args += ["--weights", weights, "--device", "cpu", "--precision", "fp32"]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    return Config.from_args(args, {})


def _trained_model(seed: int) -> Any:
    """A full model, classifier included, as a training run would save it."""
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False).eval()


def _features(model: torch.nn.Module) -> np.ndarray:
    x = torch.linspace(0, 1, 2 * 3 * 160 * 160).reshape(2, 3, 160, 160)
    with torch.inference_mode():
        return model(x).numpy()


def _consumer_features(config: Config) -> tuple[np.ndarray, str]:
    backbone, settings = build_backbone(config)
    x = torch.linspace(0, 1, 2 * 3 * 160 * 160).reshape(2, 3, 160, 160)
    with torch.inference_mode():
        return backbone.model(x).numpy(), settings.weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trips(tmp_path: Path, suffix: str) -> None:
    # GIVEN a model saved to a file, classifier and all
    saved = _trained_model(seed=11)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(saved.state_dict(), str(path))
    else:
        torch.save(saved.state_dict(), path)
    # WHEN the consumer loads it without the classifier
    ours, identity = _consumer_features(_config(str(path)))
    # THEN its features are the saved model's pre-logits features, exactly
    saved.reset_classifier(0)
    np.testing.assert_allclose(ours, _features(saved), rtol=0, atol=1e-6)
    assert identity.startswith("sha256:")


def test_random_weights_differ_from_a_saved_model(tmp_path: Path) -> None:
    saved = _trained_model(seed=11)
    saved.reset_classifier(0)
    ours, identity = _consumer_features(_config("random"))
    assert identity == "random:seed=0"
    assert not np.allclose(ours, _features(saved), atol=1e-3)


def test_s3_weights_are_downloaded_once_and_cached(aws: None, tmp_path: Path) -> None:
    # GIVEN weights in S3
    saved = _trained_model(seed=12)
    local = tmp_path / "w.safetensors"
    save_file(saved.state_dict(), str(local))
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    s3.upload_file(str(local), "models", "resnet/w.safetensors")
    cache = tmp_path / "cache"
    # WHEN resolved twice
    first = resolve_weights("s3://models/resnet/w.safetensors", seed=0, cache_dir=cache, s3=s3)
    assert first.file is not None
    mtime = first.file.stat().st_mtime_ns
    second = resolve_weights("s3://models/resnet/w.safetensors", seed=0, cache_dir=cache, s3=s3)
    # THEN the second comes from the cache, and the identity is the content's, not the path's
    assert second.file == first.file and first.file.stat().st_mtime_ns == mtime
    assert first.identity == resolve_weights(str(local), seed=0, cache_dir=cache).identity


def test_missing_s3_weights_is_a_config_error(aws: None, tmp_path: Path) -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    with pytest.raises(ConfigError, match="--weights"):
        resolve_weights("s3://models/nope.safetensors", seed=0, cache_dir=tmp_path, s3=s3)


def test_missing_local_file_and_bad_suffix_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        resolve_weights(str(tmp_path / "absent.safetensors"), seed=0, cache_dir=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match=r"not a \.safetensors"):
        resolve_weights(str(text), seed=0, cache_dir=tmp_path)


def test_unknown_model_is_one_line(tmp_path: Path) -> None:
    config = Config.from_args(
        [
            "--queue-url",
            QUEUE,
            "--output",
            "s3://feats/x/",
            "--model",
            "no_such_net",
            "--weights",
            "random",
        ],
        {},
    )
    with pytest.raises(ConfigError, match="not a timm model"):
        build_backbone(config)


def test_pretrained_offline_without_cache_explains_how_to_bake(tmp_path: Path) -> None:
    # GIVEN no network (HF_HUB_OFFLINE) and an empty Hugging Face cache
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PATH": "/usr/bin:/bin",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    code = (
        "from consumer.config import Config; from consumer.runtime import build_backbone\n"
        "from consumer.errors import ConfigError\n"
        f"c = Config.from_args(['--queue-url', '{QUEUE}', '--output', 's3://feats/x/',"
        " '--model', 'resnet18', '--device', 'cpu'], {})\n"
        "try:\n    build_backbone(c)\nexcept ConfigError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    # THEN the error is one line that says how to bake weights in or pass a file
    line = result.stdout.strip()
    assert "\n" not in line
    assert "--weights pretrained" in line
    assert (
        "docker build --build-arg MODEL=" in line and "--weights /path/to/model.safetensors" in line
    )
