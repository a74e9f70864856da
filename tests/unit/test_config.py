"""Configuration: flags over environment over defaults, and one clear line for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bottleneck_contract.locations import S3Location
from consumer.config import OPTIONS, Config
from consumer.errors import ConfigError

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"
BASE = ["--queue-url", QUEUE, "--output", "s3://feats/resnet50/"]


def test_defaults_match_the_contract() -> None:
    config = Config.from_args(BASE, {})
    assert (config.model, config.weights, config.pool, config.feature_dtype) == (
        "resnet50",
        "pretrained",
        "avg",
        "float32",
    )
    assert (config.batch_size, config.max_wait_ms, config.device, config.precision) == (
        64,
        200,
        "auto",
        "auto",
    )
    assert config.idle_exit == 0 and config.overwrite is False and config.dead_letter_url is None
    assert config.output == S3Location("feats", "resnet50/")


def test_environment_fills_in_and_flags_win() -> None:
    env = {
        "BOTTLENECK_QUEUE_URL": QUEUE,
        "BOTTLENECK_OUTPUT": "s3://feats/x/",
        "BOTTLENECK_BATCH_SIZE": "16",
        "BOTTLENECK_MODEL": "vit_small_patch16_224",
        "BOTTLENECK_DLQ_URL": QUEUE + "-dlq",
        "BOTTLENECK_OVERWRITE": "true",
    }
    config = Config.from_args(["--batch-size", "8"], env)
    assert config.batch_size == 8  # the flag wins
    assert config.model == "vit_small_patch16_224"  # the environment fills in
    assert config.dead_letter_url == QUEUE + "-dlq"
    assert config.overwrite is True


def test_every_option_has_a_flag_and_a_bottleneck_env_var() -> None:
    for option in OPTIONS:
        assert option.flag.startswith("--")
        assert option.env.startswith("BOTTLENECK_")
    assert {o.env for o in OPTIONS} >= {
        "BOTTLENECK_QUEUE_URL",
        "BOTTLENECK_DLQ_URL",
        "BOTTLENECK_OUTPUT",
        "BOTTLENECK_MODEL",
        "BOTTLENECK_WEIGHTS",
        "BOTTLENECK_POOL",
        "BOTTLENECK_FEATURE_DTYPE",
        "BOTTLENECK_BATCH_SIZE",
        "BOTTLENECK_MAX_WAIT_MS",
        "BOTTLENECK_DEVICE",
        "BOTTLENECK_PRECISION",
        "BOTTLENECK_IDLE_EXIT",
        "BOTTLENECK_OVERWRITE",
    }


def test_the_budget_of_encoded_bytes_defaults_to_4_gib_and_is_set_by_flag_or_environment() -> None:
    assert Config.from_args(BASE, {}).max_encoded_bytes == 4 * 1024**3
    env = {"BOTTLENECK_MAX_ENCODED_BYTES": "1000000"}
    assert Config.from_args(BASE, env).max_encoded_bytes == 1_000_000
    assert Config.from_args([*BASE, "--max-encoded-bytes", "5"], env).max_encoded_bytes == 5


def test_output_without_trailing_slash_means_the_folder() -> None:
    config = Config.from_args(["--queue-url", QUEUE, "--output", "s3://feats/resnet50"], {})
    assert config.output.prefix == "resnet50/"


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--output", "s3://feats/"], {}, "--queue-url"),
        (["--queue-url", QUEUE], {}, "--output"),
        ([*BASE, "--batch-size", "0"], {}, "--batch-size"),
        (BASE, {"BOTTLENECK_BATCH_SIZE": "many"}, "BOTTLENECK_BATCH_SIZE"),
        ([*BASE, "--pool", "max"], {}, "--pool"),
        ([*BASE, "--device", "gpu"], {}, "--device"),
        ([*BASE, "--precision", "int8"], {}, "--precision"),
        ([*BASE, "--feature-dtype", "float64"], {}, "--feature-dtype"),
        ([*BASE, "--idle-exit", "-1"], {}, "--idle-exit"),
        ([*BASE, "--max-encoded-bytes", "0"], {}, "--max-encoded-bytes"),
        (BASE, {"BOTTLENECK_MAX_ENCODED_BYTES": "4GiB"}, "BOTTLENECK_MAX_ENCODED_BYTES"),
        (["--queue-url", QUEUE, "--output", "feats/x"], {}, "--output"),
        (["--queue-url", "not a url", "--output", "s3://feats/"], {}, "--queue-url"),
        ([*BASE, "--model", "resnet50; rm -rf"], {}, "--model"),
        (BASE, {"BOTTLENECK_OVERWRITE": "maybe"}, "BOTTLENECK_OVERWRITE"),
        ([*BASE, "--no-such-flag"], {}, "--no-such-flag"),
    ],
)
def test_bad_values_name_the_option(args: list[str], env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_args(args, env)
    assert names in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("extra", "named"), [(["--batch-size", "zero"], "--batch-size"), (["--bogus"], "--bogus")]
)
def test_cli_reports_bad_config_in_one_line_with_exit_2(
    tmp_path: Path, extra: list[str], named: str
) -> None:
    # WHEN the console entry point runs with a bad option (before any AWS call)
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *BASE, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # THEN it exits 2 with exactly one line naming the option
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert named in lines[0]
