"""Backfills that list in parallel, split at the prefix's folders (moto in-process).

No timing is asserted: the fan-out shows in the ListObjectsV2 calls made (how many, with which
prefix and delimiter), and the parallelism in calls that can only complete together (a barrier).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import ImageRef
from bottleneck_tools.backfill import BackfillResult, run_backfill
from bottleneck_tools.fanin import FanIn
from bottleneck_tools.listing import Listed, ParallelListing, Part
from producer_lambda.filters import KeyFilter
from tests.fakes import put_feature
from tests.moto_batch import REGION

SOURCE = S3Location("images", "photos/")
OUTPUT = S3Location("feats", "resnet50/")
FOLDERS = [f"photos/p{i:02d}/" for i in range(20)]


def image_keys() -> list[str]:
    """Images at several depths in 20 folders, and in folders with odd names."""
    keys = ["photos/top.jpg", "photos//double-slash-at-the-root.jpg", "photos/ a b/c+d.png"]
    for folder in FOLDERS:
        keys += [
            f"{folder}a.jpg",
            f"{folder}b.PNG",
            f"{folder}z.jpg",
            f"{folder}sub/c.jpg",
            f"{folder}sub/deeper/d.webp",
            f"{folder}sub/deeper/deepest/e.jpg",
            f"{folder}/after-a-double-slash.jpg",
            f"{folder}é/ü.jpg",
        ]
    return keys


# Objects that are listed but are no work: a folder placeholder (a key ending in the delimiter),
# a text file, an empty image, and images beside the prefix.
NOT_IMAGES = ["photos/p03/", "photos/p03/sub/", "photos/notes.txt", "photos/p07/sub/readme.md"]
EMPTY = ["photos/p11/empty.jpg"]
OUTSIDE = ["other/x.jpg", "photos-old/y.jpg"]


@pytest.fixture
def clients(aws: None) -> tuple[Any, Any, str]:
    """GIVEN a bucket of images in 20 folders (and decoys), an output bucket and a work queue."""
    s3 = boto3.client("s3", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    s3.create_bucket(Bucket="images")
    s3.create_bucket(Bucket="feats")
    for key in image_keys() + NOT_IMAGES + OUTSIDE:
        s3.put_object(Bucket="images", Key=key, Body=b"x")
    for key in EMPTY:
        s3.put_object(Bucket="images", Key=key, Body=b"")
    return s3, sqs, sqs.create_queue(QueueName="work")["QueueUrl"]


class ListCalls:
    """Records every ListObjectsV2 call's prefix and delimiter, and the most in flight at once."""

    def __init__(self, s3: Any) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        s3.meta.events.register("provide-client-params.s3.ListObjectsV2", self._params)
        s3.meta.events.register("before-call.s3.ListObjectsV2", self._before)
        s3.meta.events.register("after-call.s3.ListObjectsV2", self._after)

    def _params(self, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.calls.append((params["Prefix"], params.get("Delimiter")))

    def _before(self, **_: Any) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _after(self, **_: Any) -> None:
        with self._lock:
            self.in_flight -= 1


def dry_run(s3: Any, list_concurrency: int, **kwargs: Any) -> tuple[BackfillResult, list[str]]:
    selected: list[ImageRef] = []
    result = run_backfill(
        s3=s3,
        sqs=None,
        source=SOURCE,
        queue_url=None,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix, output=OUTPUT),
        dry_run=True,
        list_concurrency=list_concurrency,
        on_selected=selected.append,
        **kwargs,
    )
    assert all(ref.bucket == "images" and ref.etag and ref.size == 1 for ref in selected)
    return result, [ref.key for ref in selected]


