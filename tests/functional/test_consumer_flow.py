"""The consumer end to end in-process against moto: good images written once, bad ones
dead-lettered with their reason, repeats computing nothing new."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import numpy as np
import pytest

from bottleneck_contract.features import encode_key
from bottleneck_contract.messages import ImageRef, encode
from consumer.aws import Clients
from tests.corpus import BAD_CASES, photo_jpeg
from tests.functional.conftest import Stack

GOOD = {
    "photos/cat 1.jpg": photo_jpeg(500, 375, seed=1),
    "photos/a+b.jpg": photo_jpeg(375, 500, seed=2),
    "фото/猫.jpg": photo_jpeg(320, 240, seed=3),
    "small.jpg": photo_jpeg(40, 30, seed=4),
}


def s3_event(bucket: str, key: str, event: str = "ObjectCreated:Put") -> str:
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventName": event,
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "size": 1}},
    }
    return json.dumps({"Records": [record]})


def upload(stack: Stack, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)


def test_good_and_bad_images_end_where_the_contract_says(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN good images (own bodies, an S3 event, an SNS-wrapped event), the bad corpus,
    # a missing object, a malformed body, a test event and a delete event
    bad = {f"bad/{name}": data for name, (data, _) in BAD_CASES.items()}
    upload(stack, GOOD | bad)
    keys = list(GOOD)
    stack.send(encode(ImageRef(stack.images, keys[0])), encode(ImageRef(stack.images, keys[1])))
    stack.send(s3_event(stack.images, keys[2]))
    stack.send(json.dumps({"Type": "Notification", "Message": s3_event(stack.images, keys[3])}))
    stack.send(*(encode(ImageRef(stack.images, key)) for key in bad))
    stack.send(encode(ImageRef(stack.images, "missing.jpg")))
    stack.send("this is not json", json.dumps({"bucket": 3}))
    stack.send(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "images"}))
    stack.send(s3_event(stack.images, keys[0], "ObjectRemoved:Delete"))

    # WHEN the consumer runs until the queue is idle
    runtime, stats = run_consumer()

    # THEN every good image has exactly one feature file with the right shape and metadata
    assert sorted(stack.feature_keys()) == sorted(f"v1/{k}.npy" for k in GOOD)
    for key in GOOD:
        obj = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")
        array = np.load(io.BytesIO(obj["Body"].read()), allow_pickle=False)
        assert array.shape == runtime.feature_shape == (96,)
        assert array.dtype == np.float32 and np.isfinite(array).all()
        meta = obj["Metadata"]
        assert meta["source-key"] == encode_key(key)
        assert meta["source-bucket"] == stack.images
        assert meta["source-etag"] == stack.s3.head_object(Bucket=stack.images, Key=key)[
            "ETag"
        ].strip('"')
        assert meta["fingerprint"] == runtime.fingerprint
        assert (meta["shape"], meta["dtype"], meta["pool"]) == ("96", "float32", "avg")
    # AND every bad one is in the dead-letter queue once, with the right error-code
    letters = stack.dead_letters()
    by_key: dict[str | None, str] = {}
    for letter in letters:
        try:
            by_key[json.loads(letter["body"]).get("key")] = letter["error-code"]
        except (ValueError, AttributeError):
            by_key[letter["body"]] = letter["error-code"]
    expected: dict[str | None, str] = {f"bad/{name}": code for name, (_, code) in BAD_CASES.items()}
    expected |= {"missing.jpg": "not-found", "this is not json": "bad-message", None: "bad-message"}
    assert by_key == expected
    assert len(letters) == len(expected)
    assert all(letter["error-detail"] for letter in letters)
    # AND the work queue is empty, the summary adds up
    assert stack.depth() == 0
    summary = stats.summary()
    assert summary["images_written"] == len(GOOD)
    assert summary["images_failed"] == len(BAD_CASES) + 1


def _feature_etags(stack: Stack) -> dict[str, str]:
    return {
        k: stack.s3.head_object(Bucket=stack.features, Key=k)["ETag"] for k in stack.feature_keys()
    }


def test_a_second_run_over_the_same_messages_writes_nothing(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN a first run that wrote every feature file
    upload(stack, GOOD)
    bodies = [encode(ImageRef(stack.images, key)) for key in GOOD]
    stack.send(*bodies)
    run_consumer()
    before = _feature_etags(stack)
    # WHEN the same messages are delivered again (at-least-once delivery)
    stack.send(*bodies)
    _, stats = run_consumer()
    # THEN no file is written again: every image counts as already done
    summary = stats.summary()
    assert summary["images_written"] == 0 and summary["images_replaced"] == 0
    assert summary["images_skipped"] == len(GOOD)
    assert _feature_etags(stack) == before
    assert stack.depth() == 0


def test_head_check_skips_fetch_and_compute_for_done_images(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN done images, delivered again with their ETags (as the producer sends them)
    upload(stack, GOOD)
    stack.send(*(encode(ImageRef(stack.images, k)) for k in GOOD))
    run_consumer()
    bodies = []
    for key in GOOD:
        etag = stack.s3.head_object(Bucket=stack.images, Key=key)["ETag"].strip('"')
        bodies.append(encode(ImageRef(stack.images, key, etag=etag)))
    stack.send(*bodies)
    gets: list[str] = []
    stack.s3.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )
    # WHEN a consumer with --existing-check head runs
    _, stats = run_consumer("--existing-check", "head")
    # THEN it neither fetched nor computed anything
    assert gets == []
    assert stats.summary()["images_computed"] == 0
    assert stats.summary()["images_skipped"] == len(GOOD)


def test_reuploaded_image_replaces_its_out_of_date_feature_file(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN a feature file for the first version of an image
    key = "photos/cat 1.jpg"
    upload(stack, {key: GOOD[key]})
    stack.send(encode(ImageRef(stack.images, key)))
    run_consumer()
    first = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")
    # WHEN the image is re-uploaded with other content and its message arrives
    upload(stack, {key: photo_jpeg(500, 375, seed=99)})
    stack.send(encode(ImageRef(stack.images, key)))
    _, stats = run_consumer()
    # THEN the file is replaced, and its metadata names the new source version
    second = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")
    assert stats.summary()["images_replaced"] == 1
    new_etag = stack.s3.head_object(Bucket=stack.images, Key=key)["ETag"].strip('"')
    assert second["Metadata"]["source-etag"] == new_etag != first["Metadata"]["source-etag"]
    assert not np.array_equal(
        np.load(io.BytesIO(first["Body"].read())), np.load(io.BytesIO(second["Body"].read()))
    )


def test_changed_settings_replace_and_feature_map_has_chw_shape(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    key = "small.jpg"
    upload(stack, {key: GOOD[key]})
    stack.send(encode(ImageRef(stack.images, key)))
    run_consumer()
    # WHEN the same image is processed with --pool none and float16
    stack.send(encode(ImageRef(stack.images, key)))
    runtime, stats = run_consumer("--pool", "none", "--feature-dtype", "float16")
    obj = stack.s3.get_object(Bucket=stack.features, Key=f"v1/{key}.npy")
    array = np.load(io.BytesIO(obj["Body"].read()), allow_pickle=False)
    # THEN the file was replaced with a (C, H, W) float16 map and the new fingerprint
    assert stats.summary()["images_replaced"] == 1
    assert array.dtype == np.float16 and array.ndim == 3 and array.shape[0] == 96
    assert obj["Metadata"]["fingerprint"] == runtime.fingerprint
    assert obj["Metadata"]["shape"] == "x".join(map(str, array.shape))


class _CountingGets:
    """The S3 client, each GetObject slowed by 200 ms and counted while it runs."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.s3, name)

    def get_object(self, **kwargs: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.2)
            return self.s3.get_object(**kwargs)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("budget", [None, "1"])
def test_the_encoded_bytes_budget_bounds_the_downloads_held_at_once(
    stack: Stack, run_consumer: Callable[..., Any], budget: str | None
) -> None:
    # GIVEN twelve images whose messages name their sizes, four fetch threads, and (or not) a
    # budget of one byte, smaller than any of them
    images = {f"budget/{i:02d}.jpg": photo_jpeg(160, 120, seed=50 + i) for i in range(12)}
    upload(stack, images)
    stack.send(*(encode(ImageRef(stack.images, k, size=len(d))) for k, d in images.items()))
    gets = _CountingGets(stack.s3)

    # WHEN the consumer runs until the queue is idle
    extra = ("--max-encoded-bytes", budget) if budget else ()
    _, stats = run_consumer(*extra, clients=Clients(gets, stack.sqs))

    # THEN every image is written; with the default budget the threads download together, with
    # one byte only one image holds its bytes at a time (one larger than the whole budget still
    # goes through once nothing else is held)
    assert stats.summary()["images_written"] == len(images)
    assert (gets.most == 1) if budget else (gets.most > 1), gets.most
    assert stack.depth() == 0
