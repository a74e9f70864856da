"""The producer's settings: built once from the environment, errors naming the variable."""

from __future__ import annotations

import pytest

from bottleneck_contract.locations import S3Location
from producer_lambda.filters import KeyFilter
from producer_lambda.settings import (
    DEFAULT_MAX_JOBS,
    DEFAULT_MESSAGES_PER_JOB,
    DEFAULT_SUFFIXES,
    ScalingSettings,
    Settings,
    SettingsError,
    parse_count,
    parse_suffixes,
)

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"
BASE = {"BOTTLENECK_QUEUE_URL": QUEUE, "BOTTLENECK_OUTPUT": "s3://feats/resnet50/"}


def test_minimal_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.queue_url == QUEUE
    assert settings.output == S3Location("feats", "resnet50/")
    assert settings.input_prefix == ""
    assert settings.suffixes == DEFAULT_SUFFIXES
    assert settings.suffixes == (
        *(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
        *(".heic", ".heif", ".avif"),
    )
    assert settings.scaling is None


def test_full_environment() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "BOTTLENECK_INPUT_PREFIX": "uploads/",
            "BOTTLENECK_SUFFIXES": " JPG, .png ,,jpg",
            "BOTTLENECK_JOB_QUEUE": "gpu",
            "BOTTLENECK_JOB_DEFINITION": "bottleneck:3",
            "BOTTLENECK_MAX_JOBS": "8",
            "BOTTLENECK_MESSAGES_PER_JOB": "250",
            "BOTTLENECK_JOB_NAME_PREFIX": "feat_prod",
        }
    )
    assert settings.input_prefix == "uploads/"
    assert settings.suffixes == (".jpg", ".png")
    assert settings.scaling == ScalingSettings("gpu", "bottleneck:3", 8, 250, "feat_prod")


def test_scaling_defaults() -> None:
    env = {**BASE, "BOTTLENECK_JOB_QUEUE": "gpu", "BOTTLENECK_JOB_DEFINITION": "d"}
    scaling = Settings.from_env(env).scaling
    assert scaling is not None
    assert (scaling.max_jobs, scaling.messages_per_job) == (
        DEFAULT_MAX_JOBS,
        DEFAULT_MESSAGES_PER_JOB,
    )
    assert scaling.job_name_prefix == "bottleneck"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"BOTTLENECK_QUEUE_URL": ""}, "BOTTLENECK_QUEUE_URL"),
        ({"BOTTLENECK_OUTPUT": "  "}, "BOTTLENECK_OUTPUT"),
        ({"BOTTLENECK_OUTPUT": "feats/resnet50/"}, "BOTTLENECK_OUTPUT"),
        ({"BOTTLENECK_OUTPUT": "s3://a/x"}, "BOTTLENECK_OUTPUT"),
        ({"BOTTLENECK_INPUT_PREFIX": "s3://images/uploads/"}, "BOTTLENECK_INPUT_PREFIX"),
        ({"BOTTLENECK_SUFFIXES": ",, ,"}, "BOTTLENECK_SUFFIXES"),
        ({"BOTTLENECK_SUFFIXES": ".j pg"}, "BOTTLENECK_SUFFIXES"),
        ({"BOTTLENECK_JOB_QUEUE": "gpu"}, "BOTTLENECK_JOB_DEFINITION"),
        ({"BOTTLENECK_JOB_DEFINITION": "d"}, "BOTTLENECK_JOB_QUEUE"),
        (
            {
                "BOTTLENECK_JOB_QUEUE": "q",
                "BOTTLENECK_JOB_DEFINITION": "d",
                "BOTTLENECK_MAX_JOBS": "x",
            },
            "BOTTLENECK_MAX_JOBS",
        ),
        (
            {
                "BOTTLENECK_JOB_QUEUE": "q",
                "BOTTLENECK_JOB_DEFINITION": "d",
                "BOTTLENECK_MAX_JOBS": "-1",
            },
            "BOTTLENECK_MAX_JOBS",
        ),
        (
            {
                "BOTTLENECK_JOB_QUEUE": "q",
                "BOTTLENECK_JOB_DEFINITION": "d",
                "BOTTLENECK_MESSAGES_PER_JOB": "0",
            },
            "BOTTLENECK_MESSAGES_PER_JOB",
        ),
        (
            {
                "BOTTLENECK_JOB_QUEUE": "q",
                "BOTTLENECK_JOB_DEFINITION": "d",
                "BOTTLENECK_JOB_NAME_PREFIX": "-bad name",
            },
            "BOTTLENECK_JOB_NAME_PREFIX",
        ),
    ],
)
def test_invalid_settings_name_the_variable(changes: dict[str, str], named: str) -> None:
    # WHEN a variable is missing or wrong THEN the one-line error names it
    with pytest.raises(SettingsError, match=named) as caught:
        Settings.from_env({**BASE, **changes})
    assert "\n" not in str(caught.value)


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BOTTLENECK_INPUT_PREFIX", "in/")
    assert Settings.from_env().input_prefix == "in/"


