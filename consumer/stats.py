"""Counters for the exit summary and the periodic progress line (thread-safe)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Protocol


class MetricsSink(Protocol):
    """Where batch and failure events also go (the EMF emitter in AWS; nothing locally)."""

    def batch(self, images: int, latency_s: float) -> None: ...

    def failure(self, code: str) -> None: ...

    def flush(self) -> None: ...


class Stats:
    """What the worker did: messages, images by outcome, failures by error code, batches."""

    def __init__(self, metrics: MetricsSink | None = None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.retried: Counter[str] = Counter()
        self.model_seconds = 0.0
        self.first_image_at: float | None = None
        self.last_image_at: float | None = None
        # Grows with every image settled and every batch computed (consumer.stall).
        self.progress = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def image_done(self, outcome: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[f"images_{outcome}"] += 1
            self.progress += 1
            self.first_image_at = self.first_image_at or now
            self.last_image_at = now

    def image_failed(self, code: str, *, permanent: bool) -> None:
        with self._lock:
            (self.failed if permanent else self.retried)[code] += 1
            self.progress += 1
        if self.metrics is not None:
            self.metrics.failure(code)

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["batch_images"] += size
            self.progress += 1
            self.model_seconds += seconds
        if self.metrics is not None:
            self.metrics.batch(size, seconds)

    def summary(self) -> dict[str, Any]:
        """Images done, skipped, failed by code, images/s (over the whole run)."""
        with self._lock:
            elapsed = max(1e-9, time.monotonic() - self.started)
            computed = self.counts["batch_images"]
            # Images whose features now exist because of this run: written, replaced, copied
            # (--dedupe content) or committed in a shard (--layout shards).
            done = sum(
                self.counts[f"images_{outcome}"]
                for outcome in ("written", "replaced", "copied", "sharded")
            )
            return {
                "messages": self.counts["messages"],
                "images_written": self.counts["images_written"],
                "images_replaced": self.counts["images_replaced"],
                "images_copied": self.counts["images_copied"],
                "images_sharded": self.counts["images_sharded"],
                "images_source_gone": self.counts["images_source-gone"],
                "images_skipped": self.counts["images_exists"] + self.counts["images_superseded"],
                "images_failed": sum(self.failed.values()),
                "failed_by_code": dict(self.failed),
                "retried_by_code": dict(self.retried),
                "images_computed": computed,
                "batches": self.counts["batches"],
                "mean_batch": round(computed / self.counts["batches"], 2)
                if self.counts["batches"]
                else 0,
                "seconds": round(elapsed, 3),
                "images_per_second": round(done / elapsed, 2),
                "model_images_per_second": round(computed / self.model_seconds, 2)
                if self.model_seconds
                else 0,
            }
