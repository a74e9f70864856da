"""A bound on the encoded image bytes a worker holds at once, whatever the images' sizes.

The in-flight cap counts images, and the threads and queues between S3 and the decoder bound
*how many* images hold their encoded bytes: the fetch threads (128), and, where images leave the
fetch thread undecoded, the decode queue (``--decode-isolation threads``) or the batches of
``--decode cuda``, which keep their bytes until the batch's features are back (an out-of-memory
halving decodes them again). Only ``--max-image-bytes`` (64 MiB) bounds each one's size, so a
corpus of large scans could hold 128 x 64 MiB = 8 GiB on the default path, and 20-28 GiB on the
other two: more than the job's memory, and the OOM killer would then bring back every message the
consumer held, each with its receive count raised.

So each fetch takes its image's size from one shared budget before its GET (the size the
message names, as S3 events and listings do) and gives it back when the bytes are dropped:
decoded, or the image resolved. A message without a size (or with a wrong one) takes the
object's size once its GET's headers are in, with :meth:`ByteBudget.try_take`; where that does not
fit, the body is left unread and the fetch waits with :meth:`ByteBudget.take` before sending the
GET again (see :mod:`consumer.stages.load`), so what waits has never been downloaded. A take
waits while the budget is spent, first come first served, so a large image is not starved by a
stream of small ones; one image larger than the whole budget still goes through once nothing
else is held. ``--max-encoded-bytes`` sets the budget (default 4 GiB: four batches of 64 images
of 16 MB, as many as the ``--decode cuda`` pipeline holds: two queued, one being decoded or
computed, one whose features are on their way); typical photos never reach it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

log = logging.getLogger(__name__)


class ByteBudget:
    """Bytes taken and given back by many threads; :meth:`take` waits in arrival order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 byte, not {capacity}")
        self.capacity = capacity
        self._held = 0
        self._closed = False
        self._lock = threading.Lock()
        # Waiting takers, first come first served, each on its own condition of the one lock:
        # only the head of the line can go on, so only the head is woken (by a give, or by the
        # one before it leaving). One condition for all woke every waiter on every give: with
        # the 128 fetch threads waiting, 1.8 to 2.6 ms of CPU per give, in as many wake-ups each
        # taking the lock and the GIL, for one image to go on.
        self._line: deque[threading.Condition] = deque()
        self._waited = False

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def take(self, size: int) -> bool:
        """Wait until ``size`` bytes fit (or nothing is held), then hold them. ``False``, holding
        nothing, once the budget is closed."""
        with self._lock:
            if self._closed:
                return False
            if not self._line and self._fits(size):  # the common case: no wait, no ticket
                self._held += size
                return True
            if not self._waited:
                self._waited = True
                log.info(
                    "the encoded images held reached their budget; fetches now wait for decodes",
                    extra={"fields": {"budget_mib": self.capacity >> 20, "held": self._held}},
                )
            ticket = threading.Condition(self._lock)
            self._line.append(ticket)
            try:
                while not self._closed and not (self._line[0] is ticket and self._fits(size)):
                    ticket.wait()
                if self._closed:
                    return False
                self._held += size
                return True
            finally:
                self._line.remove(ticket)
                # The next in line may fit too (several small images after a large one left).
                self._wake_head()

    def try_take(self, size: int) -> bool:
        """Hold ``size`` bytes only if they fit now with no one waiting (the line keeps its
        order); ``False``, holding nothing, otherwise or once closed."""
        with self._lock:
            if self._closed or self._line or not self._fits(size):
                return False
            self._held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self._held -= size
            self._wake_head()

    def close(self) -> None:
        """Wake every waiting taker with ``False``; later takes return ``False`` too."""
        with self._lock:
            self._closed = True
            for ticket in self._line:
                ticket.notify()

    def _wake_head(self) -> None:
        # Called holding the lock.
        if self._line:
            self._line[0].notify()

    def _fits(self, size: int) -> bool:
        return self._held == 0 or self._held + size <= self.capacity
