"""Injected AWS faults lose and double nothing: every good image ends written exactly once.

The consumer runs in-process against moto with its S3 or SQS client wrapped in
:class:`tests.faults.Faulty`: throttling, 500s, connection resets and refused connections,
409 conditional conflicts, responses lost after the request was carried out, and batch calls
with ``Failed`` entries. After each run every image has exactly one feature-file version (the
feature bucket is versioned, so an overwrite would show), nothing is left in the work queue,
visible or in flight, and the worker holds nothing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import torch

from bottleneck_contract.messages import ImageRef, encode
from consumer.aws import Clients
from consumer.quarantine import MARKERS
from consumer.runtime import build_runtime
from consumer.worker import Worker
from tests.corpus import BAD_CASES, photo_jpeg
from tests.faults import Fault, Faulty
from tests.functional.conftest import Stack, consumer_config

IMAGES = {f"photos/{i:02d}.jpg": photo_jpeg(120, 90, seed=100 + i) for i in range(12)}


def upload_and_send(stack: Stack, images: dict[str, bytes]) -> dict[str, str]:
    """Upload ``images``, send one message each; returns message id by key."""
    stack.s3.put_bucket_versioning(
        Bucket=stack.features, VersioningConfiguration={"Status": "Enabled"}
    )
    ids: dict[str, str] = {}
    for key, data in images.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
        body = encode(ImageRef(stack.images, key))
        ids[key] = stack.sqs.send_message(QueueUrl=stack.queue_url, MessageBody=body)["MessageId"]
    return ids


def versions_by_key(stack: Stack) -> Counter[str]:
    """Versions of each key in the features bucket, but for the quarantine's markers: a message
    redelivered after a fault runs alone behind one (written, then deleted)."""
    pages = stack.s3.get_paginator("list_object_versions").paginate(Bucket=stack.features)
    keys = (v["Key"] for page in pages for v in page.get("Versions", []))
    return Counter(key for key in keys if not key.startswith(f"v1/{MARKERS}"))


def run_worker(stack: Stack, *extra: str, s3: Any = None, sqs: Any = None) -> Worker:
    config = consumer_config(stack, *extra)
    worker = Worker(build_runtime(config, Clients(s3 or stack.s3, sqs or stack.sqs)))
    assert worker.run() == 0
    return worker


def assert_each_written_once(stack: Stack, worker: Worker, images: dict[str, bytes]) -> None:
    assert versions_by_key(stack) == Counter({f"v1/{key}.npy": 1 for key in images})
    assert stack.feature_keys(f"v1/{MARKERS}") == []  # every marker was removed
    assert stack.depth() == 0  # nothing visible, nothing in flight
    assert worker.inflight.empty()
    assert worker.inflight.images() == 0  # every in-flight slot was given back


FAULT_PLANS: dict[str, tuple[str, dict[str, Fault]]] = {
    "s3-throttle": (
        "s3",
        {"get_object": Fault("throttle", every=3), "put_object": Fault("throttle", every=3)},
    ),
    "s3-500": (
        "s3",
        {"get_object": Fault("server", every=2), "put_object": Fault("server", every=2)},
    ),
    "s3-reset": (
        "s3",
        {"get_object": Fault("reset", every=3), "put_object": Fault("reset", every=3)},
    ),
    "s3-unreachable": ("s3", {"get_object": Fault("unreachable", calls={1, 2, 5})}),
    "s3-409": ("s3", {"put_object": Fault("conflict", every=2)}),
    # The put reached S3 and wrote the file, but its response was lost: the retried
    # conditional put must find the file there (412), not write a second version.
    "s3-put-response-lost": ("s3", {"put_object": Fault("reset", every=2, after=True)}),
    # Three failures in a row outlast the retries: the image fails transiently, its message
    # is released with a backoff delay and done on its next delivery.
    "s3-retries-exhausted": (
        "s3",
        {"put_object": Fault("server", calls={1, 2, 3}, key="v1/photos/05.jpg.npy")},
    ),
    "sqs-throttle-500": (
        "sqs",
        {
            "receive_message": Fault("throttle", every=2),
            "delete_message_batch": Fault("server", calls={1}),
        },
    ),
    "sqs-reset": ("sqs", {"receive_message": Fault("reset", every=2)}),
    "sqs-unreachable": ("sqs", {"receive_message": Fault("unreachable", calls={1, 2})}),
    "sqs-partial-delete": ("sqs", {"delete_message_batch": Fault("partial", every=1, limit=3)}),
    # The delete went through but its response was lost: the retry must not fail the run.
    "sqs-delete-response-lost": (
        "sqs",
        {"delete_message_batch": Fault("reset", calls={1}, after=True)},
    ),
}


@pytest.mark.parametrize(("service", "plan"), FAULT_PLANS.values(), ids=FAULT_PLANS.keys())
def test_injected_faults_lose_and_double_nothing(
    stack: Stack, service: str, plan: dict[str, Fault]
) -> None:
    # GIVEN twelve images, and AWS calls that fail as planned
    upload_and_send(stack, IMAGES)
    faulty = Faulty(stack.s3 if service == "s3" else stack.sqs, plan)

    # WHEN the consumer runs through the faults until the queue is idle
    worker = run_worker(stack, **{service: faulty})

    # THEN the faults happened, and still every image was written exactly once, queue empty
    assert set(faulty.injected) == set(plan)
    assert_each_written_once(stack, worker, IMAGES)
    assert stack.depth(stack.dlq_url) == 0
    assert worker.stats.summary()["images_failed"] == 0


def test_partial_release_is_retried(stack: Stack) -> None:
    # GIVEN a write that fails until the message is released, and a release
    # (ChangeMessageVisibilityBatch) whose entry comes back Failed twice
    images = dict(list(IMAGES.items())[:3])
    upload_and_send(stack, images)
    s3 = Faulty(
        stack.s3, {"put_object": Fault("server", calls={1, 2, 3}, key="v1/photos/00.jpg.npy")}
    )
    sqs = Faulty(stack.sqs, {"change_message_visibility_batch": Fault("partial", calls={1, 2})})

    # WHEN the consumer runs
    worker = run_worker(stack, s3=s3, sqs=sqs)

    # THEN the release was retried until it took, the message came back at once-ish (its
    # backoff delay), and every image ends written once
    assert sqs.injected["change_message_visibility_batch"] == 2
    assert worker.stats.summary()["retried_by_code"]
    assert_each_written_once(stack, worker, images)


def test_partial_dead_letter_send_is_retried(stack: Stack) -> None:
    # GIVEN two bad images and a dead-letter send whose first entry fails once
    bad = {"bad/a.jpg": b"not an image", "bad/b.jpg": b"nor this"}
    ids = upload_and_send(stack, bad)
    faulty = Faulty(stack.sqs, {"send_message_batch": Fault("partial", calls={1})})

    # WHEN the consumer runs
    worker = run_worker(stack, sqs=faulty)

    # THEN both reasons are recorded once each, and the work queue is empty
    letters = stack.dead_letters()
    assert sorted(json.loads(letter["body"])["key"] for letter in letters) == sorted(bad)
    assert {letter["error-code"] for letter in letters} == {"not-an-image"}
    assert faulty.injected["send_message_batch"] == 1
    assert stack.depth() == 0
    assert worker.inflight.images() == 0
    assert sorted(ids) == sorted(bad)


def _dead_letters_with_source(stack: Stack) -> list[tuple[str, str, str]]:
    """(key, error-code, source-message-id) of every dead letter, drained."""
    out = []
    while got := stack.sqs.receive_message(
        QueueUrl=stack.dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages", []):
        for m in got:
            attrs = m["MessageAttributes"]
            out.append(
                (
                    json.loads(m["Body"])["key"],
                    attrs["error-code"]["StringValue"],
                    attrs["source-message-id"]["StringValue"],
                )
            )
            stack.sqs.delete_message(QueueUrl=stack.dlq_url, ReceiptHandle=m["ReceiptHandle"])
    return out


def test_lost_dead_letter_response_records_each_failure_under_its_source_id(stack: Stack) -> None:
    # GIVEN bad images, and a dead-letter send that reaches SQS but whose response is lost
    bad = {f"bad/{name}": data for name, (data, _) in list(BAD_CASES.items())[:4]}
    ids = upload_and_send(stack, bad)
    faulty = Faulty(stack.sqs, {"send_message_batch": Fault("reset", calls={1}, after=True)})

    # WHEN the consumer runs
    worker = run_worker(stack, sqs=faulty)

    # THEN every bad message is in the DLQ with its reason and its source message id; the
    # retried send may record one of them twice (at-least-once), never under another id
    letters = _dead_letters_with_source(stack)
    expected = {(key, BAD_CASES[key.removeprefix("bad/")][1], ids[key]) for key in bad}
    assert set(letters) == expected
    assert len(letters) <= len(expected) + 1
    assert faulty.injected["send_message_batch"] == 1
    assert stack.depth() == 0
    assert worker.inflight.images() == 0


def _slow_model(worker_runtime: Any, seconds: float) -> None:
    real_submit = worker_runtime.backbone.submit

    def slow_submit(batch: torch.Tensor) -> Any:
        time.sleep(seconds)
        return real_submit(batch)

    worker_runtime.backbone.submit = slow_submit


class _CountingSqs:
    """The SQS client with every received message id counted (a second delivery shows)."""

    def __init__(self, sqs: Any) -> None:
        self.sqs = sqs
        self.received: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        if name != "receive_message":
            return getattr(self.sqs, name)

        def receive(**kwargs: Any) -> Any:
            response = self.sqs.receive_message(**kwargs)
            self.received.update(m["MessageId"] for m in response.get("Messages", []))
            return response

        return receive


@pytest.mark.parametrize(
    "fault",
    [Fault("partial", calls={1, 3}), Fault("throttle", calls={1}), Fault("reset", calls={2})],
    ids=["partial", "throttle", "reset"],
)
def test_heartbeat_faults_are_retried_before_the_visibility_runs_out(
    stack: Stack, fault: Fault
) -> None:
    # GIVEN a 2 s visibility timeout, a model that takes 3 s per batch, and visibility
    # extensions that fail as planned
    images = dict(list(IMAGES.items())[:4])
    upload_and_send(stack, images)
    counting = _CountingSqs(stack.sqs)
    sqs = Faulty(counting, {"change_message_visibility_batch": fault})
    config = consumer_config(stack, "--visibility-timeout", "2", "--max-wait-ms", "300")
    runtime = build_runtime(config, Clients(stack.s3, sqs))
    _slow_model(runtime, 3.0)
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN the faults happened, and yet no message was delivered twice; all written once
    assert sqs.injected["change_message_visibility_batch"] > 0
    assert len(counting.received) == len(images)
    assert set(counting.received.values()) == {1}
    assert_each_written_once(stack, worker, images)


def test_a_stale_receipt_handle_drops_the_copy_and_the_redelivery_does_the_work(
    stack: Stack,
) -> None:
    # GIVEN one image, a 2 s visibility timeout, a model that takes 4 s per batch, and a first
    # visibility extension that SQS answers with ReceiptHandleIsInvalid (the message was
    # delivered again since): the message becomes visible and this worker receives it again
    images = dict(list(IMAGES.items())[:1])
    upload_and_send(stack, images)
    counting = _CountingSqs(stack.sqs)
    sqs = Faulty(counting, {"change_message_visibility_batch": Fault("stale", calls={1})})
    config = consumer_config(stack, "--visibility-timeout", "2", "--receivers", "2")
    runtime = build_runtime(config, Clients(stack.s3, sqs))
    _slow_model(runtime, 4.0)
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN the stale copy was dropped (neither written nor deleted by it), the redelivered one
    # wrote the file once and deleted the message, and no in-flight slot leaked
    assert sqs.injected["change_message_visibility_batch"] == 1
    assert list(counting.received.values()) == [2]
    assert_each_written_once(stack, worker, images)
    assert worker.stats.counts["messages_dropped"] == 1
