"""``bottleneck-enqueue`` end to end: the console script as a subprocess against a moto server.

The tool finds AWS through the standard ``AWS_ENDPOINT_URL`` variable and fake credentials, the
way a user points it at an emulator; nothing project-specific is passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from bottleneck_contract.messages import ImageRef
from tests.functional.test_manifest import ROWS as INVENTORY_ROWS
from tests.functional.test_manifest import expected_refs as inventory_refs
from tests.functional.test_manifest import in_order, put_inventory
from tests.moto_batch import REGION, BatchStack, create_batch_stack

IMAGES = {
    "photos/a.jpg": b"a",
    "photos/b b.png": b"b",
    "photos/c+d.JPG": b"c",
    "photos/é/ü.webp": b"d",
    "photos/x.jpg (1).jpg": b"e",
    "photos/x.jpg": b"f",
    "photos/notes.txt": b"g",
    "photos/empty.jpg": b"",
    "other/z.jpg": b"h",
}
# Features already computed for two images (one of them a prefix of another image's key).
FEATURES = ["resnet50/photos/a.jpg.npy", "resnet50/photos/x.jpg.npy", "resnet50/other/z.jpg.npy"]


@pytest.fixture
def endpoint(moto_server: str) -> Iterator[str]:
    """The moto server, empty, with Batch recording jobs instead of running containers."""
    # The server runs in this process and moto's backends are global to it: without a reset,
    # queues and buckets of an earlier test would still be there.
    _moto_api(moto_server, "reset", None)
    _moto_api(moto_server, "config", {"batch": {"use_docker": False}})
    yield moto_server
    _moto_api(moto_server, "config", {"batch": {"use_docker": True}})
    _moto_api(moto_server, "reset", None)


def _moto_api(url: str, path: str, body: dict[str, Any] | None) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/moto-api/{path}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)


def client(endpoint: str, service: str) -> Any:
    """A boto3 client of the moto server."""
    session: Any = boto3.session.Session(region_name=REGION)
    return session.client(service, endpoint_url=endpoint)


@pytest.fixture
def world(endpoint: str) -> dict[str, Any]:
    """Buckets of images and features, and an empty work queue."""
    s3 = client(endpoint, "s3")
    s3.create_bucket(Bucket="images")
    s3.create_bucket(Bucket="feats")
    for key, body in IMAGES.items():
        s3.put_object(Bucket="images", Key=key, Body=body)
    for key in FEATURES:
        s3.put_object(Bucket="feats", Key=key, Body=b"\x93NUMPY")
    sqs = client(endpoint, "sqs")
    queue_url = sqs.create_queue(QueueName="work")["QueueUrl"]
    return {"s3": s3, "sqs": sqs, "queue_url": queue_url}


def enqueue(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the console script (``python -m producer_lambda`` if it is not installed)."""
    script = Path(sys.executable).with_name("bottleneck-enqueue")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "producer_lambda"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BOTTLENECK_", "AWS_")) and k != "PYTHONPATH"
    }
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )
    assert shutil.which(command[0]) or Path(command[0]).exists()
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message on the queue (moto delivers each message once)."""
    bodies: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return bodies
        bodies.extend(json.loads(m["Body"]) for m in got)


def summary_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON summary: the last line of stdout."""
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_skip_existing_sends_only_images_without_a_feature_file(
    endpoint: str, world: dict[str, Any]
) -> None:
    # GIVEN 6 images under photos/ (plus a text file and an empty object), 2 with features
    # WHEN the tool runs with --skip-existing
    done = enqueue(
        endpoint,
        "s3://images/photos/",
        "--queue-url",
        world["queue_url"],
        "--skip-existing",
        "--output",
        "s3://feats/resnet50/",
    )
    # THEN it succeeds and sends exactly the 4 images without a feature file, by real key
    assert done.returncode == 0, done.stderr
    bodies = drain(world["sqs"], world["queue_url"])
    assert sorted(b["key"] for b in bodies) == [
        "photos/b b.png",
        "photos/c+d.JPG",
        "photos/x.jpg (1).jpg",
        "photos/é/ü.webp",
    ]
    assert all(b["bucket"] == "images" and b["etag"] and b["size"] == 1 for b in bodies)
    # and prints a summary that accounts for every listed object
    summary = summary_of(done)
    assert summary["listed"] == 8
    assert (summary["selected"], summary["sent"], summary["failed"], summary["not_sent"]) == (
        4,
        4,
        0,
        0,
    )
    assert summary["skipped"] == {"empty-object": 1, "feature-exists": 2, "suffix": 1}


