"""CloudWatch Embedded Metric Format (EMF) lines: metrics from log output, no agent and no API.

A line on the job's log stream that carries an ``_aws.CloudWatchMetrics`` directive becomes
metrics when it reaches CloudWatch Logs (AWS Batch ships the container's output there with the
``awslogs`` driver). :class:`MetricsEmitter` aggregates what the worker reports and writes one
summary line per interval, so that the cost is a few lines a minute whatever the image rate:

* ``Images`` (Count, sum over the interval) and ``ImagesPerSecond`` (Count/Second, the interval's
  images over its length), with the emitter's base dimensions (e.g. ``Queue``);
* ``BatchLatencyMs`` (Milliseconds, every micro-batch's value; EMF allows up to 100 values per
  metric in one line, so more batches than that spill into further lines);
* ``Failures`` (Count) per ``ErrorCode``, one line per code, with dimensions base + ``ErrorCode``.

The dashboard in ``infra/cloudformation.yaml`` reads exactly these names: keep them in step.
Pure apart from the stream it writes to; the clock is injected, and a lock makes it safe to call
from the worker's threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = [
    "DEFAULT_NAMESPACE",
    "ERROR_CODE_DIMENSION",
    "MAX_VALUES_PER_METRIC",
    "METRIC_BATCH_LATENCY",
    "METRIC_FAILURES",
    "METRIC_IMAGES",
    "METRIC_IMAGES_PER_SECOND",
    "MetricsEmitter",
]

DEFAULT_NAMESPACE = "Bottleneck"
METRIC_IMAGES = "Images"
METRIC_IMAGES_PER_SECOND = "ImagesPerSecond"
METRIC_BATCH_LATENCY = "BatchLatencyMs"
METRIC_FAILURES = "Failures"
ERROR_CODE_DIMENSION = "ErrorCode"
# The EMF specification caps a metric's value array at 100 entries.
MAX_VALUES_PER_METRIC = 100
_DIMENSION_NAME_LIMIT = 255
_MAX_DIMENSIONS = 30


class MetricsEmitter:
    """Aggregate images, batch latencies and failures; write EMF JSON lines once per interval.

    ``batch`` and ``failure`` record and, when ``interval`` seconds have passed since the last
    flush, flush; ``flush`` writes whatever is pending now (call it on shutdown). An interval
    with nothing recorded writes nothing, so an idle worker adds no metrics and no log lines.
    """

    def __init__(
        self,
        stream: TextIO,
        namespace: str = DEFAULT_NAMESPACE,
        clock: Callable[[], float] = time.time,
        *,
        interval: float = 60.0,
        dimensions: Mapping[str, str] | None = None,
    ) -> None:
        if not namespace or len(namespace) > _DIMENSION_NAME_LIMIT:
            raise ValueError(f"namespace must be 1-{_DIMENSION_NAME_LIMIT} characters")
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        base = dict(dimensions or {})
        if ERROR_CODE_DIMENSION in base:
            raise ValueError(f"{ERROR_CODE_DIMENSION} is set per failure, not as a base dimension")
        if len(base) + 1 > _MAX_DIMENSIONS:
            raise ValueError(f"at most {_MAX_DIMENSIONS - 1} base dimensions")
        for name, value in base.items():
            if not name or not value:
                raise ValueError(f"empty dimension name or value: {name!r}={value!r}")
        self._stream = stream
        self._namespace = namespace
        self._clock = clock
        self._interval = interval
        self._dimensions = base
        self._lock = threading.Lock()
        self._started = clock()
        self._images = 0
        self._latencies_ms: list[float] = []
        self._failures: Counter[str] = Counter()

    def batch(self, images: int, latency_s: float) -> None:
        """Record one micro-batch of ``images`` computed in ``latency_s`` seconds."""
        if images < 0 or latency_s < 0:
            raise ValueError(f"negative batch: images={images}, latency_s={latency_s}")
        with self._lock:
            self._images += images
            self._latencies_ms.append(round(latency_s * 1000.0, 3))
            self._flush_if_due()

    def failure(self, code: str) -> None:
        """Record one permanent failure with its error code (e.g. ``not-found``)."""
        if not code:
            raise ValueError("error code must not be empty")
        with self._lock:
            self._failures[code[:_DIMENSION_NAME_LIMIT]] += 1
            self._flush_if_due()

    def flush(self) -> None:
        """Write the pending aggregates now (nothing if nothing was recorded) and start afresh."""
        with self._lock:
            self._flush()

    def _flush_if_due(self) -> None:
        if self._clock() - self._started >= self._interval:
            self._flush()

    def _flush(self) -> None:
        now = self._clock()
        elapsed = max(now - self._started, 1e-9)
        timestamp_ms = int(now * 1000)
        lines: list[dict[str, Any]] = []
        if self._latencies_ms or self._images:
            latencies = self._latencies_ms
            first, rest = latencies[:MAX_VALUES_PER_METRIC], latencies[MAX_VALUES_PER_METRIC:]
            summary = self._document(
                timestamp_ms,
                self._dimensions,
                [
                    (METRIC_IMAGES, "Count", self._images),
                    (METRIC_IMAGES_PER_SECOND, "Count/Second", round(self._images / elapsed, 3)),
                    (METRIC_BATCH_LATENCY, "Milliseconds", first),
                ],
            )
            lines.append(summary)
            for start in range(0, len(rest), MAX_VALUES_PER_METRIC):
                chunk = rest[start : start + MAX_VALUES_PER_METRIC]
                lines.append(
                    self._document(
                        timestamp_ms,
                        self._dimensions,
                        [(METRIC_BATCH_LATENCY, "Milliseconds", chunk)],
                    )
                )
        for code, count in sorted(self._failures.items()):
            dimensions = {**self._dimensions, ERROR_CODE_DIMENSION: code}
            lines.append(
                self._document(timestamp_ms, dimensions, [(METRIC_FAILURES, "Count", count)])
            )
        for line in lines:
            self._stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        if lines:
            self._stream.flush()
        self._started = now
        self._images = 0
        self._latencies_ms = []
        self._failures = Counter()

    def _document(
        self,
        timestamp_ms: int,
        dimensions: Mapping[str, str],
        metrics: list[tuple[str, str, Any]],
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [
                    {
                        "Namespace": self._namespace,
                        "Dimensions": [list(dimensions)],
                        "Metrics": [{"Name": name, "Unit": unit} for name, unit, _ in metrics],
                    }
                ],
            }
        }
        doc.update(dimensions)
        for name, _, value in metrics:
            doc[name] = value
        return doc
