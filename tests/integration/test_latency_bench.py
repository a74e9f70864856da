"""`python -m benchmarks.latency`: the worker against slow stand-ins for AWS and a GPU.

Nothing here asserts a speed. What is asserted: every image is computed and written once (one
GET, one PUT, a tenth of a delete call and of a receive call each: full batches), the JSON's
figures, and that each stage's ceiling is its calls in flight x items per call / latency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import latency
from consumer.config import Config
from consumer.objects import ConditionFailed


def test_the_row_runs_the_worker_and_writes_every_image_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the row runs 300 small images at 5 ms a call, the acker allowed 3 calls at once
    report = tmp_path / "latency.json"
    code = latency.main(
        [
            *("--latency-ms", "5", "--gpu-ms-per-image", "0.2", "--images", "300"),
            *("--warmup", "60", "--batch-size", "16", "--image-size", "64x48"),
            *("--fetch-concurrency", "8", "--write-concurrency", "6", "--receivers", "2"),
            *("--ack-calls", "3", "--json", str(report)),
        ]
    )

    # THEN every image went through once, in full batches of SQS calls
    assert code == 0
    row = json.loads(report.read_text())
    calls = row["calls_per_image"]
    assert calls["GetObject"] == 1.0 and calls["PutObject"] == 1.0
    assert "HeadObject" not in calls
    assert calls["DeleteMessageBatch"] == pytest.approx(0.1, abs=0.02)
    assert calls["ReceiveMessage"] <= 0.2
    # and the ceilings are those of the settings it ran with
    assert row["ceilings_images_per_s"] == {
        "receive": 2 * 10 / 0.005,
        "fetch": 8 / 0.005,
        "write": 6 / 0.005,
        "ack": 3 * 10 / 0.005,
        "gpu": 5000.0,
    }
    assert (row["ack_calls"], row["in_flight_limit"]) == (3, 3 * 16 + 8 + 6)
    assert 0 < row["gpu_busy_share"] <= 1
    printed = capsys.readouterr().out
    assert "(lowest: write)" in printed and "images/s over" in printed


def test_the_stand_in_s3_keeps_the_conditional_put_semantics() -> None:
    # GIVEN the stand-in with one object
    objects = latency.SlowObjects(0.0)
    etag = objects.put("b", "k", b"one", metadata={"a": "1"}, content_type="x")

    # THEN a second create-only PUT and an If-Match on another ETag lose; the right one wins
    with pytest.raises(ConditionFailed):
        objects.put("b", "k", b"two", metadata={}, content_type="x")
    with pytest.raises(ConditionFailed):
        objects.put("b", "k", b"two", metadata={}, content_type="x", if_match="other")
    objects.put("b", "k", b"two", metadata={"a": "2"}, content_type="x", if_match=etag)
    existing = objects.head("b", "k")
    assert existing is not None and existing.metadata == {"a": "2"}
    assert objects.get("b", "k", max_bytes=10).data == b"two"


def test_the_consumers_defaults_clear_a_2000_image_gpu_at_20_ms_a_call() -> None:
    # GIVEN the consumer's defaults and the worker's acker
    config = Config.from_args(
        ["--queue-url", latency.QUEUE_URL, "--output", "s3://features/v1/"], {}
    )
    from consumer.stages.ack import ACK_CALLS

    # THEN no stage's ceiling at 20 ms a call is under an L4's 2,000 ResNet-50 images/s
    limits = latency.ceilings(config, 0.020, ACK_CALLS, 0.0005)
    assert min(limits.values()) >= 2000, limits