def test_without_skip_existing_every_image_is_sent(endpoint: str, world: dict[str, Any]) -> None:
    done = enqueue(endpoint, "s3://images/", "--queue-url", world["queue_url"], "--no-progress")
    assert done.returncode == 0, done.stderr
    assert len(drain(world["sqs"], world["queue_url"])) == 7
    assert summary_of(done)["sent"] == 7


def test_dry_run_sends_nothing_and_prints_what_it_would_send(
    endpoint: str, world: dict[str, Any]
) -> None:
    done = enqueue(
        endpoint,
        "s3://images/photos/",
        "--queue-url",
        world["queue_url"],
        "--dry-run",
        "--skip-existing",
        "--output",
        "s3://feats/resnet50/",
    )
    assert done.returncode == 0, done.stderr
    assert drain(world["sqs"], world["queue_url"]) == []
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 5  # four bodies, then the summary
    assert {json.loads(line)["key"] for line in lines[:4]} == {
        "photos/b b.png",
        "photos/c+d.JPG",
        "photos/x.jpg (1).jpg",
        "photos/é/ü.webp",
    }
    summary = summary_of(done)
    assert (summary["dry_run"], summary["selected"], summary["sent"]) == (True, 4, 0)


def test_scale_runs_the_scaler_once(endpoint: str, world: dict[str, Any]) -> None:
    # GIVEN a Batch job queue on the server
    batch = client(endpoint, "batch")
    stack: BatchStack = create_batch_stack(client(endpoint, "iam"), client(endpoint, "ec2"), batch)
    # WHEN the tool enqueues 7 images and scales at 3 messages per job
    done = enqueue(
        endpoint,
        "s3://images/",
        "--queue-url",
        world["queue_url"],
        "--scale",
        "--job-queue",
        stack.job_queue,
        "--job-definition",
        stack.job_definition,
        "--max-jobs",
        "2",
        "--messages-per-job",
        "3",
        "--job-name-prefix",
        "backfill",
    )
    # THEN min(2, ceil(7 / 3)) = 2 jobs were submitted, once, and named for tracing
    assert done.returncode == 0, done.stderr
    scaler = summary_of(done)["scaler"]
    assert (scaler["backlog"]["visible"], scaler["desired"]) == (7, 2)
    assert len(scaler["submitted"]) == 2
    jobs = batch.list_jobs(jobQueue=stack.job_queue, jobStatus="SUCCEEDED")["jobSummaryList"]
    assert sorted(j["jobId"] for j in jobs) == sorted(scaler["submitted"])
    assert all(j["jobName"].startswith("backfill-") for j in jobs)


def test_bad_arguments_exit_2_with_one_line(endpoint: str, world: dict[str, Any]) -> None:
    done = enqueue(endpoint, "s3://images/", "--queue-url", world["queue_url"], "--skip-existing")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--skip-existing needs --output" in done.stderr
    assert drain(world["sqs"], world["queue_url"]) == []


def test_a_missing_queue_is_reported(endpoint: str, world: dict[str, Any]) -> None:
    missing = world["queue_url"].replace("/work", "/nope")
    done = enqueue(endpoint, "s3://images/", "--queue-url", missing)
    assert done.returncode == 1
    assert "cannot use queue" in done.stderr


