"""Functional fixtures: buckets and queues in moto, and a consumer wired to them in-process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from consumer.aws import Clients
from consumer.config import Config
from consumer.runtime import Runtime, build_runtime
from consumer.stats import Stats
from consumer.worker import Worker
from tests.fakes import create_work_queue

REGION = "us-east-1"


@dataclass
class Stack:
    """What a deployed stack gives the consumer: buckets, a work queue and its DLQ."""

    s3: Any
    sqs: Any
    queue_url: str
    dlq_url: str
    images: str = "images"
    features: str = "feats"

    def send(self, *bodies: str) -> None:
        for body in bodies:
            self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)

    def depth(self, url: str | None = None) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )

    def dead_letters(self) -> list[dict[str, Any]]:
        """Drain the DLQ: each entry's body and its error-code / error-detail attributes."""
        out: list[dict[str, Any]] = []
        while True:
            got = self.sqs.receive_message(
                QueueUrl=self.dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
            ).get("Messages", [])
            if not got:
                return out
            for m in got:
                attrs = m.get("MessageAttributes", {})
                out.append(
                    {
                        "body": m["Body"],
                        "error-code": attrs["error-code"]["StringValue"],
                        "error-detail": attrs["error-detail"]["StringValue"],
                    }
                )
                self.sqs.delete_message(QueueUrl=self.dlq_url, ReceiptHandle=m["ReceiptHandle"])

    def feature_keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.features, Prefix=prefix
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def make_stack(s3: Any, sqs: Any, *, max_receive_count: int = 3) -> Stack:
    s3.create_bucket(Bucket="images")
    s3.create_bucket(Bucket="feats")
    queue_url, dlq_url = create_work_queue(
        sqs, max_receive_count=max_receive_count, attributes={"VisibilityTimeout": "30"}
    )
    return Stack(s3, sqs, queue_url, dlq_url)


@pytest.fixture
def stack(aws: None) -> Stack:
    return make_stack(
        boto3.client("s3", region_name=REGION), boto3.client("sqs", region_name=REGION)
    )


# The producer's tests: plain clients and a work queue, without the consumer's stack.
@pytest.fixture
def sqs(aws: None) -> Any:
    """A moto SQS client."""
    return boto3.client("sqs", region_name=REGION)


@pytest.fixture
def queue_url(sqs: Any) -> str:
    """The work queue."""
    return str(sqs.create_queue(QueueName="work")["QueueUrl"])


@pytest.fixture
def batch(aws: None) -> Any:
    """A moto Batch client."""
    return boto3.client("batch", region_name=REGION)


def consumer_config(stack: Stack, *extra: str) -> Config:
    """A fast consumer: a tiny timm model, random weights, small batches, quick idle exit."""
    return Config.from_args(
        [
            *("--queue-url", stack.queue_url, "--output", f"s3://{stack.features}/v1/"),
            *("--model", "test_resnet", "--weights", "random", "--device", "cpu"),
            *("--batch-size", "4", "--max-wait-ms", "50", "--idle-exit", "1"),
            *("--fetch-concurrency", "4", "--write-concurrency", "4", "--receivers", "1"),
            *extra,
        ],
        {},
    )


@pytest.fixture
def run_consumer(stack: Stack) -> Callable[..., tuple[Runtime, Stats]]:
    """Run a consumer in this process until the queue has been idle; return what it did."""

    def run(*extra: str, clients: Clients | None = None) -> tuple[Runtime, Stats]:
        config = consumer_config(stack, *extra)
        runtime = build_runtime(config, clients or Clients(stack.s3, stack.sqs))
        worker = Worker(runtime)
        assert worker.run() == 0
        # Every image resolved gave its encoded bytes back, whichever way it ended.
        assert worker.loader.budget is not None and worker.loader.budget.held == 0
        return runtime, worker.stats

    return run
