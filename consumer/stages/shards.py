"""Shards (``--layout shards``): many images' features in one ``.npy``, committed by its index.

One PutObject per feature file costs $5.00 per million images, far more than the GPU once the
consumer is fed, and S3 throttles a prefix past about 3,500 PUT/s. A shard is two PUTs for up to
``--shard-rows`` images: the rows, then the index that names each row's image (the commit marker;
the format is :mod:`bottleneck_contract.shards`).

Each image's features are copied into the shard being filled (one preallocated array) and its
image stays unresolved, its message held and kept invisible by the heartbeat, until the shard is
durably written: only then are its images resolved (``sharded``) and the messages whose images
are all resolved deleted. A flush that fails resolves its images as transient failures, so their
messages are released and computed again later, never deleted. A shard is written when it is
full, when its first row is ``--shard-max-seconds`` old, on every stop before anything is
released (:meth:`ShardWriter.close`), and, while the worker is stopping or receiving carefully
after a start or a redelivery (see :mod:`consumer.quarantine`, which waits for held messages to
settle), as soon as nothing else is on its way to it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bottleneck_contract.shards import (
    INDEX_CONTENT_TYPE,
    ROWS,
    ShardKey,
    ShardRow,
    encode_index,
    shard_keys,
)
from consumer.errors import Failure, TransientError, classify
from consumer.features import FeatureSettings, metadata, serialise
from consumer.inflight import InFlight
from consumer.objects import ConditionFailed, ObjectClient
from consumer.stats import Stats
from consumer.storage import CONTENT_TYPE
from consumer.work import ImageTask

log = logging.getLogger(__name__)

# The most one shard's array may take: with --pool none a row is a whole feature map (400 KB for
# resnet50), and 10,000 of them would be 4 GB held twice (one shard filling, one being written).
SHARD_MAX_BYTES = 256 << 20
# How often the age and the "nothing else is coming" conditions are looked at.
TICK_SECONDS = 0.05
# A shard whose .npy key is taken (only a writer-name collision can do that) is written under
# the next sequence number; this many tries.
_NAME_TRIES = 3
_SOURCE_KEYS = ("source-bucket", "source-key", "source-etag", "source-sha256")


def writer_name() -> str:
    """A name no other consumer process uses: ``<host>-<pid>-<10 hex random>``.

    The host and pid say where a shard came from; the random part is what makes it unique
    (containers often share a pid, and sometimes a hostname)."""
    host = socket.gethostname().split(".", 1)[0]
    host = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in host)[:32]
    return f"{host.strip('-') or 'host'}-{os.getpid()}-{secrets.token_hex(5)}"


@dataclass(eq=False)
class _Shard:
    """A shard being filled or written: its rows so far and the tasks they belong to."""

    seq: int
    array: np.ndarray | None  # (capacity, *row shape); None once written
    started: float
    tasks: list[ImageTask] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.tasks)


class ShardWriter:
    """The write stage for ``--layout shards``: the inference thread's sink, a ticker thread,
    and a small pool that writes sealed shards.

    ``track`` is told of every image sent down the pipeline, so that the writer knows when the
    shard being filled holds everything there is (``drained``); ``flush_partial()`` says when a
    drained partial shard should be written at once (the worker stopping, or the quarantine
    waiting for held messages to settle). ``clock`` is the monotonic clock; tests pass a fake one
    and call :meth:`tick` without the thread.
    """

    def __init__(
        self,
        *,
        objects: ObjectClient,
        inflight: InFlight,
        stats: Stats,
        settings: FeatureSettings,
        fingerprint: str,
        feature_shape: tuple[int, ...],
        output_bucket: str,
        output_prefix: str,
        shard_rows: int,
        max_seconds: float,
        writer: str,
        flush_partial: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        flushers: int = 2,
    ) -> None:
        self.objects = objects
        self.inflight = inflight
        self.stats = stats
        self.fingerprint = fingerprint
        self.bucket = output_bucket
        self.prefix = output_prefix
        self.writer = writer
        self.max_seconds = max_seconds
        self.flush_partial = flush_partial
        self.clock = clock
        self.dtype = np.dtype(settings.dtype)
        self.row_shape = tuple(feature_shape)
        row_bytes = max(1, math.prod(self.row_shape) * self.dtype.itemsize)
        self.capacity = max(1, min(shard_rows, SHARD_MAX_BYTES // row_bytes))
        if self.capacity < shard_rows:
            log.warning(
                "shards capped by size",
                extra={
                    "fields": {
                        "shard_rows": shard_rows,
                        "rows_per_shard": self.capacity,
                        "max_bytes": SHARD_MAX_BYTES,
                    }
                },
            )
        # The settings part of every shard's metadata (the per-image keys dropped).
        base = metadata(
            source_bucket="",
            source_key="",
            source_etag="",
            settings=settings,
            fingerprint=fingerprint,
            shape=self.row_shape,
        )
        self._metadata = {k: v for k, v in base.items() if k not in _SOURCE_KEYS}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._current: _Shard | None = None
        self._seq = 0
        self._writing = 0  # shards sealed and not yet written (or failed)
        self._closed = False
        # Images sent down the pipeline and not yet here, by id: when none is left (once the
        # resolved ones are pruned), the shard being filled holds everything there is.
        self._upstream: dict[int, ImageTask] = {}
        self._pruned_at = float("-inf")  # the last tick that pruned it (see tick)
        self._pool = ThreadPoolExecutor(flushers, thread_name_prefix="shard")
        self._halt = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="shard-tick", daemon=True)
        self.shards_written = 0
        self.rows_written = 0
        self.flushes_failed = 0

    # --- the pipeline's side -----------------------------------------------------------------
    def track(self, task: ImageTask) -> None:
        """``task`` is on its way (fetch, decode, model); it will reach :meth:`submit` or fail."""
        with self._lock:
            self._upstream[id(task)] = task

    def submit(self, task: ImageTask) -> None:
        """Append ``task``'s features to the shard being filled; called by the inference thread."""
        if task.message.lost:
            self._untrack(task)
            self.inflight.done(task, "dropped")
            return
        sealed = None
        try:
            assert task.features is not None
            with self._lock:
                self._upstream.pop(id(task), None)
                if self._closed:
                    return  # stopping: its message is released with the rest unfinished
                shard = self._current or self._open()
                assert shard.array is not None
                # The cast to the feature dtype, exactly as a per-image file's serialiser does.
                shard.array[shard.rows] = task.features
                shard.tasks.append(task)
                if shard.rows == len(shard.array):
                    sealed, self._current = shard, None
                    self._writing += 1
        except Exception as exc:
            failure = classify(exc)
            self.stats.image_failed(failure.error_code, permanent=failure.permanent)
            self.inflight.failed(task, failure)
            return
        task.features = None
        if sealed is not None:
            self._start_flush(sealed, "full")

    def _untrack(self, task: ImageTask) -> None:
        with self._lock:
            self._upstream.pop(id(task), None)

    def _open(self) -> _Shard:
        """A new shard; the caller holds the lock. ``np.empty`` takes pages as rows fill them."""
        shard = _Shard(
            seq=self._next_seq(),
            array=np.empty((self.capacity, *self.row_shape), self.dtype),
            started=self.clock(),
        )
        self._current = shard
        return shard

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    # --- when to write -------------------------------------------------------------------------
    def start(self) -> None:
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._halt.wait(TICK_SECONDS):
            try:
                self.tick()
            except Exception as exc:  # the next tick tries again; a stop still closes
                log.warning("shard tick failed", exc_info=exc)

    def tick(self, now: float | None = None) -> None:
        """Seal and write the shard being filled if it is old enough, or if it holds everything
        there is and ``flush_partial()`` asks for it."""
        partial = self.flush_partial()
        now = self.clock() if now is None else now
        with self._lock:
            # Whether everything is drained matters only for a partial flush: the walk over
            # the images in flight is made then, and otherwise once a second to prune the
            # failed ones, not twenty times a second (a cost per second that a slow stream of
            # images paid per image).
            drained = False
            if partial or now - self._pruned_at >= 1.0:
                drained = self._drained()
                self._pruned_at = now
            shard = self._current
            if shard is None or self._closed:
                return
            if now - shard.started >= self.max_seconds:
                why = "age"
            elif partial and drained:
                why = "drained"
            else:
                return
            self._current = None
            self._writing += 1
        self._start_flush(shard, why)

    def _drained(self) -> bool:
        """Whether no tracked image is still on its way; the caller holds the lock."""
        gone = [
            key
            for key, task in self._upstream.items()
            if task.outcome is not None
            or task.failure is not None
            or task.message.lost
            or task.message.settled
        ]
        for key in gone:
            del self._upstream[key]
        return not self._upstream

    def drained(self) -> bool:
        """No image on its way to the shard being filled (failed or resolved ones aside)."""
        with self._lock:
            return self._drained()

    def holds_all(self) -> bool:
        """Whether every image this writer was sent is in a shard not yet written: what the
        worker then holds waits only for a flush (its idle exit may go ahead and write it)."""
        with self._lock:
            return self._drained() and (self._current is not None or self._writing > 0)

    def waits_for_age(self) -> bool:
        """Whether every image this writer was sent is in the shard being filled and nothing is
        being written: what the worker holds then waits for the shard's age (up to
        --shard-max-seconds), not for progress (consumer.stall). A write under way is work."""
        with self._lock:
            return self._drained() and self._current is not None and self._writing == 0

    def close(self, timeout: float) -> bool:
        """Write the shard being filled and wait up to ``timeout`` for every shard being
        written; rows that arrive later are not taken (their messages are released). Returns
        whether every shard was written (or failed) in time."""
        with self._lock:
            if self._closed:
                return self._writing == 0
            self._closed = True
            shard, self._current = self._current, None
            if shard is not None:
                self._writing += 1
        if shard is not None:
            self._start_flush(shard, "stop")
        self._halt.set()
        done = self.wait_written(timeout)
        self._pool.shutdown(wait=False)
        log.info(
            "shards closed",
            extra={
                "fields": {
                    "shards_written": self.shards_written,
                    "rows_written": self.rows_written,
                    "flushes_failed": self.flushes_failed,
                    "all_written": done,
                }
            },
        )
        return done

    def wait_written(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until no sealed shard is being written; whether none is."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(remaining)
            return self._writing == 0

    # --- the write -----------------------------------------------------------------------------
    def _start_flush(self, shard: _Shard, why: str) -> None:
        """Hand a sealed shard (counted in ``_writing``) to the pool."""
        try:
            self._pool.submit(self._flush, shard, why)
        except RuntimeError as exc:  # the pool is shut: a stop whose close timed out
            self._failed(shard, why, exc)
            self._written()

    def _flush(self, shard: _Shard, why: str) -> None:
        started = time.monotonic()
        rows = shard.rows
        try:
            assert shard.array is not None
            keys = self._write(shard, shard.array[:rows])
        except Exception as exc:
            self._failed(shard, why, exc)
        else:
            log.info(
                "shard written",
                extra={
                    "fields": {
                        "key": keys.index_key,
                        "rows": rows,
                        "why": why,
                        "seconds": round(time.monotonic() - started, 3),
                    }
                },
            )
            with self._lock:
                self.shards_written += 1
                self.rows_written += rows
            self.stats.add("shards_written")
            for task in shard.tasks:
                self.stats.image_done("sharded")
                self.inflight.done(task, "sharded")
        finally:
            shard.array = None
            self._written()

    def _failed(self, shard: _Shard, why: str, exc: BaseException) -> None:
        """Resolve a shard's images as transient failures: their messages are released."""
        seen = classify(exc)
        # Never permanent: the images are not at fault, whatever S3 said about the shard.
        failure = Failure(seen.error_code, f"shard not written: {seen.detail}", permanent=False)
        log.warning(
            "shard not written; its images' messages are released",
            extra={"fields": {"rows": shard.rows, "error_code": seen.error_code, "why": why}},
        )
        with self._lock:
            self.flushes_failed += 1
        for task in shard.tasks:
            self.stats.image_failed(seen.error_code, permanent=False)
            self.inflight.failed(task, failure)

    def _written(self) -> None:
        with self._idle:
            self._writing -= 1
            self._idle.notify_all()

    def _write(self, shard: _Shard, array: np.ndarray) -> ShardKey:
        """The two create-only PUTs: the rows, then the index that commits them."""
        body = serialise(array, self.dtype.name)
        meta = {**self._metadata, ROWS: str(len(array))}
        keys = shard_keys(self.prefix, self.fingerprint, self.writer, shard.seq)
        for _ in range(_NAME_TRIES):
            try:
                self.objects.put(
                    self.bucket, keys.npy_key, body, metadata=meta, content_type=CONTENT_TYPE
                )
                break
            except ConditionFailed:
                # Not ours to commit: the object there may hold other rows. Another name.
                log.warning(
                    "shard name taken; trying the next", extra={"fields": {"key": keys.npy_key}}
                )
                with self._lock:
                    shard.seq = self._next_seq()
                keys = shard_keys(self.prefix, self.fingerprint, self.writer, shard.seq)
        else:
            raise TransientError("shard-conflict", f"shard names taken up to {keys.npy_key}")
        index = encode_index(
            ShardRow(
                row=row,
                bucket=task.ref.bucket,
                key=task.ref.key,
                etag=task.source_etag,
                fingerprint=self.fingerprint,
                source_sha256=task.content_sha256,
            )
            for row, task in enumerate(shard.tasks)
        )
        try:
            self.objects.put(
                self.bucket, keys.index_key, index, metadata=meta, content_type=INDEX_CONTENT_TYPE
            )
        except ConditionFailed:
            # Only a retried PUT of our own index can find it there, but that cannot be told
            # from a collision: computing the rows again costs less than committing others'.
            raise TransientError("shard-conflict", f"{keys.index_key} exists") from None
        return keys
