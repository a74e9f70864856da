"""Start `bottleneck-consumer` as a real process against a moto server, as Batch would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from consumer.quarantine import MARKERS

CONSUMER = str(Path(sys.executable).with_name("bottleneck-consumer"))
REGION = "us-east-1"

# Every consumer a test started, so that one left running by a failed assertion is stopped with
# its test (tests/integration/conftest.py): left alone it retried its vanished server for
# minutes, and could have found a later test's moto server on the same port and taken its work.
STARTED: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> int:
    """Kill the consumers started since the last call that still run; how many there were."""
    running = [process for process in STARTED if process.poll() is None]
    for process in running:
        process.kill()
        process.wait(timeout=30)
    STARTED.clear()
    return len(running)


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment of a consumer talking to ``endpoint`` only (never a real account)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        HF_HUB_OFFLINE="1",
        BOTTLENECK_LOG_LEVEL="INFO",
        # The repository root, so that a test's --decode-hook (tests.crash_hook) can be imported.
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    return env


@dataclass
class Endpoint:
    """Clients and names on a moto server: an image bucket, a feature bucket, queue and DLQ."""

    url: str
    s3: Any
    sqs: Any
    queue_url: str
    dlq_url: str
    images: str = "images"
    features: str = "feats"

    @classmethod
    def create(cls, url: str, *, visibility: int = 300, max_receive: int = 10) -> Endpoint:
        kwargs: dict[str, Any] = {
            "endpoint_url": url,
            "region_name": REGION,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        s3, sqs = boto3.client("s3", **kwargs), boto3.client("sqs", **kwargs)
        s3.create_bucket(Bucket="images")
        s3.create_bucket(Bucket="feats")
        s3.put_bucket_versioning(Bucket="feats", VersioningConfiguration={"Status": "Enabled"})
        dlq = sqs.create_queue(QueueName="work-dlq")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]
        redrive = {"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": str(max_receive)}
        queue = sqs.create_queue(
            QueueName="work",
            Attributes={
                "VisibilityTimeout": str(visibility),
                "RedrivePolicy": json.dumps(redrive),
            },
        )["QueueUrl"]
        return cls(url, s3, sqs, queue, dlq)

    def counts(self, url: str | None = None) -> tuple[int, int]:
        """(visible, not visible) messages of the work queue (or ``url``)."""
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        )

    def versions(self) -> dict[str, int]:
        """Versions of each key in the features bucket, but for the quarantine's markers (a
        redelivered message runs alone behind one; a consumer killed meanwhile leaves it)."""
        pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=self.features)
        out: dict[str, int] = {}
        for page in pages:
            for version in page.get("Versions", []):
                if not version["Key"].startswith(f"v1/{MARKERS}"):
                    out[version["Key"]] = out.get(version["Key"], 0) + 1
        return out

    def markers(self) -> list[str]:
        """The quarantine markers still in the features bucket."""
        listed = self.s3.list_objects_v2(Bucket=self.features, Prefix=f"v1/{MARKERS}")
        return [item["Key"] for item in listed.get("Contents", [])]

    def start(self, *extra: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """A consumer process with a tiny model; its log goes to ``log`` (or is discarded)."""
        argv = [
            CONSUMER,
            *("--queue-url", self.queue_url, "--output", f"s3://{self.features}/v1/"),
            *("--model", "test_resnet", "--weights", "random", "--device", "cpu"),
            *extra,
        ]
        sink = log.open("ab") if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(argv, env=aws_env(self.url), stdout=sink, stderr=sink)
        STARTED.append(process)
        return process