def queued(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while got := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [json.loads(m["Body"]) for m in got]
    return bodies


def test_parallel_listing_selects_every_image_exactly_once(clients: tuple[Any, Any, str]) -> None:
    s3, _, _ = clients
    calls = ListCalls(s3)
    # WHEN the prefix is listed by 8 threads
    result, keys = dry_run(s3, list_concurrency=8)
    # THEN every image is selected once, whatever its depth or its folder's name
    assert Counter(keys) == Counter(image_keys())
    # and everything under the prefix was listed once and accounted for
    assert result.listed == len(image_keys()) + len(NOT_IMAGES) + len(EMPTY)
    assert result.skipped == Counter({"suffix": len(NOT_IMAGES), "empty-object": 1})
    assert (result.error, result.interrupted) == (None, False)
    # AND the listing fanned out: the root was split at its folders, every folder had listings
    # of its own (split again or whole: which ones is up to the threads' race), and so did
    # sub-folders
    assert calls.calls[0] == (SOURCE.prefix, "/")
    assert {prefix for prefix, _ in calls.calls} >= {SOURCE.prefix, *FOLDERS}
    assert any(prefix.count("/") > 2 for prefix, _ in calls.calls)
    # (the first folders found are split for sure: 1 + 22 + their sub-folders' listings)
    assert len(calls.calls) > len(FOLDERS) + 3
    assert len(calls.calls) == len(set(calls.calls))  # no prefix listed twice the same way


def test_listings_run_concurrently(clients: tuple[Any, Any, str]) -> None:
    # GIVEN a client whose first two folder listings can only complete together: each waits at
    # a barrier for the other (a sequential lister would break it after 10 s and fail)
    s3, _, _ = clients
    calls = ListCalls(s3)
    barrier = threading.Barrier(2, timeout=10)
    waiting = iter(range(2))
    lock = threading.Lock()

    def meet(params: dict[str, Any], **_: Any) -> None:
        if params["Prefix"] in FOLDERS:
            with lock:
                turn = next(waiting, None)
            if turn is not None:
                barrier.wait()

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", meet)
    # WHEN the prefix is listed by 4 threads
    result, keys = dry_run(s3, list_concurrency=4)
    # THEN both got past the barrier, more than one call was in flight, and nothing was lost
    assert not barrier.broken
    assert calls.most_in_flight >= 2
    assert sorted(keys) == sorted(image_keys())
    assert result.error is None


def test_one_thread_lists_with_one_paginator(clients: tuple[Any, Any, str]) -> None:
    s3, _, _ = clients
    calls = ListCalls(s3)
    _, keys = dry_run(s3, list_concurrency=1)
    assert sorted(keys) == sorted(image_keys())
    assert calls.calls == [(SOURCE.prefix, None)]  # one page holds them all, no delimiter


def test_parallel_listing_sends_every_image_once(clients: tuple[Any, Any, str]) -> None:
    s3, sqs, queue_url = clients
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=SOURCE,
        queue_url=queue_url,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix),
        concurrency=4,
        list_concurrency=8,
    )
    bodies = queued(sqs, queue_url)
    assert Counter(b["key"] for b in bodies) == Counter(image_keys())
    assert all(b["bucket"] == "images" and b["etag"] and b["size"] == 1 for b in bodies)
    assert (result.selected, result.sent, result.failed, result.not_sent) == (
        len(image_keys()),
        len(image_keys()),
        0,
        0,
    )


def test_skip_existing_joins_each_folder_with_its_own_feature_files(
    clients: tuple[Any, Any, str],
) -> None:
    # GIVEN feature files for images at every depth (right under a split folder and deeper; a
    # sub-folder's feature files sort between its parent's b.PNG and z.jpg)
    s3, _, _ = clients
    done = [
        "photos/top.jpg",
        "photos/p00/a.jpg",
        "photos/p01/sub/c.jpg",
        "photos/p02/sub/deeper/deepest/e.jpg",
        "photos/p05//after-a-double-slash.jpg",
        "photos/p19/é/ü.jpg",
    ]
    for key in done:
        put_feature(s3, OUTPUT.prefix, key, etag="e")
    # WHEN the parallel backfill skips images with a feature file
    result, keys = dry_run(s3, list_concurrency=4, existing=OUTPUT)
    # THEN exactly those are skipped, each counted once
    assert sorted(keys) == sorted(set(image_keys()) - set(done))
    assert result.skipped["feature-exists"] == len(done)


def test_a_listing_error_in_one_folder_stops_the_run(clients: tuple[Any, Any, str]) -> None:
    from botocore.exceptions import ClientError

    s3, sqs, queue_url = clients

    def deny(params: dict[str, Any], **_: Any) -> None:
        if params["Prefix"] == "photos/p13/":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", deny)
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=SOURCE,
        queue_url=queue_url,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix),
        list_concurrency=4,
    )
    assert result.error is not None
    assert result.error.startswith("listing failed: AccessDenied")
    # every image taken from the listing is accounted for
    assert result.selected == result.sent + result.failed + result.not_sent
    assert len(queued(sqs, queue_url)) == result.sent


def test_an_interrupt_in_a_listing_thread_stops_the_run(clients: tuple[Any, Any, str]) -> None:
    s3, sqs, queue_url = clients

    def interrupt(params: dict[str, Any], **_: Any) -> None:
        if params["Prefix"] == "photos/p09/":
            raise KeyboardInterrupt

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", interrupt)
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=SOURCE,
        queue_url=queue_url,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix),
        list_concurrency=4,
    )
    assert result.interrupted
    assert result.selected == result.sent + result.failed + result.not_sent
    assert result.listed == result.selected + result.skipped.total()
    assert len(queued(sqs, queue_url)) == result.sent


def test_with_the_queue_full_a_task_lists_the_folders_it_finds(
    clients: tuple[Any, Any, str],
) -> None:
    # GIVEN a listing that may queue a single folder listing: the others are listed by the
    # task that finds them (memory stays flat with a million folders)
    s3, _, _ = clients
    fan: FanIn[list[str]] = FanIn(2, backlog=4, name="test")

    def on_part(_part: Part, objects: Iterator[Listed]) -> None:
        fan.emit([obj.key for obj in objects])

    ParallelListing(
        s3, "images", submit=fan.submit, on_part=on_part, enough=1000, max_depth=3, max_queued=1
    ).start(SOURCE.prefix)
    # WHEN it runs THEN every object under the prefix is listed exactly once
    listed = Counter(key for keys in fan.results() for key in keys)
    assert not fan.close()
    assert listed == Counter(image_keys() + NOT_IMAGES + EMPTY)
