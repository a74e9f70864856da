"""Reliability in-process: the heartbeat holds what waits behind a slow batch, out-of-memory
splits batches without mixing up images, and hostile input lands where the contract says.

Complements ``test_consumer_flow.py`` (the bad corpus one image per message) and
``test_faults.py`` (injected AWS faults).
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import quote_plus

import numpy as np
import pytest
import torch

import consumer.stages.infer
from bottleneck_contract.messages import ImageRef, encode
from consumer.aws import Clients
from consumer.objects import Existing, Fetched, ObjectClient, SizeCallback
from consumer.objects.boto import BotoObjects
from consumer.runtime import Runtime, build_runtime
from consumer.worker import Worker
from tests.corpus import BAD_CASES, GOOD_CASES, photo_jpeg
from tests.corpus import encode as encode_image
from tests.functional.conftest import Stack, consumer_config
from tests.functional.test_faults import assert_each_written_once, upload_and_send

# --- heartbeat -----------------------------------------------------------------------------


class _ReceiveLog:
    """The SQS client, recording every received message's id and ApproximateReceiveCount."""

    def __init__(self, sqs: Any) -> None:
        self.sqs = sqs
        self.receive_counts: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        if name != "receive_message":
            return getattr(self.sqs, name)

        def receive(**kwargs: Any) -> Any:
            response = self.sqs.receive_message(**kwargs)
            for m in response.get("Messages", []):
                count = int(m.get("Attributes", {}).get("ApproximateReceiveCount", 0))
                self.receive_counts.append((m["MessageId"], count))
            return response

        return receive


def _slow(runtime: Runtime, seconds: float) -> list[int]:
    """Slow the model down to ``seconds`` per batch; returns the list of batch sizes it ran."""
    real_submit = runtime.backbone.submit
    sizes: list[int] = []

    def slow_submit(batch: torch.Tensor) -> Any:
        sizes.append(int(batch.shape[0]))
        time.sleep(seconds)
        return real_submit(batch)

    runtime.backbone.submit = slow_submit  # type: ignore[method-assign]
    return sizes


def test_heartbeat_holds_messages_waiting_behind_slow_batches(stack: Stack) -> None:
    # GIVEN a 2 s visibility timeout and four images that go through a model taking 5 s per
    # batch of two: each batch outlives the timeout twice over, and the second waits, decoded,
    # behind the first for another 5 s
    images = {f"wait/{i}.jpg": photo_jpeg(96, 72, seed=300 + i) for i in range(4)}
    sent = upload_and_send(stack, images)
    sqs = _ReceiveLog(stack.sqs)
    config = consumer_config(stack, "--visibility-timeout", "2", "--batch-size", "2")
    runtime = build_runtime(config, Clients(stack.s3, sqs))
    sizes = _slow(runtime, 5.0)
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN several slow batches ran, and yet each message was received exactly once, on its
    # first delivery: the heartbeat kept what waited in the batch queue invisible too
    assert len(sizes) >= 2
    assert sorted(sqs.receive_counts) == sorted((mid, 1) for mid in sent.values())
    assert_each_written_once(stack, worker, images)


# --- out of memory ------------------------------------------------------------------------


def _oom_above(runtime: Runtime, limit: int, until_success: bool = False) -> dict[str, list[int]]:
    """A device that cannot fit more than ``limit`` images (or only until a batch succeeds)."""
    real_submit = runtime.backbone.submit
    seen: dict[str, list[int]] = {"ok": [], "oom": []}
    lock = threading.Lock()

    def small_device(batch: torch.Tensor) -> Any:
        size = int(batch.shape[0])
        with lock:
            recovered = until_success and bool(seen["ok"])
            if size > limit and not recovered:
                seen["oom"].append(size)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            seen["ok"].append(size)
        return real_submit(batch)

    runtime.backbone.submit = small_device  # type: ignore[method-assign]
    return seen


def _expected_features(runtime: Runtime, data: bytes) -> np.ndarray:
    pixels = runtime.prepare(data)
    return np.asarray(runtime.backbone(runtime.backbone.stack([pixels]))[0])


def test_out_of_memory_splits_batches_without_mixing_up_images(stack: Stack) -> None:
    # GIVEN sixteen distinct images and a device that runs out of memory above 2 per batch
    images = {f"oom/{i:02d}.jpg": photo_jpeg(100, 80, seed=400 + i) for i in range(16)}
    upload_and_send(stack, images)
    config = consumer_config(stack, "--batch-size", "8", "--max-wait-ms", "500")
    runtime = build_runtime(config, Clients(stack.s3, stack.sqs))
    expected = {key: _expected_features(runtime, data) for key, data in images.items()}
    seen = _oom_above(runtime, 2)
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN every image got its own features (halving kept each row with its image), none failed
    for key in images:
        body = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")["Body"].read()
        np.testing.assert_allclose(
            np.load(io.BytesIO(body), allow_pickle=False), expected[key], rtol=1e-4, atol=1e-5
        )
    assert worker.stats.summary()["images_failed"] == 0
    assert_each_written_once(stack, worker, images)
    # AND the smaller size was kept: one cascade of splits (8 -> 4 + 4 -> 2s) at most, never
    # a big batch tried again afterwards
    assert seen["oom"] and len(seen["oom"]) <= 3
    assert max(seen["ok"]) <= 2
    assert worker.inference.current_size <= 2


