"""A model change writes beside the old features, never over them (issue 16).

The consumer runs in-process against moto, as in ``test_consumer_flow``, with the stack's
templated output ``s3://feats/features/{model}/{fingerprint}/``: two runs with different timm
models (random weights) over the same images must leave both sets, each complete, the first
run's files untouched (same ETags, one object version each in a versioned bucket). The tools
then see both versions under the root.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from bottleneck_contract.locations import OutputTemplate, S3Location, list_versions
from bottleneck_tools import collect, reconcile, status
from consumer.config import Config
from consumer.errors import ConfigError
from consumer.runtime import Runtime
from consumer.stats import Stats
from tests.corpus import photo_jpeg
from tests.fakes import put_feature
from tests.functional.conftest import Stack
from tests.functional.test_faults import upload_and_send

TEMPLATE = "s3://feats/features/{model}/{fingerprint}/"
FP_A, FP_B = "0123456789abcdef", "fedcba9876543210"
IMAGES = {f"photos/{i:02d}.jpg": photo_jpeg(96, 72, seed=1600 + i) for i in range(5)}
RunConsumer = Callable[..., tuple[Runtime, Stats]]


def listing(stack: Stack, prefix: str) -> dict[str, str]:
    """Feature files under ``prefix`` (the consumer's own folders left out): key -> ETag."""
    pages = stack.s3.get_paginator("list_objects_v2").paginate(Bucket="feats", Prefix=prefix)
    return {
        o["Key"]: o["ETag"]
        for page in pages
        for o in page.get("Contents", [])
        if o["Key"].endswith(".npy") and "/_bottleneck/" not in o["Key"]
    }


def object_versions(stack: Stack) -> Counter[str]:
    pages = stack.s3.get_paginator("list_object_versions").paginate(Bucket="feats")
    return Counter(v["Key"] for page in pages for v in page.get("Versions", []))


def resend(stack: Stack) -> None:
    """The same images come through the queue again (a backfill after the model change)."""
    upload_and_send(stack, IMAGES)


def test_two_models_leave_both_sets_each_complete_nothing_overwritten(
    stack: Stack, run_consumer: RunConsumer
) -> None:
    # GIVEN images processed by a consumer with test_resnet and the templated output
    upload_and_send(stack, IMAGES)
    first, stats = run_consumer("--model", "test_resnet", "--output", TEMPLATE)
    assert stats.summary()["images_written"] == len(IMAGES)
    first_out = first.config.output
    before = listing(stack, "features/")

    # WHEN the model changes and the same images come through again
    resend(stack)
    second, stats = run_consumer("--model", "test_vit", "--output", TEMPLATE)
    # written, not replaced: with a flat output these would be the first run's files replaced
    assert (stats.summary()["images_written"], stats.summary()["images_replaced"]) == (5, 0)
    second_out = second.config.output

    # THEN each run wrote under <root><model>/<fingerprint>/ of its own
    for runtime, location in ((first, first_out), (second, second_out)):
        expected = f"features/{runtime.settings.model}/{runtime.fingerprint}/"
        assert location == S3Location("feats", expected)
    assert first_out != second_out
    assert first.settings.model.startswith("test_resnet")
    assert second.settings.model.startswith("test_vit")
    # each set is complete: every image has its file in both versions, with its own metadata
    for runtime, location in ((first, first_out), (second, second_out)):
        files = listing(stack, location.prefix)
        assert sorted(files) == sorted(location.feature_key(key) for key in IMAGES)
        for key in files:
            meta = stack.s3.head_object(Bucket="feats", Key=key)["Metadata"]
            assert meta["fingerprint"] == runtime.fingerprint
            assert meta["model"] == runtime.settings.model
    # nothing of the first run was overwritten: same ETags, one object version each
    after = listing(stack, "features/")
    assert {key: after[key] for key in before} == before
    assert len(after) == 2 * len(IMAGES)
    assert set(object_versions(stack).values()) == {1}
    # the producer and the tools find exactly these two versions under the root
    versions = list_versions(stack.s3, OutputTemplate.parse(TEMPLATE))
    assert sorted(versions.found, key=str) == sorted([first_out, second_out], key=str)
    assert stack.dead_letters() == []

    # AND bottleneck-reconcile over the root says both are complete
    images_uri = f"s3://{stack.images}/"
    options = reconcile.parse([images_uri, "--output", "s3://feats/features/", "--json"], {})
    out = io.StringIO()
    assert reconcile.run(options, s3=stack.s3, stdout=out, stderr=io.StringIO()) == 0
    summary = json.loads(out.getvalue().splitlines()[-1])["summary"]
    assert sorted(summary["versions"]) == sorted(versions.labels)
    for version in summary["versions"].values():
        assert (version["complete"], version["percent_complete"]) == (len(IMAGES), 100.0)
        assert version["features"] == len(IMAGES)
    # AND bottleneck-status counts each version's files
    argv = ["--queue-url", stack.queue_url, "--output", TEMPLATE, "--interval", "0", "--json"]
    out = io.StringIO()
    code = status.run(status.parse(argv, {}), sqs=stack.sqs, s3=stack.s3, batch=None, stdout=out)
    assert code == 0
    view = json.loads(out.getvalue())
    assert view["features"] == 2 * len(IMAGES)
    assert view["versions"] == dict.fromkeys(versions.labels, len(IMAGES))


def test_the_same_model_again_finds_its_own_version_current(
    stack: Stack, run_consumer: RunConsumer
) -> None:
    # GIVEN a first run with the templated output
    upload_and_send(stack, IMAGES)
    first, _ = run_consumer("--output", TEMPLATE)
    before = listing(stack, "features/")
    # WHEN the same model and settings see the images again
    resend(stack)
    again, stats = run_consumer("--output", TEMPLATE)
    # THEN they expand to the same folder and write nothing (the contract's idempotency)
    assert again.config.output == first.config.output
    summary = stats.summary()
    assert (summary["images_written"], summary["images_replaced"]) == (0, 0)
    assert summary["images_skipped"] == len(IMAGES)
    assert listing(stack, "features/") == before


def test_the_consumers_own_folders_lie_in_its_version(
    stack: Stack, run_consumer: RunConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN --dedupe content (an index under <output>_bottleneck/content/) and a templated output
    upload_and_send(stack, dict(list(IMAGES.items())[:2]))
    with caplog.at_level(logging.INFO, logger="consumer.runtime"):
        runtime, _ = run_consumer("--output", TEMPLATE, "--dedupe", "content")
    out = runtime.config.output
    # THEN the index lies under the expanded output, and nothing under a literal "{model}"
    keys = stack.feature_keys("features/")
    index = [k for k in keys if "/_bottleneck/content/" in k]
    assert index and all(k.startswith(f"{out.prefix}_bottleneck/content/") for k in index)
    assert not [k for k in keys if "{" in k]
    # AND "consumer ready" names the expanded output
    (ready,) = [r for r in caplog.records if r.getMessage() == "consumer ready"]
    fields: dict[str, Any] = getattr(ready, "fields", {})
    assert fields["output"] == str(out)
    assert fields["fingerprint"] in fields["output"]


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("s3://feats/features/{modle}/", "--output: has '{modle}'"),
        ("s3://feats/features/{model}/v1/", "after a placeholder"),
        ("s3://feats/f/{fingerprint}/{fingerprint}/", "twice"),
    ],
)
def test_a_bad_template_is_a_config_error_naming_the_option(output: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_args(["--queue-url", "https://q.example/1/work", "--output", output], {})
    assert str(info.value).startswith("--output: ")
    assert says in str(info.value)
    assert "\n" not in str(info.value)


def test_a_template_stays_as_written_until_the_runtime_expands_it() -> None:
    config = Config.from_args(["--queue-url", "https://q.example/1/work", "--output", TEMPLATE], {})
    assert str(config.output) == TEMPLATE
    assert config.output_template.root == S3Location("feats", "features/")
    plain = Config.from_args(
        ["--queue-url", "https://q.example/1/work", "--output", "s3://feats/v1"], {}
    )
    assert not plain.output_template.templated
    assert plain.output == S3Location("feats", "v1/")


@pytest.fixture
def two_versions(aws: None) -> Any:
    """GIVEN two versions of features for the same two images under features/."""
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="feats")
    for version in (f"resnet50.a1_in1k/{FP_A}", f"test_vit/{FP_B}"):
        for name in ("a", "b"):
            put_feature(
                s3,
                f"features/{version}/",
                f"photos/{name}.jpg",
                etag="e",
                fingerprint=version[-16:],
            )
    return s3


