"""Signals on the real console script, against a moto server over HTTP.

SIGTERM mid-batch: exit 0 within ``--stop-grace``, what finished is written and deleted, and
every other message can be received again right after the exit (the queue's 300 s visibility
timeout would hide a message that was not released). A second signal exits at once. With an
empty queue, ``--idle-exit`` ends the process with 0 by itself. A SIGTERM while the model
loads is a clean exit 0 that takes no message.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bottleneck_contract.messages import ImageRef, encode
from tests.corpus import photo_jpeg
from tests.integration.consumer_process import Endpoint

# Seconds a consumer needs to start (imports torch, builds the model) on a busy 2-core machine:
# a bound on waits, never a measured expectation.
STARTUP = 90


def enqueue(endpoint: Endpoint, count: int, prefix: str = "photos") -> dict[str, str]:
    """Upload ``count`` images and send one message each; returns key by message id."""
    keys = [f"{prefix}/{i:03d}.jpg" for i in range(count)]
    for i, key in enumerate(keys):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(224, 168, seed=i))
    by_id: dict[str, str] = {}
    for start in range(0, count, 10):
        chunk = keys[start : start + 10]
        entries = [
            {"Id": str(i), "MessageBody": encode(ImageRef("images", key))}
            for i, key in enumerate(chunk)
        ]
        sent = endpoint.sqs.send_message_batch(QueueUrl=endpoint.queue_url, Entries=entries)
        by_id.update({s["MessageId"]: chunk[int(s["Id"])] for s in sent["Successful"]})
    return by_id


def wait_until_logged(
    process: subprocess.Popen[bytes], log: Path, message: str, **fields: Any
) -> None:
    """Until the consumer's (debug) log has a line with ``message`` and at least ``fields``."""
    deadline = time.monotonic() + STARTUP
    while not any(
        doc.get("message") == message and all(doc.get(k, -1) >= v for k, v in fields.items())
        for doc in log_lines(log)
    ):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the consumer never logged {message!r} {fields}"
        time.sleep(0.05)


def log_lines(log: Path) -> list[dict[str, Any]]:
    docs = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def receive_all_now(endpoint: Endpoint) -> dict[str, int]:
    """Every message visible right now: ApproximateReceiveCount by message id (left in flight)."""
    got: dict[str, int] = {}
    while True:
        messages = endpoint.sqs.receive_message(
            QueueUrl=endpoint.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=300,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        ).get("Messages", [])
        if not messages:
            return got
        for m in messages:
            got[m["MessageId"]] = int(m["Attributes"]["ApproximateReceiveCount"])


def summary(log: Path) -> dict[str, Any]:
    """The exit summary the consumer printed last."""
    lines = [line for line in log.read_text().splitlines() if line.startswith('{"summary"')]
    assert lines, log.read_text()[-3000:]
    return dict(json.loads(lines[-1])["summary"])


@pytest.mark.parametrize(
    ("grace", "cap", "consumer_args"),
    [
        # Batches of 8 start at once; 40 held images need far longer than 0.5 s on resnet50.
        (0.5, 40, ("--batch-size", "8", "--max-wait-ms", "0")),
        # One batch of up to 64 that cannot fill: the stop flushes it, the grace covers it.
        (20.0, 20, ("--batch-size", "64", "--max-wait-ms", "60000")),
    ],
    ids=["grace-over-mid-batch", "partial-batch-finished-in-grace"],
)
def test_sigterm_mid_batch_exits_zero_and_hands_back_the_rest_at_once(
    moto_server: str, tmp_path: Path, grace: float, cap: int, consumer_args: tuple[str, ...]
) -> None:
    # GIVEN a queue with a 300 s visibility timeout, 60 images, and a consumer holding as many
    # as its in-flight cap lets it (so its one receiver waits for room: no receive under way),
    # on a model that needs seconds per batch on this CPU (resnet50)
    endpoint = Endpoint.create(moto_server, visibility=300)
    sent = enqueue(endpoint, 60)
    log = tmp_path / "consumer.log"
    process = endpoint.start(
        *("--model", "resnet50", "--stop-grace", str(grace), "--receivers", "1"),
        *("--max-in-flight", str(cap), "--log-level", "DEBUG"),
        *consumer_args,
        log=log,
    )
    # Waiting on the state, not on time: under the load of the whole suite a fixed sleep left
    # a receive under way at the SIGTERM (which the summary then did not count). The worker
    # has registered a whole cap's worth (not just received it from SQS), and in the mid-batch
    # case a batch is on the model.
    wait_until_logged(process, log, "received", total=cap)
    if grace < 1:
        wait_until_logged(process, log, "batch submitted", images=1)

    # WHEN it gets SIGTERM
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=grace + 30)

    # THEN it exits 0; nothing is left in flight behind the 300 s timeout, nothing was written
    # twice, and it stopped receiving
    assert code == 0, log.read_text()[-3000:]
    assert endpoint.counts()[1] == 0
    versions = endpoint.versions()
    assert set(versions.values()) <= {1}
    written = {key.removeprefix("v1/").removesuffix(".npy") for key in versions}
    received = summary(log)["messages"]
    assert len(written) <= received < len(sent)
    # AND every message whose image was not written can be received again at once: the ones
    # the consumer held and released come back on their second receive, the rest on their
    # first. (A write that completes while the stop releases its message comes back too, and
    # its next delivery finds the file there: idempotent, so allowed.)
    again = receive_all_now(endpoint)
    came_back = {sent[mid] for mid in again}
    assert came_back | written == set(sent.values())
    assert not (set(sent.values()) - written) - came_back
    released = list(again.values()).count(2)
    deleted = written - came_back
    assert released == received - len(deleted)
    if grace < 1:
        assert released > 0  # the grace ran out with work on the device: handed back
    else:
        assert released == 0 and written  # the flushed batch was finished within the grace


