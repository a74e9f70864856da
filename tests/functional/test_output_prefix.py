"""One output prefix, however it is spelled: the consumer, enqueue, reconcile, status and collect
all read ``s3://B``, ``s3://B/``, ``s3://B/p`` and ``s3://B/p/`` as the same place.

The issue's case: 3 of 6 images processed with ``--output s3://B/noslash``; then
``bottleneck-enqueue s3://B/slash/ --skip-existing --output s3://B/noslash`` sent all 6 again,
because the consumer wrote ``noslash/<key>.npy`` and the tool looked for ``noslash<key>.npy``.
Here the consumer's own configuration places the feature files, and each tool is run with the
same spelling; a sibling prefix (``p-old/``) holds a decoy that a glued-on prefix would pick up.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from bottleneck_tools import collect, enqueue, reconcile, status
from consumer.config import Config
from consumer.features import output_key
from tests.fakes import put_feature, put_image

REGION = "us-east-1"
IMAGES = 6
PROCESSED = 3


@dataclass(frozen=True)
class Case:
    source: str  # the images, as given to enqueue and reconcile
    output: str  # the feature files, spelled as under test
    bucket: str  # where the feature files are
    prefix: str  # the prefix every side must agree on


CASES = [
    Case("s3://images/imgs/", "s3://feats", "feats", ""),
    Case("s3://images/imgs/", "s3://feats/", "feats", ""),
    Case("s3://images/imgs/", "s3://feats/v1", "feats", "v1/"),
    Case("s3://images/imgs/", "s3://feats/v1/", "feats", "v1/"),
    Case("s3://bkt/slash/", "s3://bkt/noslash", "bkt", "noslash/"),  # the (B = bkt)
]


@dataclass
class World:
    case: Case
    s3: Any
    sqs: Any
    queue_url: str
    images: list[str]  # image keys, in order; the first PROCESSED have feature files

    def config(self) -> Config:
        """The consumer's configuration with the case's spelling of --output."""
        return Config.from_args(["--queue-url", self.queue_url, "--output", self.case.output], {})


@pytest.fixture(params=CASES, ids=lambda case: case.output)
def world(request: pytest.FixtureRequest, aws: None) -> World:
    """GIVEN 6 images, 3 of them processed by a consumer given the case's --output, and a decoy
    feature file under the sibling prefix ``<p>-old/``."""
    case: Case = request.param
    s3 = boto3.client("s3", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    source_bucket, _, source_prefix = case.source.removeprefix("s3://").partition("/")
    for bucket in {source_bucket, case.bucket}:
        s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName="work")["QueueUrl"]
    world = World(case, s3, sqs, queue_url, [f"{source_prefix}{i}.jpg" for i in range(IMAGES)])
    config = world.config()
    for key in world.images[:PROCESSED]:
        etag = put_image(s3, key, bucket=source_bucket)
        written = put_feature(
            s3,
            config.output.prefix,
            key,
            etag=etag,
            bucket=config.output.bucket,
            source_bucket=source_bucket,
        )
        assert written == output_key(config.output.prefix, key)
    for key in world.images[PROCESSED:]:
        put_image(s3, key, bucket=source_bucket)
    if case.prefix:
        decoy = f"{case.prefix.rstrip('/')}-old/"
        put_feature(s3, decoy, world.images[-1], etag="old", bucket=case.bucket)
    return world


def feature_keys(world: World) -> list[str]:
    return [world.case.prefix + key + ".npy" for key in world.images[:PROCESSED]]


def test_the_consumer_writes_under_the_folder(world: World) -> None:
    # WHEN the consumer reads --output THEN it is the case's prefix, in the case's bucket
    config = world.config()
    assert (config.output.bucket, config.output.prefix) == (world.case.bucket, world.case.prefix)
    assert [output_key(config.output.prefix, k) for k in world.images[:PROCESSED]] == (
        feature_keys(world)
    )


def test_enqueue_skip_existing_sends_only_the_images_without_features(world: World) -> None:
    # WHEN bottleneck-enqueue --skip-existing runs with the same spelling of --output
    argv = [world.case.source, "--queue-url", world.queue_url, "--no-progress"]
    options = enqueue.parse([*argv, "--skip-existing", "--output", world.case.output], {})
    out = io.StringIO()
    code = enqueue.run(options, s3=world.s3, sqs=world.sqs, batch=None, stdout=out)
    # THEN only the 3 images without a feature file are sent
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert code == 0
    assert (summary["sent"], summary["skipped"]) == (IMAGES - PROCESSED, {"feature-exists": 3})
    sent = []
    while got := world.sqs.receive_message(QueueUrl=world.queue_url, MaxNumberOfMessages=10).get(
        "Messages"
    ):
        sent += [json.loads(m["Body"])["key"] for m in got]
    assert sorted(sent) == world.images[PROCESSED:]


def test_reconcile_finds_the_missing_images_and_no_orphan(world: World) -> None:
    # WHEN bottleneck-reconcile compares the images with the same spelling of --output
    options = reconcile.parse([world.case.source, "--output", world.case.output, "--json"], {})
    out = io.StringIO()
    code = reconcile.run(options, s3=world.s3, stdout=out, stderr=io.StringIO())
    # THEN the 3 unprocessed images are missing, the 3 feature files current, nothing orphaned
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    summary = lines[-1]["summary"]
    assert code == 0
    assert summary["features"] == PROCESSED
    assert summary["checked"] == PROCESSED
    assert summary["findings"] == {
        "missing": IMAGES - PROCESSED,
        "stale-etag": 0,
        "stale-fingerprint": 0,
        "orphan": 0,
    }
    assert sorted(f["key"] for f in lines[:-1]) == world.images[PROCESSED:]


def test_status_counts_the_feature_files(world: World) -> None:
    # WHEN bottleneck-status lists the output with the same spelling
    argv = ["--queue-url", world.queue_url, "--output", world.case.output]
    options = status.parse([*argv, "--interval", "0", "--json"], {})
    out = io.StringIO()
    code = status.run(options, sqs=world.sqs, s3=world.s3, batch=None, stdout=out)
    # THEN it counts exactly the consumer's 3 feature files, not the sibling's decoy
    assert code == 0
    assert json.loads(out.getvalue())["features"] == PROCESSED


def test_collect_gathers_the_feature_files(world: World, tmp_path: Path) -> None:
    # WHEN bottleneck-collect gathers the output spelled the same way
    options = collect.parse([world.case.output, "-o", str(tmp_path), "--no-progress"])
    err = io.StringIO()
    code = collect.run(options, s3=world.s3, stdout=io.StringIO(), stderr=err)
    # THEN the dataset holds the consumer's 3 feature files, in key order, and nothing else
    assert (code, err.getvalue()) == (0, "")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == PROCESSED
    assert manifest["source"] == f"s3://{world.case.bucket}/{world.case.prefix}"
    index = (tmp_path / "index.csv").read_text().splitlines()[1:]
    assert [row.split(",")[4] for row in index] == sorted(feature_keys(world))
