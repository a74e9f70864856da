"""The decode pool of the compute-path measurement: threads, or spawned processes.

Kept apart from :mod:`benchmarks.throughput` so that a spawned decode process imports only what
decoding needs (the consumer's :class:`~consumer.preprocess.ImagePreparer`), not boto3 or moto.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

from consumer.decode import DecodeLimits
from consumer.heap import keep_freed_memory
from consumer.preprocess import ImagePreparer, InputSpec

_PREPARER: ImagePreparer | None = None


def _init_child(spec: InputSpec, limits: DecodeLimits, draft: bool) -> None:
    global _PREPARER
    keep_freed_memory()  # as the consumer's decode processes do
    _PREPARER = ImagePreparer(spec, limits, draft=draft)


def _decode_in_child(data: bytes) -> np.ndarray:
    assert _PREPARER is not None, "decode process not initialised"
    return _PREPARER(data)


class DecodePool:
    """``submit(bytes) -> Future[uint8 HWC]`` on ``workers`` threads or processes."""

    def __init__(self, kind: str, workers: int, preparer: Any) -> None:
        self.kind = kind
        self.workers = workers
        self.preparer = preparer
        self.executor: Executor
        if kind == "threads":
            self.executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        elif kind == "processes":
            if not isinstance(preparer, ImagePreparer):
                raise ValueError("a process decode pool needs the Pillow preparer")
            # spawn, not fork: forking a process whose torch thread pools are running is unsafe.
            self.executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_child,
                initargs=(preparer.spec, preparer.limits, preparer.draft_size is not None),
            )
        else:
            raise ValueError(f"decode pool kind must be threads or processes, got {kind!r}")

    def submit(self, data: bytes) -> Future[Any]:
        if self.kind == "threads":
            return self.executor.submit(self.preparer, data)
        return self.executor.submit(_decode_in_child, data)

    def warm_up(self, sample: bytes) -> None:
        """Start every worker (process start-up and imports stay out of the timing)."""
        for future in [self.submit(sample) for _ in range(2 * self.workers)]:
            future.result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
