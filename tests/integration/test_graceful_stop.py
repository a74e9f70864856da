"""SIGTERM and idle exit on the real console script, against a moto server over HTTP."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from producer_lambda.messages import ImageRef, encode
from tests.corpus import photo_jpeg
from tests.integration.consumer_process import Endpoint

GRACE = 2.0


def _enqueue(endpoint: Endpoint, count: int) -> list[str]:
    keys = [f"photos/{i:03d}.jpg" for i in range(count)]
    for i, key in enumerate(keys):
        endpoint.s3.put_object(Bucket="images", Key=key, Body=photo_jpeg(160, 120, seed=i))
    for start in range(0, count, 10):
        entries = [
            {"Id": str(i), "MessageBody": encode(ImageRef("images", key))}
            for i, key in enumerate(keys[start : start + 10])
        ]
        endpoint.sqs.send_message_batch(QueueUrl=endpoint.queue_url, Entries=entries)
    return keys


def _wait_for_in_flight(endpoint: Endpoint, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while endpoint.counts()[1] == 0:
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the consumer never received anything"
        time.sleep(0.1)


@pytest.mark.parametrize("grace", [GRACE, 0.0], ids=["finish-in-grace", "release-at-once"])
def test_sigterm_finishes_or_releases_everything_and_exits_zero(
    moto_server: str, tmp_path: Path, grace: float
) -> None:
    # GIVEN a queue whose visibility timeout (300 s) would hide a lost message for minutes,
    # and a consumer holding messages in a batch that would wait 60 s for more
    endpoint = Endpoint.create(moto_server, visibility=300)
    keys = _enqueue(endpoint, 30)
    log = tmp_path / "consumer.log"
    process = endpoint.start(
        *("--batch-size", "64", "--max-wait-ms", "60000", "--stop-grace", str(grace)),
        *("--max-in-flight", "12", "--receivers", "1"),
        log=log,
    )
    _wait_for_in_flight(endpoint, process, log)

    # WHEN it gets SIGTERM mid-batch
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=grace + 20)

    # THEN it exits 0, everything it computed is written and deleted, and everything else is
    # visible again at once: nothing is left in flight behind the 300 s timeout
    assert code == 0, log.read_text()[-2000:]
    visible, in_flight = endpoint.counts()
    written = endpoint.versions()
    assert in_flight == 0
    assert visible + len(written) == len(keys)
    assert len(written) < len(keys)  # it stopped receiving
    if grace:
        assert written  # the batch in hand was computed within the grace period
    assert set(written.values()) <= {1}
    assert '"stop requested"' in log.read_text()


def test_a_second_signal_exits_at_once(moto_server: str, tmp_path: Path) -> None:
    # GIVEN a consumer holding messages with a long grace period and a model slow enough on
    # this CPU (a ViT-B, seconds per batch) that the first stop is still running
    endpoint = Endpoint.create(moto_server)
    _enqueue(endpoint, 12)
    log = tmp_path / "consumer.log"
    process = endpoint.start(
        *("--batch-size", "64", "--max-wait-ms", "60000", "--stop-grace", "60"),
        *("--model", "vit_base_patch16_224"),
        log=log,
    )
    _wait_for_in_flight(endpoint, process, log)

    # WHEN it gets two signals
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)

    # THEN it leaves at once, reporting the second signal in its exit code
    assert process.wait(timeout=15) == 128 + signal.SIGINT


def test_idle_exit_leaves_with_zero_on_an_empty_queue(moto_server: str, tmp_path: Path) -> None:
    endpoint = Endpoint.create(moto_server)
    log = tmp_path / "consumer.log"

    process = endpoint.start("--idle-exit", "1", log=log)

    assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert '"reason": "idle"' in log.read_text()