def test_collect_from_a_root_of_several_versions_names_them(
    two_versions: Any, tmp_path: Path
) -> None:
    # WHEN bottleneck-collect is given the root THEN one line lists the versions, exit 2, and
    # nothing is collected
    err = io.StringIO()
    options = collect.parse(["s3://feats/features/", "-o", str(tmp_path), "--no-progress"])
    code = collect.run(options, s3=two_versions, stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert err.getvalue() == (
        "bottleneck-collect: error: s3://feats/features/ holds 2 versions (<model>/<fingerprint>): "
        f"resnet50.a1_in1k/{FP_A}, test_vit/{FP_B}; collect one, such as "
        f"s3://feats/features/resnet50.a1_in1k/{FP_A}/\n"
    )
    assert not (tmp_path / "features.npy").exists()
    # WHEN it is given one version's prefix THEN that version is collected
    version = f"s3://feats/features/test_vit/{FP_B}/"
    options = collect.parse([version, "-o", str(tmp_path), "--no-progress"])
    assert collect.run(options, s3=two_versions, stdout=io.StringIO(), stderr=err) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 2


def test_collect_refuses_a_template_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        collect.parse([TEMPLATE, "-o", "out"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "source holds the placeholder {model}" in err
    assert "give the root s3://feats/features/ or one version's prefix" in err
    assert err.count("\n") == 1
