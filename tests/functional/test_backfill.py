"""The backfill engine against moto: paginated listings, and an interrupt mid-run."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_tools.backfill import run_backfill
from producer_lambda.filters import KeyFilter
from tests.moto_batch import REGION


@pytest.fixture
def clients(aws: None) -> tuple[Any, Any, str]:
    """S3 with 25 images under photos/, and an empty work queue."""
    s3 = boto3.client("s3", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    s3.create_bucket(Bucket="images")
    for i in range(25):
        s3.put_object(Bucket="images", Key=f"photos/{i:02d}.jpg", Body=b"x")
    return s3, sqs, sqs.create_queue(QueueName="work")["QueueUrl"]


def queued(sqs: Any, queue_url: str) -> list[str]:
    """The keys of every message on the queue."""
    keys: list[str] = []
    while got := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        keys += [json.loads(m["Body"])["key"] for m in got]
    return keys


def test_listing_pages_are_followed(clients: tuple[Any, Any, str]) -> None:
    s3, sqs, queue_url = clients
    pages: list[int] = []

    def small_pages(params: dict[str, Any], **_: Any) -> None:
        params["MaxKeys"] = 7  # four listing pages for 25 keys
        pages.append(1)

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", small_pages)
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=S3Location("images", "photos/"),
        queue_url=queue_url,
        key_filter=KeyFilter(),
        concurrency=3,
    )
    assert (result.listed, result.selected, result.sent, result.not_sent) == (25, 25, 25, 0)
    assert len(pages) == 4
    assert sorted(queued(sqs, queue_url)) == [f"photos/{i:02d}.jpg" for i in range(25)]


def test_an_interrupt_reports_what_was_and_was_not_sent(clients: tuple[Any, Any, str]) -> None:
    # GIVEN a listing that is interrupted (Ctrl-C) after its first page of 12 keys
    s3, sqs, queue_url = clients
    calls = 0

    def interrupt_second_page(params: dict[str, Any], **_: Any) -> None:
        nonlocal calls
        calls += 1
        params["MaxKeys"] = 12
        if calls == 2:
            raise KeyboardInterrupt

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", interrupt_second_page)
    # WHEN the backfill runs
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=S3Location("images", "photos/"),
        queue_url=queue_url,
        key_filter=KeyFilter(),
        concurrency=2,
    )
    # THEN it stops, marks itself interrupted, and every image it took is accounted for: the
    # unfinished batch of two is reported as not sent, and the full batch of ten either went
    # out whole or (cancelled before a worker took it) is not sent either
    assert result.interrupted
    assert (result.selected, result.failed) == (12, 0)
    assert (result.sent, result.not_sent) in {(10, 2), (0, 12)}
    assert len(queued(sqs, queue_url)) == result.sent
    assert result.summary()["interrupted"] is True
