"""The stall watch: a consumer that holds work and makes no progress lets it go and exits.

A GPU can hang (an Xid error, a driver deadlock, a decoder stuck on one file), and so can a
bug. The heartbeat would then keep every held message invisible, up to SQS's 12 hours, while
the Batch job runs on (its default attempt timeout is 4 hours) doing nothing at GPU prices.
Progress is any image settled (written, skipped, failed) or any batch computed. When unsettled
work has been held for ``--stall-timeout`` seconds (default 15 minutes, 0: never) without any,
the worker logs every thread's stack, stops as on SIGTERM but without the grace period (its
messages go back to the queue at once) and exits 3, so that the scaler starts a fresh job for
them. A suspect that was running alone keeps its quarantine marker, so a message that stalls
the consumer alone is convicted as ``crashed`` the way one that kills it is (see
:mod:`consumer.quarantine`).

The clock starts when work is first held after an idle spell, so a worker idle for an hour
does not stall on the first message it receives. Forward passes, the slowest step, last
seconds even on a CPU; 15 minutes without one image settled is no slow model.
"""

from __future__ import annotations

import sys
import threading
import traceback

EXIT_STALLED = 3
# Below this, legitimate waits can outlast the timeout: S3 calls with their retries (about 3 x
# 65 s at worst), a decode process's 120 s limit. Shorter values are allowed (tests), with a
# warning at start.
STALL_TIMEOUT_FLOOR = 300.0


class StallWatch:
    """Tells, from periodic looks, when held work has seen no progress for ``timeout`` s."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._progress = -1
        self._since: float | None = None  # when the current spell without progress began

    def stalled(self, *, busy: bool, progress: int, now: float) -> bool:
        """``busy``: unsettled work is held; ``progress``: a count that grows with progress.
        ``True`` once ``busy`` has lasted ``timeout`` seconds with ``progress`` unchanged."""
        if not busy or progress != self._progress or self._since is None:
            self._progress = progress
            self._since = now if busy else None
            return False
        return now - self._since >= self.timeout


def thread_stacks() -> dict[str, str]:
    """Every thread's stack, by "name (ident)", for one structured log record (a plain dump to
    stderr would break the JSON lines of the log)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return {
        f"{names.get(ident, '?')} ({ident})": "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    }
