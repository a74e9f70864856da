"""Chaos: consumers killed (SIGKILL) and stopped (SIGTERM) at random moments, then restarted.

Whatever the timing, every good image must end with exactly one feature file (one object
version in a versioned bucket: nothing overwritten), every bad message must be in the dead-letter
queue with its reason, and the work queue must end empty. The run's figures are printed (see
them with ``pytest -s``).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from producer_lambda.messages import ImageRef, encode
from tests.corpus import BAD_CASES, photo_jpeg
from tests.integration.consumer_process import Endpoint

GOOD = 240
KILLS = 6
WORKERS = 2
SEED = 20261125
TIME_LIMIT = 150.0
CONSUMER_ARGS = (
    *("--batch-size", "8", "--max-wait-ms", "100", "--visibility-timeout", "4"),
    *("--stop-grace", "2", "--idle-exit", "4", "--max-in-flight", "24"),
    # A model with some weight on this CPU, so that kills land mid-batch, not between runs.
    *("--model", "resnet50"),
)


def _load(endpoint: Endpoint) -> tuple[list[str], dict[str, str]]:
    good = [f"good/{i:03d}.jpg" for i in range(GOOD)]
    bad = {f"bad/{name}": code for name, (_, code) in BAD_CASES.items()}
    bodies = []
    for i, key in enumerate(good):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(200, 150, seed=i))
        bodies.append(encode(ImageRef("images", key)))
    for name, (data, _) in BAD_CASES.items():
        endpoint.s3.put_object(Bucket="images", Key=f"bad/{name}", Body=data)
        bodies.append(encode(ImageRef("images", f"bad/{name}")))
    random.Random(SEED).shuffle(bodies)
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])
        ]
        endpoint.sqs.send_message_batch(QueueUrl=endpoint.queue_url, Entries=entries)
    return good, bad


def _dead_letters(endpoint: Endpoint) -> list[tuple[str, str, str]]:
    """(key, error-code, source-message-id) of every dead letter, drained."""
    out: list[tuple[str, str, str]] = []
    while True:
        got = endpoint.sqs.receive_message(
            QueueUrl=endpoint.dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not got:
            return out
        for m in got:
            attrs = m["MessageAttributes"]
            out.append(
                (
                    json.loads(m["Body"])["key"],
                    attrs["error-code"]["StringValue"],
                    attrs["source-message-id"]["StringValue"],
                )
            )
            endpoint.sqs.delete_message(QueueUrl=endpoint.dlq_url, ReceiptHandle=m["ReceiptHandle"])


def test_kills_and_restarts_lose_and_double_nothing(moto_server: str, tmp_path: Path) -> None:
    # GIVEN a few hundred images (a few of them bad) and two consumers
    endpoint = Endpoint.create(moto_server, visibility=4, max_receive=50)
    good, bad = _load(endpoint)
    rng = random.Random(SEED)
    log = tmp_path / "consumers.log"
    workers = [endpoint.start(*CONSUMER_ARGS, log=log) for _ in range(WORKERS)]
    kills: Counter[str] = Counter()
    restarts = 0
    started = time.monotonic()
    while endpoint.counts()[1] == 0 and time.monotonic() - started < 60:
        time.sleep(0.2)  # until the first messages are in flight

    # WHEN, while they work, one of them is killed or stopped at a random moment, and restarted
    for _ in range(KILLS):
        time.sleep(rng.uniform(1.0, 4.0))
        index = rng.randrange(WORKERS)
        victim = workers[index]
        if victim.poll() is None:
            how = rng.choice([signal.SIGKILL, signal.SIGTERM])
            victim.send_signal(how)
            kills[how.name] += 1
            code = victim.wait(timeout=30)
            assert code in (0, -signal.SIGKILL), (
                f"a worker exited {code}:\n{log.read_text()[-3000:]}"
            )
        workers[index] = endpoint.start(*CONSUMER_ARGS, log=log)
        restarts += 1

    # AND the survivors run until the queue has been idle (SIGKILLed work reappears after 4 s)
    for process in workers:
        remaining = max(5.0, TIME_LIMIT - (time.monotonic() - started))
        try:
            assert process.wait(timeout=remaining) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # A last consumer picks up anything a kill left invisible when the others went idle.
    final = endpoint.start(*CONSUMER_ARGS, log=log)
    assert final.wait(timeout=60) == 0, log.read_text()[-3000:]

    # THEN every good image has exactly one feature file, none overwritten
    versions = endpoint.versions()
    lost = [key for key in good if f"v1/{key}.npy" not in versions]
    doubled = {key: n for key, n in versions.items() if n > 1}
    letters = _dead_letters(endpoint)
    by_message: dict[str, set[tuple[str, str]]] = {}
    for key, error_code, message_id in letters:
        by_message.setdefault(message_id, set()).add((key, error_code))
    duplicates = len(letters) - len(by_message)
    print(
        f"\nchaos: {GOOD} good + {len(bad)} bad images, {WORKERS} workers, kills {dict(kills)}, "
        f"restarts {restarts}, lost {len(lost)}, doubled {len(doubled)}, "
        f"dead letters {len(letters)} ({duplicates} repeated by a kill between send and delete), "
        f"{time.monotonic() - started:.0f} s"
    )
    assert sum(kills.values()) > 0
    assert lost == []
    assert doubled == {}
    assert set(versions) == {f"v1/{key}.npy" for key in good}
    # AND every bad message is dead-lettered with its reason (a repeat, if any, is the same
    # message recorded twice: at-least-once, and it carries the same source-message-id)
    assert {pair for pairs in by_message.values() for pair in pairs} == set(bad.items())
    assert all(len(pairs) == 1 for pairs in by_message.values())
    assert len(by_message) == len(bad)
    # AND the work queue is empty
    assert endpoint.counts() == (0, 0)
