"""Many producer threads, one consumer: the parallel half of a backfill.

A backfill reads keys in parallel (the listings of several prefixes, the data files of an S3
Inventory) but sends from one thread, because :class:`bottleneck_tools.backfill.MessageSender`
and the counts of a run belong to the main thread, where Ctrl-C lands. :class:`FanIn` runs the
readers on a bounded thread pool and hands what they emit to the main thread through a bounded
queue: a reader that gets ahead of the sending waits, so memory stays flat.

A task may submit further tasks (a listing that discovers sub-prefixes). An error in a task ends
the run: it is raised in the consumer, in order after what the task emitted before it, so that
everything read before a failure is still sent. :meth:`FanIn.close` stops the readers: each
finishes the request it is making, then its next :meth:`FanIn.emit` raises :class:`Stopped`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["FanIn", "Stopped"]

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"
# How often a blocked emit looks for a stop: short enough for a prompt Ctrl-C.
_POLL_S = 0.05


class Stopped(Exception):
    """Raised in a task by :meth:`FanIn.emit` once the run is stopping; the task just ends."""


class FanIn(Generic[T]):
    """Tasks on ``workers`` threads emit items; :meth:`results` yields them in arrival order.

    At most ``backlog`` emitted items wait for the consumer. Submit the first tasks, then iterate
    :meth:`results` (which ends when every task, including those submitted by tasks, has ended),
    then :meth:`close`.
    """

    def __init__(self, workers: int, *, backlog: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=backlog)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # One count held by the consumer until it starts reading, so that the first task to end
        # cannot end the run while the initial tasks are still being submitted.
        self._pending = 1

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on a worker (from the consumer before :meth:`results`, or from a task)."""
        if self._stop.is_set():
            raise Stopped
        with self._lock:
            self._pending += 1
        self._executor.submit(self._run, task)

    def emit(self, item: T) -> None:
        """From a task: hand ``item`` to the consumer, waiting for room; :class:`Stopped` once
        the run is stopping."""
        self._put((_ITEM, item))

    def results(self) -> Iterator[T]:
        """The emitted items until every task has ended; a task's error is raised here."""
        self._finish_one()
        while True:
            kind, payload = self._queue.get()
            if kind == _ITEM:
                yield payload  # type: ignore[misc]  # only emit() puts items
            elif kind == _ERROR:
                assert isinstance(payload, BaseException)
                raise payload
            else:
                return

    def close(self) -> bool:
        """Stop the tasks and wait for the running ones; True if a Ctrl-C came meanwhile.

        Each running task finishes the request it is making (within its client's timeouts),
        then stops at its next emit; tasks not started yet never start.
        """
        self._stop.set()
        interrupted = False
        while True:
            try:
                self._executor.shutdown(wait=True, cancel_futures=True)
                return interrupted
            except KeyboardInterrupt:
                interrupted = True

    def _run(self, task: Callable[[], None]) -> None:
        try:
            task()
        except Stopped:
            pass
        except BaseException as exc:  # a KeyboardInterrupt raised in a task ends the run too
            self._put_quietly((_ERROR, exc))
        finally:
            self._finish_one()

    def _finish_one(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self._put_quietly((_DONE, None))

    def _put(self, entry: tuple[str, object]) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _put_quietly(self, entry: tuple[str, object]) -> None:
        # Once stopping, nobody reads the queue any more: what would be put is dropped.
        with contextlib.suppress(Stopped):
            self._put(entry)