def test_an_inventory_manifest_sends_exactly_its_images(
    endpoint: str, world: dict[str, Any]
) -> None:
    # GIVEN an S3 Inventory (CSV, two gzip data files) of the bucket, versions and decoys included
    uri, _ = put_inventory(world["s3"], INVENTORY_ROWS)
    # WHEN the tool takes its keys from the manifest instead of a listing
    done = enqueue(
        endpoint, "s3://images/photos/", "--queue-url", world["queue_url"], "--manifest", uri
    )
    # THEN it sends exactly the inventory's latest images under the prefix, with ETag and size
    assert done.returncode == 0, done.stderr
    bodies = drain(world["sqs"], world["queue_url"])
    assert in_order(ImageRef(**b) for b in bodies) == inventory_refs()
    summary = summary_of(done)
    assert (summary["listed"], summary["sent"], summary["not_sent"]) == (
        len(INVENTORY_ROWS),
        len(inventory_refs()),
        0,
    )


def test_a_key_list_dry_run(endpoint: str, world: dict[str, Any], tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("photos/a.jpg\ns3://images/photos/b b.png\nother/z.jpg\nphotos/notes.txt\n")
    done = enqueue(endpoint, "s3://images/photos/", "--dry-run", "--manifest", str(keys))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [json.loads(line) for line in lines[:-1]] == [
        {"bucket": "images", "key": "photos/a.jpg"},
        {"bucket": "images", "key": "photos/b b.png"},
    ]
    assert summary_of(done)["skipped"] == {"outside-input-prefix": 1, "suffix": 1}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"sourceBucket": "images", "files": [}', "not valid JSON"),
        ('{"sourceBucket": "images", "fileFormat": "CSV", "files": []}', "destinationBucket"),
        (None, "cannot read"),
    ],
)
def test_a_malformed_manifest_exits_2_with_one_line(
    endpoint: str, world: dict[str, Any], tmp_path: Path, text: str | None, says: str
) -> None:
    path = tmp_path / "manifest.json"
    if text is not None:
        path.write_text(text)
    done = enqueue(
        endpoint, "s3://images/", "--queue-url", world["queue_url"], "--manifest", str(path)
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("bottleneck-enqueue: error: --manifest")
    assert says in done.stderr
    assert drain(world["sqs"], world["queue_url"]) == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--list-concurrency", "0"], "--list-concurrency"),
        (["--list-concurrency", "999"], "--list-concurrency must be <= 256"),
        (["--from-dead-letter", "URL", "--manifest", "m.json"], "does not go with"),
    ],
)
def test_bad_backfill_options_exit_2(
    endpoint: str, world: dict[str, Any], args: list[str], says: str
) -> None:
    source = [] if "--from-dead-letter" in args else ["s3://images/"]
    done = enqueue(endpoint, *source, "--queue-url", world["queue_url"], *args)
    assert done.returncode == 2
    assert says in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_manifest_needs_the_source(endpoint: str, world: dict[str, Any]) -> None:
    done = enqueue(endpoint, "--queue-url", world["queue_url"], "--manifest", "m.json")
    assert done.returncode == 2
    assert "--manifest needs the source" in done.stderr


def test_reconcile_findings_with_skip_existing_exit_2(
    endpoint: str, world: dict[str, Any], tmp_path: Path
) -> None:
    findings = tmp_path / "findings.jsonl"
    findings.write_text('{"kind": "stale-etag", "key": "photos/a.jpg"}\n{"summary": {}}\n')
    done = enqueue(
        endpoint,
        "s3://images/photos/",
        "--queue-url",
        world["queue_url"],
        "--manifest",
        str(findings),
        "--skip-existing",
        "--output",
        "s3://feats/resnet50/",
    )
    assert done.returncode == 2
    assert "would drop reconcile's stale images" in done.stderr
    assert drain(world["sqs"], world["queue_url"]) == []