def test_after_out_of_memory_the_batch_size_grows_back(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a device out of memory once (until a batch fits), and growth after 2 good batches
    monkeypatch.setattr(consumer.stages.infer, "_GROW_AFTER", 2)
    images = {f"grow/{i:02d}.jpg": photo_jpeg(64, 48, seed=500 + i) for i in range(24)}
    upload_and_send(stack, images)
    config = consumer_config(stack, "--batch-size", "8", "--max-wait-ms", "300")
    runtime = build_runtime(config, Clients(stack.s3, stack.sqs))
    seen = _oom_above(runtime, 2, until_success=True)
    worker = Worker(runtime)

    # WHEN the consumer runs
    assert worker.run() == 0

    # THEN the size went down, then back up to the configured one; nothing failed
    assert seen["oom"]
    assert worker.inference.current_size == 8
    assert worker.stats.summary()["images_failed"] == 0
    assert_each_written_once(stack, worker, images)


# --- bad input -----------------------------------------------------------------------------


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header (SOF0) is patched to declare ``width x height``."""
    data = bytearray(photo_jpeg(32, 24, seed=9))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    """A small valid BMP whose info header is patched to declare ``width x height``."""
    from PIL import Image

    data = bytearray(encode_image(Image.new("RGB", (4, 4), (1, 2, 3)), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def s3_event(bucket: str, *keys: str) -> str:
    """One S3 notification naming ``keys`` (URL-encoded, as S3 sends them)."""
    records = [
        {
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "size": 1}},
        }
        for key in keys
    ]
    return json.dumps({"Records": records})


def test_hostile_inputs_in_one_message_fail_alone(stack: Stack) -> None:
    # GIVEN one S3 notification naming good images next to every bad case of the corpus,
    # header-only bombs in other formats (a 20000x20000 JPEG and BMP), and an object deleted
    # after it was announced: one bad image must never fail the others of its message
    good = {
        "mixed/one-pixel.png": GOOD_CASES["one-pixel.png"],
        "mixed/photo.jpg": photo_jpeg(120, 90, seed=600),
        "mixed/rgba.png": GOOD_CASES["rgba.png"],
    }
    bad = {f"mixed/bad/{name}": (data, code) for name, (data, code) in BAD_CASES.items()}
    bad["mixed/bomb-20000x20000.jpg"] = (jpeg_declaring(20_000, 20_000), "too-large")
    bad["mixed/bomb-20000x20000.bmp"] = (bmp_declaring(20_000, 20_000), "too-large")
    bad["mixed/deleted.jpg"] = (photo_jpeg(64, 48, seed=601), "not-found")
    stack.s3.put_bucket_versioning(
        Bucket=stack.features, VersioningConfiguration={"Status": "Enabled"}
    )
    for key, data in {**good, **{k: d for k, (d, _) in bad.items()}}.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    stack.send(s3_event(stack.images, *good, *bad))
    stack.s3.delete_object(Bucket=stack.images, Key="mixed/deleted.jpg")

    # WHEN the consumer runs
    config = consumer_config(stack)
    worker = Worker(build_runtime(config, Clients(stack.s3, stack.sqs)))
    assert worker.run() == 0

    # THEN the good images are written once each, every bad one is dead-lettered once with its
    # own reason (as a single-image body naming it), and the message has left the work queue
    assert_each_written_once(stack, worker, good)
    letters = stack.dead_letters()
    got = Counter((json.loads(x["body"])["key"], x["error-code"]) for x in letters)
    assert got == Counter({(key, code) for key, (_, code) in bad.items()})
    assert all(x["error-detail"] for x in letters)


def test_awkward_keys_and_tiny_images_are_good_input(stack: Stack) -> None:
    # GIVEN keys that only survive correct URL-decoding (a literal "%41", "+", spaces,
    # non-ASCII), sent as S3 events, a 1x1 image, and a zero-record notification
    keys = {
        "enc/100%41 off+sale.jpg": photo_jpeg(80, 60, seed=700),
        "enc/a%2Fb/ü é.png": GOOD_CASES["rgb.png"],
        "enc/1px.png": GOOD_CASES["one-pixel.png"],
    }
    stack.s3.put_bucket_versioning(
        Bucket=stack.features, VersioningConfiguration={"Status": "Enabled"}
    )
    for key, data in keys.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    stack.send(*(s3_event(stack.images, key) for key in keys))
    stack.send(json.dumps({"Records": []}))

    # WHEN the consumer runs
    worker = Worker(build_runtime(consumer_config(stack), Clients(stack.s3, stack.sqs)))
    assert worker.run() == 0

    # THEN each has one feature file under its real key, and nothing was dead-lettered
    assert_each_written_once(stack, worker, keys)
    assert stack.dead_letters() == []
    meta = stack.s3.head_object(Bucket=stack.features, Key="v1/enc/1px.png.npy")["Metadata"]
    assert meta["shape"] == "96"


def test_a_missing_bucket_is_a_permanent_failure(stack: Stack) -> None:
    # GIVEN a message naming a bucket that does not exist
    stack.send(encode(ImageRef("no-such-bucket", "a.jpg")))

    # WHEN the consumer runs
    worker = Worker(build_runtime(consumer_config(stack), Clients(stack.s3, stack.sqs)))
    assert worker.run() == 0

    # THEN it is dead-lettered as not-found, once, and not retried in a loop
    letters = stack.dead_letters()
    assert [(json.loads(x["body"])["bucket"], x["error-code"]) for x in letters] == [
        ("no-such-bucket", "not-found")
    ]
    assert stack.depth() == 0


def test_an_image_deleted_after_its_upload_event_is_no_failure(stack: Stack) -> None:
    # GIVEN an image uploaded and announced (the message names its ETag, as upload events and
    # listings do), then deleted before the consumer fetches it; and a message without an ETag
    # naming an image that never existed
    etag = stack.s3.put_object(Bucket=stack.images, Key="gone.jpg", Body=photo_jpeg(64, 48))[
        "ETag"
    ].strip('"')
    stack.send(encode(ImageRef(stack.images, "gone.jpg", etag=etag)))
    stack.send(encode(ImageRef(stack.images, "never-was.jpg")))
    stack.s3.delete_object(Bucket=stack.images, Key="gone.jpg")

    # WHEN the consumer runs
    worker = Worker(build_runtime(consumer_config(stack), Clients(stack.s3, stack.sqs)))
    assert worker.run() == 0

    # THEN the deleted image leaves no feature file and no dead letter (a user's delete is not
    # a failure); the image that never existed is dead-lettered as not-found; the queue is empty
    assert stack.feature_keys() == []
    letters = stack.dead_letters()
    assert [(json.loads(x["body"])["key"], x["error-code"]) for x in letters] == [
        ("never-was.jpg", "not-found")
    ]
    assert worker.stats.counts["images_source-gone"] == 1
    assert stack.depth() == 0


class DeletesTheSourceBeforeEachPut:
    """The user deletes each image in the second between the consumer's fetch and its write."""

    def __init__(self, inner: ObjectClient, s3: Any, images: str) -> None:
        self.inner, self.s3, self.images, self.name = inner, s3, images, inner.name

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        return self.inner.get(bucket, key, max_bytes=max_bytes, on_size=on_size)

    def head(self, bucket: str, key: str) -> Existing | None:
        return self.inner.head(bucket, key)

    def put(self, bucket: str, key: str, body: bytes, **options: Any) -> str:
        source = key.removeprefix("v1/").removesuffix(".npy")
        self.s3.delete_object(Bucket=self.images, Key=source)
        return self.inner.put(bucket, key, body, **options)

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        return self.inner.delete(bucket, key, if_match=if_match)

    def copy(self, bucket: str, source_key: str, key: str, **options: Any) -> None:
        self.inner.copy(bucket, source_key, key, **options)


@pytest.mark.parametrize(("orphan_check", "left"), [("head", 0), ("off", 3)])
def test_orphan_check_removes_features_of_images_deleted_while_computed(
    stack: Stack, orphan_check: str, left: int
) -> None:
    # GIVEN three images whose messages are received and fetched, then deleted before the write
    images = {f"inflight/{i}.jpg": photo_jpeg(64, 48, seed=800 + i) for i in range(3)}
    upload_and_send(stack, images)
    config = consumer_config(stack, "--orphan-check", orphan_check)
    objects = DeletesTheSourceBeforeEachPut(BotoObjects(stack.s3), stack.s3, stack.images)

    # WHEN the consumer runs
    runtime = build_runtime(config, Clients(stack.s3, stack.sqs), objects=objects)
    worker = Worker(runtime)
    assert worker.run() == 0

    # THEN with the check no feature file is left (without it, all three are: reconcile's
    # work), nothing is dead-lettered and the queue is empty
    assert len(stack.feature_keys()) == left
    assert worker.stats.counts["images_source-gone"] == 3 - left
    assert stack.dead_letters() == []
    assert stack.depth() == 0
