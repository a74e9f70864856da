"""Nothing lost, nothing doubled: injected AWS faults, a slow model, out-of-memory, bad input."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import quote_plus

import pytest
import torch

from consumer.aws import Clients
from consumer.runtime import build_runtime
from consumer.worker import Worker
from producer_lambda.messages import ImageRef, encode
from tests.corpus import GOOD_CASES, photo_jpeg
from tests.fault_injection import Fault, Faulty
from tests.functional.conftest import Stack, consumer_config

IMAGES = {f"photos/{i:02d}.jpg": photo_jpeg(120, 90, seed=100 + i) for i in range(12)}


def _upload_and_send(stack: Stack, images: dict[str, bytes]) -> None:
    stack.s3.put_bucket_versioning(
        Bucket=stack.features, VersioningConfiguration={"Status": "Enabled"}
    )
    for key, data in images.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    stack.send(*(encode(ImageRef(stack.images, key)) for key in images))


def _versions_by_key(stack: Stack) -> Counter[str]:
    pages = stack.s3.get_paginator("list_object_versions").paginate(Bucket=stack.features)
    return Counter(v["Key"] for page in pages for v in page.get("Versions", []))


def _run(stack: Stack, *extra: str, s3: Any = None, sqs: Any = None) -> Worker:
    config = consumer_config(stack, *extra)
    worker = Worker(build_runtime(config, Clients(s3 or stack.s3, sqs or stack.sqs)))
    assert worker.run() == 0
    return worker


def _assert_each_written_once(stack: Stack, images: dict[str, bytes]) -> None:
    versions = _versions_by_key(stack)
    assert versions == Counter({f"v1/{key}.npy": 1 for key in images})
    assert stack.depth() == 0  # nothing visible, nothing in flight
    assert stack.depth(stack.dlq_url) == 0


@pytest.mark.parametrize(
    ("service", "plan"),
    [
        ("s3", {"get_object": Fault("throttle"), "put_object": Fault("throttle")}),
        ("s3", {"get_object": Fault("server", every=2), "put_object": Fault("server", every=2)}),
        ("s3", {"get_object": Fault("reset"), "put_object": Fault("reset")}),
        ("s3", {"put_object": Fault("conflict", every=2)}),
        (
            "sqs",
            {
                "receive_message": Fault("throttle", every=2),
                "delete_message_batch": Fault("server"),
            },
        ),
        ("sqs", {"delete_message_batch": Fault("partial", every=1, limit=3)}),
        ("sqs", {"receive_message": Fault("reset", every=2)}),
    ],
    ids=[
        "s3-throttle",
        "s3-500",
        "s3-reset",
        "s3-409",
        "sqs-throttle-500",
        "sqs-partial-delete",
        "sqs-reset",
    ],
)
def test_injected_faults_lose_and_double_nothing(
    stack: Stack, service: str, plan: dict[str, Fault]
) -> None:
    # GIVEN twelve images, and AWS calls that fail as planned
    _upload_and_send(stack, IMAGES)
    faulty = Faulty(stack.s3 if service == "s3" else stack.sqs, plan)

    # WHEN the consumer runs through the faults
    worker = _run(stack, **{service: faulty})

    # THEN the faults happened, and still every image was written exactly once, queue empty
    assert sum(faulty.injected.values()) > 0
    _assert_each_written_once(stack, IMAGES)
    assert worker.stats.summary()["images_failed"] == 0


def test_partial_dead_letter_send_is_retried(stack: Stack) -> None:
    # GIVEN two bad images and a dead-letter send whose first entry fails once
    bad = {"bad/a.jpg": b"not an image", "bad/b.jpg": b"nor this"}
    _upload_and_send(stack, bad)
    faulty = Faulty(stack.sqs, {"send_message_batch": Fault("partial", every=1, limit=1)})

    _run(stack, sqs=faulty)

    # THEN both reasons are recorded once each, and the work queue is empty
    letters = stack.dead_letters()
    assert sorted(json.loads(letter["body"])["key"] for letter in letters) == sorted(bad)
    assert faulty.injected["send_message_batch"] == 1
    assert stack.depth() == 0


def test_heartbeat_keeps_slow_batches_invisible(stack: Stack) -> None:
    # GIVEN a 2 s visibility timeout and a model that takes 5 s per batch
    _upload_and_send(stack, dict(list(IMAGES.items())[:4]))
    received: Counter[str] = Counter()
    real_receive = stack.sqs.receive_message

    def recording_receive(**kwargs: Any) -> dict[str, Any]:
        response = real_receive(**kwargs)
        received.update(m["MessageId"] for m in response.get("Messages", []))
        return dict(response)

    class RecordingSqs:
        def __getattr__(self, name: str) -> Any:
            return recording_receive if name == "receive_message" else getattr(stack.sqs, name)

    config = consumer_config(stack, "--visibility-timeout", "2", "--receivers", "2")
    runtime = build_runtime(config, Clients(stack.s3, RecordingSqs()))
    real_submit = runtime.backbone.submit

    def slow_submit(batch: torch.Tensor) -> Any:
        time.sleep(5)
        return real_submit(batch)

    runtime.backbone.submit = slow_submit  # type: ignore[method-assign]

    # WHEN the consumer runs
    assert Worker(runtime).run() == 0

    # THEN no message was delivered twice, and all were written once
    assert len(received) == 4
    assert set(received.values()) == {1}
    _assert_each_written_once(stack, dict(list(IMAGES.items())[:4]))


def test_out_of_memory_halves_the_batch_and_keeps_it_small(stack: Stack) -> None:
    # GIVEN a device that runs out of memory above 2 images per batch
    _upload_and_send(stack, IMAGES)
    config = consumer_config(stack, "--batch-size", "8", "--max-wait-ms", "500")
    runtime = build_runtime(config, Clients(stack.s3, stack.sqs))
    real_submit = runtime.backbone.submit
    sizes: list[int] = []
    lock = threading.Lock()

    def small_device(batch: torch.Tensor) -> Any:
        with lock:
            sizes.append(int(batch.shape[0]))
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_submit(batch)

    runtime.backbone.submit = small_device  # type: ignore[method-assign]
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN every image still got its features, and the worker kept the size that fits
    _assert_each_written_once(stack, IMAGES)
    assert max(sizes) > 2  # it did try bigger batches first
    assert worker.inference.current_size <= 2
    assert worker.stats.summary()["images_failed"] == 0


def test_awkward_inputs_land_where_the_contract_says(stack: Stack) -> None:
    # GIVEN a 1-pixel image, a key that needs URL-encoding sent as an S3 event, and an object
    # deleted between its upload and its processing
    odd_key = "odd dir/a+b ü #1.png"
    objects = {"tiny.png": GOOD_CASES["one-pixel.png"], odd_key: GOOD_CASES["rgb.png"]}
    for key, data in {**objects, "gone.jpg": photo_jpeg(64, 48, seed=3)}.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    record = {
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": stack.images}, "object": {"key": quote_plus(odd_key)}},
    }
    stack.send(encode(ImageRef(stack.images, "tiny.png")), json.dumps({"Records": [record]}))
    stack.send(encode(ImageRef(stack.images, "gone.jpg")))
    stack.s3.delete_object(Bucket=stack.images, Key="gone.jpg")

    # WHEN the consumer runs
    _run(stack)

    # THEN both images have features under their real keys, the deleted one is dead-lettered
    keys = set(stack.feature_keys())
    assert keys == {"v1/tiny.png.npy", f"v1/{odd_key}.npy"}
    letters = stack.dead_letters()
    assert [(json.loads(x["body"])["key"], x["error-code"]) for x in letters] == [
        ("gone.jpg", "not-found")
    ]
    assert stack.depth() == 0
