"""Heartbeat: keep every held message invisible until it is settled.

Messages whose visibility runs out within half a timeout are extended, 10 per call. A receipt
handle SQS no longer accepts means another worker has the message: it is marked lost, and this
worker neither writes its features nor deletes it. Nothing is held past SQS's 12-hour limit.
"""

from __future__ import annotations

import logging
import threading
import time

from consumer.inflight import InFlight
from consumer.sqs import MAX_HOLD_SECONDS, WorkQueue
from consumer.work import Message

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, *, work_queue: WorkQueue, inflight: InFlight, visibility: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.work_queue = work_queue
        self.inflight = inflight
        self.visibility = visibility
        self.interval = max(0.2, min(10.0, visibility / 4))
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:
                log.warning("visibility heartbeat failed; will retry", exc_info=exc)

    def beat(self) -> None:
        """Extend every held message that would become visible within half a timeout."""
        now = time.monotonic()
        due = [
            m
            for m in self.inflight.held()
            if not m.lost and m.visible_until - now < self.visibility / 2
        ]
        by_extension: dict[int, list[Message]] = {}
        for message in due:
            left_to_hold = MAX_HOLD_SECONDS - (now - message.received_at)
            extension = int(min(self.visibility, left_to_hold))
            if extension <= 0:
                continue  # at SQS's 12-hour limit: it becomes visible and someone retries it
            by_extension.setdefault(extension, []).append(message)
        for extension, messages in by_extension.items():
            stale = self.work_queue.change_visibility(messages, extension)
            for message in messages:
                message.visible_until = now + extension
            for message in stale:
                if message.settled:
                    # Its fate is decided and with the acker, whose delete most likely reached
                    # SQS between this beat's look at what is held and its call (the receipt
                    # handle of a deleted message is invalid): nothing is lost. A handle that
                    # really went stale fails the acker's own call, which deals with it.
                    log.debug(
                        "a settled message's receipt handle is no longer valid",
                        extra={"fields": {"message_id": message.message_id}},
                    )
                    continue
                message.lost = True
                log.warning(
                    "lost a message to a stale receipt handle; leaving it to its new holder",
                    extra={"fields": {"message_id": message.message_id}},
                )