def test_a_second_signal_exits_at_once(moto_server: str, tmp_path: Path) -> None:
    # GIVEN a consumer with a long grace period holding 48 images in one batch on resnet50,
    # many seconds of work on this CPU once the stop flushes it
    endpoint = Endpoint.create(moto_server, visibility=300)
    enqueue(endpoint, 48)
    log = tmp_path / "consumer.log"
    process = endpoint.start(
        *("--model", "resnet50", "--batch-size", "48", "--max-in-flight", "48"),
        *("--max-wait-ms", "60000", "--stop-grace", "60", "--log-level", "DEBUG"),
        log=log,
    )
    # Held by SQS is not yet held by the worker: a stop between the two releases them and exits
    # at once, with nothing left to interrupt. So wait until the worker has registered all 48
    # and the model has the batch.
    wait_until_logged(process, log, "received", total=48)
    wait_until_logged(process, log, "batch submitted", images=48)

    # WHEN it gets SIGINT, and SIGTERM while the first stop is still computing
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None, "the first stop left before the test could interrupt it"
    process.send_signal(signal.SIGTERM)

    # THEN it leaves at once with 128 + the second signal, not after the grace period
    assert process.wait(timeout=10) == 128 + signal.SIGTERM, log.read_text()[-3000:]


def test_idle_exit_after_the_work_is_done(moto_server: str, tmp_path: Path) -> None:
    # GIVEN a few images and a consumer with --idle-exit
    endpoint = Endpoint.create(moto_server, visibility=300)
    sent = enqueue(endpoint, 6)
    log = tmp_path / "consumer.log"

    # WHEN it runs with nobody stopping it
    process = endpoint.start("--idle-exit", "2", log=log)

    # THEN it does the work and exits 0 by itself once the queue is empty
    assert process.wait(timeout=STARTUP + 30) == 0, log.read_text()[-3000:]
    assert endpoint.versions() == {f"v1/{key}.npy": 1 for key in sent.values()}
    assert endpoint.counts() == (0, 0)
    assert '"reason": "idle"' in log.read_text()


def test_sigterm_while_the_model_loads_exits_zero_and_takes_nothing(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN waiting messages and a consumer still building resnet50 (seconds on this CPU)
    endpoint = Endpoint.create(moto_server, visibility=300)
    enqueue(endpoint, 3)
    log = tmp_path / "consumer.log"
    process = endpoint.start(*("--model", "resnet50"), log=log)
    deadline = time.monotonic() + STARTUP
    while "using random weights" not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the consumer never began to load its model"
        time.sleep(0.02)

    # WHEN Batch sends SIGTERM before the first receive
    process.send_signal(signal.SIGTERM)

    # THEN it is a clean stop (0, not killed by the signal) that received and wrote nothing
    assert process.wait(timeout=STARTUP) == 0, log.read_text()[-3000:]
    assert endpoint.counts() == (3, 0)
    assert endpoint.versions() == {}


def test_idle_exit_leaves_nothing_in_flight_when_the_cap_held_receivers_back(
    moto_server: str, tmp_path: Path
) -> None:
    # GIVEN 19 images, each sent twice (38 messages), more than the in-flight cap of 28 that
    # --batch-size 4 gives, so that the receivers wait for room while the first 28 are worked on
    endpoint = Endpoint.create(moto_server, visibility=300)
    sent = enqueue(endpoint, 19)
    for key in list(sent.values()):
        endpoint.sqs.send_message(
            QueueUrl=endpoint.queue_url, MessageBody=encode(ImageRef("images", key))
        )
    log = tmp_path / "consumer.log"

    # WHEN a consumer runs with --idle-exit 5 and nobody stops it
    process = endpoint.start("--batch-size", "4", "--idle-exit", "5", log=log)

    # THEN it exits 0 by itself only once the queue is really empty: every message handled,
    # nothing visible, nothing left in flight behind the 300 s visibility timeout
    assert process.wait(timeout=STARTUP + 60) == 0, log.read_text()[-3000:]
    assert endpoint.counts() == (0, 0), log.read_text()[-3000:]
    assert endpoint.versions() == {f"v1/{key}.npy": 1 for key in sent.values()}
    assert summary(log)["messages"] == 38