def test_output_location_follows_the_contract_rule() -> None:
    # GIVEN the output spelled without its trailing slash WHEN read THEN it is the folder
    settings = Settings.from_env({**BASE, "BOTTLENECK_OUTPUT": "s3://feats/resnet50"})
    assert settings.output == S3Location("feats", "resnet50/")
    # AND a bad one is a settings error naming the variable
    with pytest.raises(SettingsError, match="BOTTLENECK_OUTPUT"):
        Settings.from_env({**BASE, "BOTTLENECK_OUTPUT": "https://feats/"})


def test_parse_helpers() -> None:
    assert parse_suffixes(None, "x") == DEFAULT_SUFFIXES
    assert parse_suffixes("  ", "x") == DEFAULT_SUFFIXES
    assert parse_suffixes("TIFF,.Png", "x") == (".tiff", ".png")
    assert parse_count(None, "x", 7, 0) == 7
    assert parse_count(" 3 ", "x", 7, 0) == 3
    with pytest.raises(SettingsError, match="--n must be >= 1"):
        parse_count("0", "--n", 7, 1)


def test_scaling_settings_validate_themselves() -> None:
    with pytest.raises(SettingsError, match="job queue"):
        ScalingSettings("", "d")
    with pytest.raises(SettingsError, match="messages per job"):
        ScalingSettings("q", "d", messages_per_job=0)


@pytest.mark.parametrize(
    ("bucket", "key", "size", "reason"),
    [
        ("images", "uploads/a.jpg", 10, None),
        ("images", "uploads/A.JPEG", 10, None),
        ("images", "uploads/deep/b c+d.Png", None, None),
        ("images", "uploads/a.jpg", 0, "empty-object"),
        ("images", "uploads/notes.txt", 10, "suffix"),
        ("images", "uploads/jpg", 10, "suffix"),
        ("images", "elsewhere/a.jpg", 10, "outside-input-prefix"),
        ("feats", "resnet50/uploads/a.jpg.npy", 10, "output-prefix"),
        ("feats", "resnet50/uploads/a.jpg", 10, "output-prefix"),
    ],
)
def test_key_filter(bucket: str, key: str, size: int | None, reason: str | None) -> None:
    key_filter = KeyFilter(
        suffixes=(".JPG", ".jpeg", ".png"),
        input_prefix="uploads/",
        output=S3Location("feats", "resnet50/"),
    )
    assert key_filter.reason(bucket, key, size) == reason


def test_output_prefix_wins_even_inside_the_input_prefix() -> None:
    # GIVEN features written under the input prefix, with a suffix that would pass
    key_filter = KeyFilter(input_prefix="", output=S3Location("images", "features/"))
    # THEN they are never work: the pipeline cannot trigger itself
    assert key_filter.reason("images", "features/a.jpg", 10) == "output-prefix"
    assert key_filter.reason("images", "photos/a.jpg", 10) is None
