"""Ack: carry out settlement actions in SQS batches of 10, and retry them without waiting.

Each action is a short chain of steps: a delete; a release; or a dead-letter send, then the
delete. The send comes first and the delete only once every letter is sent, so a failure is
always recorded before its message leaves the work queue. A step that fails in a way that may
pass (a whole call throttled or reset, an entry that came back ``Failed`` on SQS's side) gets a
due time, now plus :func:`bottleneck_contract.retry.backoff`, and is tried again then, one call
per try; meanwhile every other action goes on: no acker thread ever sleeps on a failure.
A dead-letter send that failed for some of its letters sends only those again.

Up to ``concurrency`` calls are under way at once (:data:`ACK_CALLS` in the worker): one call
carries at most 10 messages and takes tens of milliseconds on SQS, so one call at a time would
cap a worker at 10 / latency, 300-500 messages a second, under what one GPU computes. Batches are
still gathered full (or for the flush time) by the one thread, which makes the call itself while
no other full batch waits behind it (the call's wait is then when the next batch gathers, and at
low rates nothing changes from one thread: no hand-off, no batch split to keep threads busy);
only with a full batch already waiting does it hand the call to one of ``concurrency - 1`` helper
threads and gather on. A round that raises (a bug: the calls' failures are results) lets go of
the messages it had not finished, so that the acker still becomes idle and the worker can stop.

When an action's tries run out (:data:`ACK_BACKOFF`), or SQS rejects a step for good, the message
is let go: forgotten here, logged and counted (``messages_abandoned``). It stays on the work
queue and SQS delivers it again once its visibility runs out; the work is idempotent. A receipt
handle that has gone stale means another worker has the message now: forgotten, counted
(``messages_stale``), nothing retried.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from bottleneck_contract.retry import Backoff, Rand
from consumer.inflight import InFlight
from consumer.settle import Action, DeadLetter, Verdict
from consumer.sqs import BATCH, Tried, WorkQueue
from consumer.stats import Stats
from consumer.work import Message

log = logging.getLogger(__name__)

# How long a partial batch of deletes waits for more: full batches of 10 halve the SQS calls
# per image, and a few hundred milliseconds later is still far inside any visibility timeout.
_FLUSH_SECONDS = 0.3
# The longest the thread waits for new actions before it looks at its due retries again.
_POLL_SECONDS = 0.1
# Five tries per action, the waits under 0.5, 1, 2 and 4 s: under 7.5 s in all, inside the 10 s
# the worker gives the acker to finish on a stop. The message stays held meanwhile (the
# heartbeat keeps it invisible), so waiting costs nothing but the wait.
ACK_BACKOFF = Backoff(attempts=5, base=0.5, cap=8.0)
_WAIT_FOR_REDELIVERY_S = 60
# SQS calls in flight at once in a worker: 16 x 10 messages per call of 20-40 ms is 4,000-8,000
# messages a second, above what one GPU computes (see the module docstring). Helpers beyond the
# acker's own thread run only while full batches wait, so a slow worker never pays for them.
ACK_CALLS = 16


class Step(Enum):
    DEAD_LETTER = "dead-letter"
    DELETE = "delete"
    RELEASE = "release"


@dataclass(eq=False)
class Pending:
    """An action on its way: the step it is at, its failed tries so far, and when it is due."""

    action: Action
    step: Step
    letters: tuple[DeadLetter, ...] = ()  # dead letters not yet sent
    failures: int = 0
    due: float = 0.0
    # Out of its round: finished, or waiting on the heap for its next try.
    out: bool = False

    @property
    def message(self) -> Message:
        return self.action.message


class Acker(threading.Thread):
    """Consumes :class:`~consumer.settle.Action` objects until stopped and drained.

    ``clock`` and ``rand`` are the monotonic clock and the jitter; tests pass fakes and drive
    rounds with :meth:`tick`, without the thread.
    """

    def __init__(
        self,
        *,
        work_queue: WorkQueue,
        inflight: InFlight,
        stats: Stats,
        backoff: Backoff = ACK_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        rand: Rand = random.random,
        concurrency: int = 1,
        nothing_coming: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(name="ack", daemon=True)
        # While receiving waits for what is held to be done with (a suspect's solo run, serial
        # receives: consumer.quarantine), no batch can fill: what is gathered goes at once.
        self.nothing_coming = nothing_coming
        self.work_queue = work_queue
        self.inflight = inflight
        self.stats = stats
        self.backoff = backoff
        self.clock = clock
        self.rand = rand
        self.concurrency = concurrency
        # Rounds for the helpers (started by run()); with helpers, the heap and redelivery_due
        # are shared with them, under the lock.
        self._handed: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # An action counts as a task of this queue from put() until it is finished (done, or let
        # go), its waits for retries included: unfinished_tasks is what idle() reports.
        self.actions: queue.Queue[Action] = queue.Queue()
        # Actions waiting for their next try: a heap of (due, sequence, pending).
        self.waiting: list[tuple[float, int, Pending]] = []
        self._sequence = itertools.count()
        # When the last message released with a short delay becomes visible again: until then
        # the queue is not really idle, and --idle-exit must not leave its retry to a cold start.
        # Longer delays (repeated failures) are left to the scaler: idling a GPU costs more.
        self.redelivery_due = 0.0
        self._halt = threading.Event()

    def put(self, action: Action) -> None:
        self.actions.put(action)

    def stop(self) -> None:
        self._halt.set()

    def idle(self) -> bool:
        """No action queued, under way or waiting for a retry."""
        return self.actions.unfinished_tasks == 0

    def run(self) -> None:
        # Daemon threads, not a ThreadPoolExecutor: its workers are joined at interpreter exit,
        # queued calls and all, and an SQS call that hangs must not hold up the process's exit.
        helpers = [
            threading.Thread(target=self._help, name=f"ack_{i}", daemon=True)
            for i in range(self.concurrency - 1)
        ]
        for helper in helpers:
            helper.start()
        try:
            while not (self._halt.is_set() and self.idle()):
                fresh = self._gather()
                now = self.clock()
                ready = self._ready(fresh, now)
                if not ready:
                    continue
                if not helpers or self.actions.qsize() < BATCH:
                    self._guarded_round(ready, now)
                else:  # a full batch waits behind this one: a helper makes this call
                    self._handed.put(ready)
        finally:
            for _ in helpers:
                self._handed.put(None)

    def _help(self) -> None:
        while (ready := self._handed.get()) is not None:
            # The clock when the round starts, as for the thread's own rounds.
            self._guarded_round(ready, self.clock())

    def tick(self, now: float | None = None) -> None:
        """One round without any wait, in the calling thread: every action queued now, and the
        retries due at ``now``."""
        fresh: list[Action] = []
        while True:
            try:
                fresh.append(self.actions.get_nowait())
            except queue.Empty:
                break
        self._carry_out(fresh, now)

    def _gather(self) -> list[Action]:
        """New actions: a batch, or what came within the flush time; never past a due retry."""
        now = self.clock()
        with self._lock:
            next_due = self.waiting[0][0] if self.waiting else math.inf
        try:
            batch = [self.actions.get(timeout=max(0.0, min(_POLL_SECONDS, next_due - now)))]
        except queue.Empty:
            return []
        flush = 0.0 if self.nothing_coming() else _FLUSH_SECONDS
        deadline = min(self.clock() + flush, max(next_due, self.clock()))
        while len(batch) < BATCH:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            try:
                batch.append(self.actions.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    # --- one round ---------------------------------------------------------------------------
    def _carry_out(self, fresh: Iterable[Action], now: float | None = None) -> None:
        """Start the ``fresh`` actions and carry out every step due at ``now``: one round, in
        the calling thread."""
        now = self.clock() if now is None else now
        self._round(self._ready(fresh, now), now)

    def _ready(self, fresh: Iterable[Action], now: float) -> list[Pending]:
        """The ``fresh`` actions started, and the waiting steps due at ``now``, taken off the
        heap: what one round carries out."""
        ready = [pending for action in fresh if (pending := self._start(action)) is not None]
        with self._lock:
            while self.waiting and self.waiting[0][0] <= now:
                pending = heapq.heappop(self.waiting)[2]
                pending.out = False
                ready.append(pending)
        return ready

    def _guarded_round(self, ready: list[Pending], now: float) -> None:
        try:
            self._round(ready, now)
        except Exception as exc:
            # The calls' own failures are results (Tried), so this is a bug. Its messages are
            # let go (SQS delivers them again; the work is idempotent) rather than left
            # unfinished: the acker would never be idle again, and the worker never stop.
            log.exception("ack round failed")
            for pending in ready:
                if not pending.out:
                    self._let_go(pending, f"was in a round that failed: {exc!r}")

    def _round(self, ready: list[Pending], now: float) -> None:
        """Carry out ``ready``'s steps in order: dead-letter sends, then deletes (those whose
        sends just went through included), then releases. A failed step is scheduled again;
        nothing here waits."""
        deletes = [p for p in ready if p.step is Step.DELETE]
        for pending in (p for p in ready if p.step is Step.DEAD_LETTER):
            if self._send_dead_letters(pending, now):
                pending.step = Step.DELETE
                deletes.append(pending)
        if deletes:
            self._delete_batch(deletes, now)
        releases: dict[int, list[Pending]] = {}
        for pending in (p for p in ready if p.step is Step.RELEASE):
            releases.setdefault(pending.action.delay, []).append(pending)
        for delay, group in releases.items():
            self._release_batch(group, delay, now)

    def _start(self, action: Action) -> Pending | None:
        verdict = action.verdict
        if verdict is Verdict.DROP:
            self.stats.add("messages_dropped")
            self._finish(action.message)
            return None
        if verdict is Verdict.DEAD_LETTER:
            return Pending(action, Step.DEAD_LETTER, letters=action.dead_letters)
        if verdict is Verdict.RELEASE:
            return Pending(action, Step.RELEASE)
        return Pending(action, Step.DELETE)

    def _send_dead_letters(self, pending: Pending, now: float) -> bool:
        """Send what is left of ``pending``'s letters; whether all of them are sent now."""
        tried = self.work_queue.try_dead_letter(pending.message, pending.letters)
        self.stats.add("dead_lettered", len(tried.done))
        if tried.rejected:
            self._let_go(pending, f"the dead-letter queue refused it: {tried.error}")
            return False
        if tried.retry:
            pending.letters = tuple(tried.retry)
            self._failed(pending, now, tried.error)
            return False
        return True

    def _delete_batch(self, group: list[Pending], now: float) -> None:
        tried = self.work_queue.try_delete([p.message for p in group])
        self._settle(group, tried, now, done="messages_deleted")

    def _release_batch(self, group: list[Pending], delay: int, now: float) -> None:
        tried = self.work_queue.try_change_visibility([p.message for p in group], delay)
        if tried.done and delay <= _WAIT_FOR_REDELIVERY_S:
            with self._lock:
                self.redelivery_due = max(self.redelivery_due, now + delay + 1.0)
        self._settle(group, tried, now, done="messages_released")

    def _settle(self, group: list[Pending], tried: Tried[Message], now: float, done: str) -> None:
        by_message = {id(p.message): p for p in group}
        self.stats.add(done, len(tried.done))
        for message in tried.done:
            by_message[id(message)].out = True
            self._finish(message)
        for message in tried.stale:
            by_message[id(message)].out = True
            log.info(
                f"{by_message[id(message)].step.value}: receipt handle no longer valid "
                "(redelivered elsewhere)",
                extra={"fields": {"message_id": message.message_id}},
            )
            self.stats.add("messages_stale")
            self._finish(message)
        for message in tried.rejected:
            self._let_go(by_message[id(message)], f"SQS refused it: {tried.error}")
        for message in tried.retry:
            self._failed(by_message[id(message)], now, tried.error)

    def _failed(self, pending: Pending, now: float, error: str) -> None:
        """Schedule ``pending``'s step again after a backoff, or let it go when out of tries."""
        pending.failures += 1
        if pending.failures >= self.backoff.attempts:
            self._let_go(pending, f"failed {pending.failures} times: {error}")
            return
        wait = self.backoff.delay(pending.failures - 1, self.rand)
        pending.due = now + wait
        pending.out = True
        with self._lock:
            heapq.heappush(self.waiting, (pending.due, next(self._sequence), pending))
        log.warning(
            f"{pending.step.value} failed; will retry",
            extra={
                "fields": {
                    "message_id": pending.message.message_id,
                    "error": error,
                    "retry_in_s": round(wait, 3),
                }
            },
        )

    def _let_go(self, pending: Pending, why: str) -> None:
        pending.out = True
        log.error(
            f"{pending.step.value} {why}; the message is left for SQS to redeliver",
            extra={"fields": {"message_id": pending.message.message_id}},
        )
        self.stats.add("messages_abandoned")
        self._finish(pending.message)

    def _finish(self, message: Message) -> None:
        self.inflight.forget(message)
        self.actions.task_done()
