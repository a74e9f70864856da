"""Poison inputs cost one message: a decoder crash fails its image alone, and a message that
kills the whole consumer (as the kernel's OOM killer would) is quarantined and dead-lettered as
``crashed`` across restarts, while every good image gets its features and none is dead-lettered.

The crashes are real (an invalid read, ``os.abort()``, SIGKILL of the consumer) and come from
``tests.crash_hook``, which the consumer loads in its decode processes through
``BOTTLENECK_DECODE_HOOK`` in these tests only.
"""

from __future__ import annotations

import time
from pathlib import Path

from bottleneck_contract.messages import ImageRef, encode
from tests.corpus import photo_jpeg
from tests.crash_hook import KILL_CONSUMER, SEGFAULT, mark
from tests.integration.consumer_process import Endpoint

HOOK = ("--decode-hook", "tests.crash_hook:crash_on_marked")
STARTUP = 90


def load(endpoint: Endpoint, good: int, poison: int, marker: bytes) -> tuple[set[str], set[str]]:
    """Upload ``good`` images and ``poison`` marked ones, poison spread among the good; one
    message each. Returns (good keys, poison keys)."""
    good_keys = {f"good/{i:03d}.jpg" for i in range(good)}
    poison_keys = {f"poison/{i}.jpg" for i in range(poison)}
    for i, key in enumerate(sorted(good_keys)):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(120, 90, seed=i))
    for i, key in enumerate(sorted(poison_keys)):
        body = mark(photo_jpeg(120, 90, seed=1000 + i), marker)
        endpoint.s3.put_object(Bucket="images", Key=key, Body=body)
    keys = sorted(good_keys)
    step = max(1, len(keys) // (poison + 1))
    order = list(keys)
    for i, key in enumerate(sorted(poison_keys)):
        order.insert((i + 1) * step + i, key)
    for start in range(0, len(order), 10):
        chunk = order[start : start + 10]
        endpoint.sqs.send_message_batch(
            QueueUrl=endpoint.queue_url,
            Entries=[
                {"Id": str(i), "MessageBody": encode(ImageRef("images", key))}
                for i, key in enumerate(chunk)
            ],
        )
    return good_keys, poison_keys


def dead_letters(endpoint: Endpoint) -> dict[str, list[str]]:
    """The error-code of every copy in the dead-letter queue (left there), by source key: a
    message dead-lettered twice (once by the consumer, once by SQS's redrive) shows both."""
    import json

    found: dict[str, list[str]] = {}
    while True:
        got = endpoint.sqs.receive_message(
            QueueUrl=endpoint.dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=300,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not got:
            return found
        for message in got:
            key = json.loads(message["Body"])["key"]
            attributes = message.get("MessageAttributes", {})
            code = attributes.get("error-code", {}).get("StringValue", "(no reason)")
            found.setdefault(key, []).append(code)


def features(endpoint: Endpoint) -> set[str]:
    """Source keys with a feature file (quarantine markers, under v1/_bottleneck/, are not)."""
    return {
        key.removeprefix("v1/").removesuffix(".npy")
        for key in endpoint.versions()
        if key.endswith(".npy")
    }


def test_a_decoder_crash_fails_its_image_alone_and_the_worker_goes_on(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN 60 good images and 3 that crash the decoder with a segfault
    endpoint = Endpoint.create(moto_server, visibility=300)
    good, poison = load(endpoint, 60, 3, SEGFAULT)
    log = tmp_path / "consumer.log"

    # WHEN one consumer runs until the queue is empty
    process = endpoint.start(*HOOK, "--batch-size", "8", "--idle-exit", "3", log=log)
    code = process.wait(timeout=STARTUP + 120)

    # THEN it was never restarted (it exits 0 by itself), every good image has its features,
    # and exactly the 3 poison images are dead-lettered, as decoder-crashed
    assert code == 0, log.read_text()[-3000:]
    assert features(endpoint) == good
    assert dead_letters(endpoint) == {key: ["decoder-crashed"] for key in poison}
    assert endpoint.counts() == (0, 0)


def test_a_message_that_kills_the_consumer_is_quarantined_and_dead_lettered_as_crashed(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN 60 good images and 3 whose decode kills the whole consumer (SIGKILL, as the OOM
    # killer would), on a queue with maxReceiveCount 3 and a short visibility timeout
    endpoint = Endpoint.create(moto_server, visibility=4, max_receive=3)
    good, poison = load(endpoint, 60, 3, KILL_CONSUMER)
    log = tmp_path / "consumer.log"

    # WHEN consumers are restarted whenever one dies (as the scaler would), until the queue
    # holds nothing, visible or in flight
    restarts, deadline = 0, time.monotonic() + 420
    while True:
        process = endpoint.start(
            *HOOK, *("--batch-size", "8", "--visibility-timeout", "4", "--idle-exit", "3"), log=log
        )
        code = process.wait(timeout=STARTUP + 120)
        assert code in (0, -9), log.read_text()[-3000:]
        if code == 0 and endpoint.counts() == (0, 0):
            break
        restarts += code == -9
        assert time.monotonic() < deadline, f"still not done after {restarts} restarts"
        if code == 0:
            time.sleep(1)  # killed consumers' messages are still invisible: let them return

    # THEN every good image has its features and none is dead-lettered; the 3 are, as crashed
    assert features(endpoint) == good
    assert dead_letters(endpoint) == {key: ["crashed"] for key in poison}
    # (each poison image killed at least one consumer while it ran alone: the crashes were real)
    assert restarts >= 3, restarts
    print(f"restarts: {restarts}")
