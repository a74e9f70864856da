"""Fire-and-forget thread pools for the per-image stages (fetch, decode in threads, write).

``concurrent.futures.ThreadPoolExecutor`` gives every task a ``Future`` (a Python ``Condition``
over an ``RLock``), a work item, and an idle semaphore taken and given back (Python too): about
25 Python calls around each task, for a result the stages never read (each stage resolves its
image itself) and an exception nobody would see. Here a task is a tuple on a C queue
(``queue.SimpleQueue``) and idle threads are counted under a C lock: on the 2-core development
machine, 16 threads fed by a paced producer, 8 µs of CPU per task where the executor took 17;
the fetch and write stages run one task per image each.

The lifecycle is the executor's. Threads start as work comes, up to the limit, and are reused
while idle. Like the executor's, a thread is a daemon when the thread whose ``submit`` started
it is one (in the consumer that is every stage's: the receivers and the inference thread submit,
and they are daemons, so the consumer's exit never waited for these pools and does not now);
otherwise the interpreter waits at exit for the tasks under way and those queued, and the idle
threads are told to stop there, by the hook ``concurrent.futures`` registers its own with.
``shutdown`` can drop the tasks not yet started; a pool dropped without ``shutdown`` stops its
threads too. A task that raises is logged with its traceback and the thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_Task = tuple[Callable[..., object], tuple[Any, ...]]


class _Crew:
    """What the threads share, kept apart from the pool so that dropping the pool stops them."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        # Guards what follows; submit decides under it whether to start a thread, so that no
        # thread starts once the crew is closed and every thread gets its stop.
        self.lock = threading.Lock()
        self.closed = False
        self.idle = 0
        self.threads: list[threading.Thread] = []

    def stop(self, *, drop_queued: bool = False) -> None:
        """Close, drop the tasks not started if asked (stops queued earlier stay), and queue one
        stop per thread behind what is left."""
        with self.lock:
            self.closed = True  # from here no task is queued and no thread starts
            count = len(self.threads)
        while drop_queued:
            try:
                count += self.tasks.get_nowait() is None
            except queue.Empty:
                break
        for _ in range(count):
            self.tasks.put(None)


# Every crew not yet collected, for the exit hook; a crew is collected once its pool and its
# threads are gone.
_crews: weakref.WeakSet[_Crew] = weakref.WeakSet()
_crews_lock = threading.Lock()
_exiting = False


def _stop_all_at_exit() -> None:
    global _exiting
    with _crews_lock:
        _exiting = True
        crews = list(_crews)
    for crew in crews:
        crew.stop()


# Runs in threading's shutdown before the non-daemon threads are joined, as the executor's does
# (atexit handlers run only after that join, which idle threads would never let end).
threading._register_atexit(_stop_all_at_exit)  # type: ignore[attr-defined]


def _serve(crew: _Crew) -> None:
    get = crew.tasks.get
    while True:
        task = get()
        if task is None:
            return
        function, args = task
        try:
            function(*args)
        except BaseException:
            name = getattr(function, "__qualname__", None) or repr(function)
            log.exception("a task raised", extra={"fields": {"task": name}})
        del task, function, args  # nothing of the last image kept while idle
        with crew.lock:
            crew.idle += 1


class TaskThreads:
    """Up to ``limit`` threads named ``<name>_<n>``, taking ``submit``'s calls in order."""

    def __init__(self, limit: int, name: str) -> None:
        if limit < 1:
            raise ValueError(f"a pool needs at least one thread, not {limit}")
        self.limit = limit
        self.name = name
        self._crew = crew = _Crew()
        with _crews_lock:
            crew.closed = _exiting
            _crews.add(crew)
        weakref.finalize(self, _Crew.stop, crew)

    def submit(self, function: Callable[..., object], *args: Any) -> None:
        """Queue ``function(*args)``; its result is dropped, an exception it raises logged."""
        crew = self._crew
        with crew.lock:
            if crew.closed:
                raise RuntimeError(f"the {self.name} threads are shut down")
            crew.tasks.put((function, args))
            if crew.idle:
                # A thread that finished a task takes this one next. (At the limit the count
                # runs ahead, as the executor's semaphore does; no thread can start then.)
                crew.idle -= 1
                return
            if len(crew.threads) >= self.limit:
                return
            thread = threading.Thread(
                target=_serve, args=(crew,), name=f"{self.name}_{len(crew.threads)}"
            )
            thread.start()  # counted once started: a thread that failed to start runs nothing
            crew.threads.append(thread)

    def shutdown(self, *, wait: bool, cancel_pending: bool = False) -> None:
        """No more tasks; ``cancel_pending`` drops those not started, ``wait`` joins the threads
        (after the tasks under way, and the queued ones unless dropped)."""
        crew = self._crew
        crew.stop(drop_queued=cancel_pending)
        if wait:
            with crew.lock:
                threads = list(crew.threads)
            for thread in threads:
                thread.join()

    @property
    def threads(self) -> int:
        """Threads started so far."""
        with self._crew.lock:
            return len(self._crew.threads)
