"""Ack: carry out settlement actions in SQS batches of 10.

Dead-letter sends happen before the deletes of the same messages, so a failure is always
recorded before its message leaves the work queue. Failed calls are retried a few times; after
that the message is let go, and SQS redelivers it (the work is idempotent).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

from consumer.inflight import InFlight
from consumer.settle import Action, Verdict
from consumer.sqs import BATCH, WorkQueue
from consumer.stats import Stats
from consumer.work import Message

log = logging.getLogger(__name__)

# How long a partial batch of deletes waits for more: full batches of 10 halve the SQS calls
# per image, and a few hundred milliseconds later is still far inside any visibility timeout.
_FLUSH_SECONDS = 0.3
_ATTEMPTS = 5
_WAIT_FOR_REDELIVERY_S = 60


class Acker(threading.Thread):
    """Consumes :class:`~consumer.settle.Action` objects until stopped and drained."""

    def __init__(self, *, work_queue: WorkQueue, inflight: InFlight, stats: Stats) -> None:
        super().__init__(name="ack", daemon=True)
        self.work_queue = work_queue
        self.inflight = inflight
        self.stats = stats
        self.actions: queue.Queue[tuple[Action, int]] = queue.Queue()
        # When the last message released with a short delay becomes visible again: until then
        # the queue is not really idle, and --idle-exit must not leave its retry to a cold start.
        # Longer delays (repeated failures) are left to the scaler: idling a GPU costs more.
        self.redelivery_due = 0.0
        self._halt = threading.Event()

    def put(self, action: Action) -> None:
        self.actions.put((action, 0))

    def stop(self) -> None:
        self._halt.set()

    def idle(self) -> bool:
        return self.actions.unfinished_tasks == 0

    def run(self) -> None:
        while not (self._halt.is_set() and self.actions.unfinished_tasks == 0):
            batch = self._gather()
            if batch:
                self._carry_out(batch)
                for _ in batch:
                    self.actions.task_done()

    def _gather(self) -> list[tuple[Action, int]]:
        try:
            batch = [self.actions.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + _FLUSH_SECONDS
        while len(batch) < BATCH and time.monotonic() < deadline:
            try:
                batch.append(self.actions.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _carry_out(self, batch: list[tuple[Action, int]]) -> None:
        deletes: list[tuple[Action, int]] = []
        releases: dict[int, list[tuple[Action, int]]] = defaultdict(list)
        for action, attempt in batch:
            if action.verdict is Verdict.DROP:
                self.stats.add("messages_dropped")
                self.inflight.forget(action.message)
            elif action.verdict is Verdict.RELEASE:
                releases[action.delay].append((action, attempt))
                if action.delay <= _WAIT_FOR_REDELIVERY_S:
                    due = time.monotonic() + action.delay + 1.0
                    self.redelivery_due = max(self.redelivery_due, due)
            elif action.verdict is Verdict.DEAD_LETTER:
                try:
                    self.work_queue.dead_letter(action.message, action.dead_letters)
                    self.stats.add("dead_lettered", len(action.dead_letters))
                    deletes.append((action, attempt))
                except Exception as exc:
                    self._retry([(action, attempt)], "dead-letter", exc)
            else:
                deletes.append((action, attempt))
        if deletes:
            self._run("delete", deletes, lambda ms: self.work_queue.delete(ms))
        for delay, group in releases.items():
            self._run(
                "release", group, lambda ms, d=delay: self.work_queue.change_visibility(ms, d)
            )

    def _run(self, what: str, group: list[tuple[Action, int]], call: object) -> None:
        messages = [action.message for action, _ in group]
        try:
            stale = call(messages)  # type: ignore[operator]
        except Exception as exc:
            self._retry(group, what, exc)
            return
        for message in stale:
            log.info(
                f"{what}: receipt handle no longer valid (redelivered elsewhere)",
                extra={"fields": {"message_id": message.message_id}},
            )
        self.stats.add(
            f"messages_{what}d" if what.endswith("e") else f"messages_{what}", len(messages)
        )
        for message in messages:
            self._forget(message)

    def _retry(self, group: list[tuple[Action, int]], what: str, exc: BaseException) -> None:
        for action, attempt in group:
            if attempt + 1 >= _ATTEMPTS:
                log.error(
                    f"{what} kept failing; the message is left for SQS to redeliver",
                    exc_info=exc,
                    extra={"fields": {"message_id": action.message.message_id}},
                )
                self._forget(action.message)
            else:
                log.warning(f"{what} failed; will retry", exc_info=exc)
                time.sleep(min(2.0, 0.2 * 2**attempt))
                self.actions.put((action, attempt + 1))

    def _forget(self, message: Message) -> None:
        self.inflight.forget(message)
