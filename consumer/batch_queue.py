"""The hand-off from the decoders to the inference thread, woken once per batch, not per image.

A ``queue.Queue`` wakes its reader on every ``put``, and a reader that must also notice a stop
while it waits out ``--max-wait-ms`` has to wake on a timer as well: the inference thread then
took the GIL for every image and twenty times a second besides, costs that a busy GPU spreads over
thousands of images a second but a slow stream (or a long ``--max-wait-ms``) charges to each one.
Here the reader says how many images it waits for, and only the ``put`` that brings that many
wakes it; whoever changes a reason to stop waiting (a stop, a suspect about to run alone) sets
that reason first and then calls :meth:`BatchQueue.wake`, which is what makes timers
unnecessary. The queue is bounded: a full one blocks the decoders, which is how a slow model
pushes back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    """A bounded FIFO read a batch at a time by one reader."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the reader waits here
        self._room = threading.Condition(self._lock)  # writers of a full queue wait here
        self._wanted = 0  # items the waiting reader needs; 0 when it is not waiting

    def put(self, item: T, timeout: float) -> bool:
        """Append ``item``, waiting up to ``timeout`` seconds for room; ``False`` if none came."""
        with self._lock:
            if len(self._items) >= self.maxsize:
                deadline = time.monotonic() + timeout
                while len(self._items) >= self.maxsize:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._room.wait(remaining)
            self._items.append(item)
            if self._wanted and len(self._items) >= self._wanted:
                self._ready.notify()
            return True

    def wake(self) -> None:
        """Make the reader look at its reasons to stop waiting again (set them before calling)."""
        with self._lock:
            self._ready.notify_all()

    def take(
        self,
        max_items: int,
        max_wait: float,
        first_wait: float,
        closing: Callable[[], bool] = lambda: False,
    ) -> list[T]:
        """Up to ``max_items``: wait ``first_wait`` for the first (none: ``[]``), then up to
        ``max_wait`` after it for the rest, unless ``closing()`` says no more will come soon, in
        which case it takes what is there. ``closing`` is called with the queue's lock held:
        it must not call back into the queue."""
        with self._lock:
            if not self._items:
                self._wait_for(1, time.monotonic() + first_wait, closing, first=True)
                if not self._items:
                    return []
            deadline = time.monotonic() + max_wait
            if len(self._items) < max_items and not closing():
                self._wait_for(max_items, deadline, closing, first=False)
            count = min(max_items, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
            self._room.notify(count)
            return batch

    def _wait_for(
        self, count: int, deadline: float, closing: Callable[[], bool], first: bool
    ) -> None:
        """Wait (lock held) until ``count`` items are queued, the deadline, a wake-up after
        which ``closing()`` holds, or, waiting for the first item, any wake-up."""
        self._wanted = count
        try:
            while len(self._items) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                notified = self._ready.wait(remaining)
                if notified and len(self._items) < count and (first or closing()):
                    return
        finally:
            self._wanted = 0
