"""Batch and infer: collect micro-batches from the decoded queue and run them on the device.

A batch closes when it reaches the current batch size or ``max_wait`` after its first image.
The next batch is collected while the device runs the previous one (its results are read only
after the next batch is submitted). A CUDA out-of-memory error halves the batch and retries the
halves, down to one image; the smaller size is kept for a while before growing again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from consumer.batch_queue import BatchQueue
from consumer.errors import TransientError, classify
from consumer.gpu_decode import GpuBatchDecoder
from consumer.inflight import InFlight
from consumer.model import Backbone, PendingFeatures
from consumer.stats import Stats
from consumer.work import ImageTask

log = logging.getLogger(__name__)

# Batches that must succeed at a reduced size before the size is doubled again.
_GROW_AFTER = 50


def collect(
    source: BatchQueue[ImageTask],
    max_items: int,
    max_wait: float,
    halted: threading.Event,
    receiving_stopped: threading.Event | None = None,
    nothing_coming: Callable[[], bool] | None = None,
    first_wait: float = 0.05,
) -> list[ImageTask]:
    """Up to ``max_items`` tasks: wait ``first_wait`` for the first, then at most ``max_wait``
    for more.

    Returns an empty list when nothing arrives within ``first_wait``, so that the caller can
    finish the batch already on the device instead of holding it until more work comes. Once
    ``receiving_stopped`` is set, or ``nothing_coming()`` says so (receiving waits for what is
    held to settle: a suspect runs alone, or receives are serial), or the worker is halted, it
    takes only what is already there, so the graceful stop's grace period goes to computing, not
    waiting. Whoever sets one of these wakes ``source``.
    """

    def closing() -> bool:
        return (
            halted.is_set()
            or (receiving_stopped is not None and receiving_stopped.is_set())
            or (nothing_coming is not None and nothing_coming())
        )

    return source.take(max_items, max_wait, 0.0 if halted.is_set() else first_wait, closing)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Inference(threading.Thread):
    """The one thread that owns the device."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        source: BatchQueue[ImageTask],
        sink: Callable[[ImageTask], None],
        inflight: InFlight,
        stats: Stats,
        batch_size: int,
        max_wait: float,
        halted: threading.Event,
        receiving_stopped: threading.Event | None = None,
        nothing_coming: Callable[[], bool] | None = None,
        batch_decoder: GpuBatchDecoder | None = None,
    ) -> None:
        super().__init__(name="infer", daemon=True)
        self.backbone = backbone
        self.source = source
        self.sink = sink
        self.inflight = inflight
        self.stats = stats
        self.batch_size = batch_size
        self.current_size = batch_size
        self.max_wait = max_wait
        self.halted = halted
        self.receiving_stopped = receiving_stopped
        self.nothing_coming = nothing_coming
        self.batch_decoder = batch_decoder
        self._good_batches = 0

    def run(self) -> None:
        previous: tuple[list[ImageTask], PendingFeatures, float] | None = None
        while not self.halted.is_set():
            batch = collect(
                self.source,
                self.current_size,
                self.max_wait,
                self.halted,
                self.receiving_stopped,
                self.nothing_coming,
                # With a batch on the device, finish it soon if nothing comes; with none, the
                # wait can be long, as every reason to stop it wakes the queue.
                first_wait=0.05 if previous is not None else 1.0,
            )
            if not batch:
                if previous is not None:
                    self._finish(*previous)
                    previous = None
                continue
            submitted = self._submit(batch)
            if previous is not None:
                self._finish(*previous)
            previous = submitted
        if previous is not None and not self.halted.is_set():
            self._finish(*previous)

    def _submit(
        self, batch: list[ImageTask]
    ) -> tuple[list[ImageTask], PendingFeatures, float] | None:
        """Start ``batch`` on the device; OOM splits it (finishing the parts synchronously)."""
        started = time.monotonic()
        try:
            if self.batch_decoder is not None:
                batch, pixels = self._decode_on_device(batch)
                if not batch:
                    return None
            else:
                pixels = self.backbone.stack(
                    [task.pixels for task in batch if task.pixels is not None]
                )
            pending = self.backbone.submit(pixels)
        except Exception as exc:
            if not is_out_of_memory(exc):
                self._fail(batch, exc)
                return None
            self._out_of_memory(batch)
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch submitted", extra={"fields": {"images": len(batch)}})
        # The time the inference thread was busy on this batch, not the wall time to its
        # result: with one batch in flight behind another, the latter counts the other's work.
        return batch, pending, time.monotonic() - started

    def _decode_on_device(self, batch: list[ImageTask]) -> tuple[list[ImageTask], torch.Tensor]:
        """``--decode cuda``: the batch's bytes to device pixels; an image that cannot be
        decoded fails alone with its own code, and the rest go on as a smaller batch."""
        assert self.batch_decoder is not None
        decoded = self.batch_decoder.decode([task.data or b"" for task in batch])
        for index, failure in decoded.failures.items():
            task = batch[index]
            task.drop_data()
            self.stats.image_failed(failure.error_code, permanent=failure.permanent)
            self.inflight.failed(task, failure)
        kept = [batch[index] for index in decoded.indices]
        return kept, decoded.nhwc

    def _out_of_memory(self, batch: list[ImageTask]) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            self._fail(batch, TransientError("out-of-memory", "one image does not fit the device"))
            return
        half = len(batch) // 2
        self.current_size = max(1, min(self.current_size, half))
        self._good_batches = 0
        log.warning(
            "device out of memory; halving the batch",
            extra={"fields": {"batch": len(batch), "new_batch_size": self.current_size}},
        )
        for part in (batch[:half], batch[half:]):
            submitted = self._submit(part)
            if submitted is not None:
                self._finish(*submitted)

    def _finish(self, batch: list[ImageTask], pending: PendingFeatures, busy: float) -> None:
        waited = time.monotonic()
        try:
            features = pending.result()
        except Exception as exc:
            self._fail(batch, exc)
            return
        self.stats.batch(len(batch), busy + time.monotonic() - waited)
        for task, row in zip(batch, features, strict=True):
            task.features = row
            task.pixels = None
            task.drop_data()  # --decode cuda kept the bytes until the batch was done
            self.sink(task)
        self._grow()

    def _grow(self) -> None:
        if self.current_size >= self.batch_size:
            return
        self._good_batches += 1
        if self._good_batches >= _GROW_AFTER:
            self.current_size = min(self.batch_size, self.current_size * 2)
            self._good_batches = 0

    def _fail(self, batch: list[ImageTask], exc: BaseException) -> None:
        failure = classify(exc)
        log.error("batch failed", exc_info=exc, extra={"fields": {"batch": len(batch)}})
        for task in batch:
            self.stats.image_failed(failure.error_code, permanent=failure.permanent)
            self.inflight.failed(task, failure)
