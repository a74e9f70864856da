"""consumer.metrics: valid CloudWatch Embedded Metric Format, aggregated per interval."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from consumer.metrics import MAX_VALUES_PER_METRIC, MetricsEmitter


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _assert_valid_emf(doc: dict[str, Any]) -> None:
    """The EMF specification's structural rules for one log event."""
    meta = doc["_aws"]
    assert isinstance(meta["Timestamp"], int)
    for directive in meta["CloudWatchMetrics"]:
        assert directive["Namespace"]
        for dimension_set in directive["Dimensions"]:
            for name in dimension_set:
                assert isinstance(doc[name], str), f"dimension {name} must be a string member"
        for metric in directive["Metrics"]:
            value = doc[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert 0 < len(values) <= MAX_VALUES_PER_METRIC
            assert all(isinstance(v, int | float) for v in values)


def test_nothing_recorded_writes_nothing() -> None:
    stream = io.StringIO()
    MetricsEmitter(stream, clock=FakeClock()).flush()
    assert stream.getvalue() == ""


def test_batches_and_failures_aggregate_until_the_interval() -> None:
    # GIVEN an emitter with a 60 s interval
    clock = FakeClock()
    stream = io.StringIO()
    emitter = MetricsEmitter(stream, "Bottleneck", clock, dimensions={"Queue": "bn-work"})
    # WHEN batches and failures arrive within the interval
    clock.now += 10
    emitter.batch(64, 0.25)
    emitter.failure("not-found")
    clock.now += 10
    emitter.batch(36, 0.125)
    emitter.failure("not-found")
    emitter.failure("truncated")
    # THEN nothing is written yet
    assert stream.getvalue() == ""
    # WHEN the interval has passed, the next record flushes everything
    clock.now += 40
    emitter.batch(0, 0.0)
    docs = _lines(stream)
    for doc in docs:
        _assert_valid_emf(doc)
    summary, *failures = docs
    directive = summary["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "Bottleneck"
    assert directive["Dimensions"] == [["Queue"]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "Images": "Count",
        "ImagesPerSecond": "Count/Second",
        "BatchLatencyMs": "Milliseconds",
    }
    assert summary["Queue"] == "bn-work"
    assert summary["Images"] == 100
    assert summary["ImagesPerSecond"] == pytest.approx(100 / 60, abs=1e-3)
    assert summary["BatchLatencyMs"] == [250.0, 125.0, 0.0]
    assert summary["_aws"]["Timestamp"] == int(clock.now * 1000)
    by_code = {d["ErrorCode"]: d for d in failures}
    assert {code: d["Failures"] for code, d in by_code.items()} == {"not-found": 2, "truncated": 1}
    failure_directive = by_code["not-found"]["_aws"]["CloudWatchMetrics"][0]
    assert failure_directive["Dimensions"] == [["Queue", "ErrorCode"]]
    assert failure_directive["Metrics"] == [{"Name": "Failures", "Unit": "Count"}]
    assert by_code["not-found"]["Queue"] == "bn-work"


def test_flush_resets_the_interval() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    emitter = MetricsEmitter(stream, clock=clock)
    emitter.batch(8, 0.5)
    clock.now += 2
    emitter.flush()
    emitter.flush()  # nothing new: no second line
    (doc,) = _lines(stream)
    assert doc["Images"] == 8
    assert doc["ImagesPerSecond"] == 4.0
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [[]]


def test_more_latencies_than_emf_allows_spill_into_further_lines() -> None:
    stream = io.StringIO()
    emitter = MetricsEmitter(stream, clock=FakeClock())
    for _ in range(MAX_VALUES_PER_METRIC * 2 + 5):
        emitter.batch(1, 0.001)
    emitter.flush()
    docs = _lines(stream)
    for doc in docs:
        _assert_valid_emf(doc)
    assert [len(d["BatchLatencyMs"]) for d in docs] == [100, 100, 5]
    assert sum(d.get("Images", 0) for d in docs) == MAX_VALUES_PER_METRIC * 2 + 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"namespace": ""},
        {"interval": 0},
        {"dimensions": {"ErrorCode": "x"}},
        {"dimensions": {"Queue": ""}},
    ],
)
def test_invalid_construction_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        MetricsEmitter(io.StringIO(), **kwargs)


def test_invalid_records_are_rejected() -> None:
    emitter = MetricsEmitter(io.StringIO(), clock=FakeClock())
    with pytest.raises(ValueError, match="negative"):
        emitter.batch(-1, 0.1)
    with pytest.raises(ValueError, match="empty"):
        emitter.failure("")
