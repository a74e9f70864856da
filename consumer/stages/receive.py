"""Receive: long-poll SQS while there is room in flight, parse bodies into image tasks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bottleneck_contract.messages import MalformedMessage, parse_body
from consumer.errors import Failure, classify
from consumer.features import output_key
from consumer.inflight import InFlight
from consumer.sqs import BATCH, WorkQueue
from consumer.stats import Stats
from consumer.work import ImageTask, Message

log = logging.getLogger(__name__)

LONG_POLL_SECONDS = 20


def build_tasks(message: Message, output_prefix: str) -> None:
    """Fill ``message.images`` from its body, or mark it malformed (a permanent failure)."""
    try:
        refs = parse_body(message.body)
    except MalformedMessage as exc:
        message.malformed = Failure("bad-message", str(exc), permanent=True)
        return
    message.images = [ImageTask(message=message, ref=ref) for ref in refs]


class Receiver(threading.Thread):
    """One long-polling loop; several run side by side to hide SQS latency."""

    def __init__(
        self,
        name: str,
        *,
        work_queue: WorkQueue,
        inflight: InFlight,
        dispatch: Callable[[ImageTask], None],
        output_prefix: str,
        visibility: int,
        wait_seconds: int,
        stats: Stats,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.work_queue = work_queue
        self.inflight = inflight
        self.dispatch = dispatch
        self.output_prefix = output_prefix
        self.visibility = visibility
        self.wait_seconds = wait_seconds
        self.stats = stats
        self.stop_event = stop
        self.last_message_at = time.monotonic()
        self.last_poll_empty = False
        # Whether a poll has found the queue empty since the last message (see _poll).
        self.found_empty = False
        self.errors = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            room = self.inflight.reserve(BATCH, timeout=0.5)
            if room <= 0:
                continue
            if self.stop_event.is_set():
                # Slots freed by the stop's own releases: receiving now would take messages
                # this worker will never process (hidden until their visibility runs out).
                self.inflight.unreserve(room)
                break
            try:
                self._poll(room)
            finally:
                # Registered messages now count as images; the reservation is no longer needed.
                self.inflight.unreserve(room)

    def _poll(self, room: int) -> None:
        try:
            messages = self.work_queue.receive(
                room, wait_seconds=self.wait_seconds, visibility=self.visibility
            )
            self.errors = 0
        except Exception as exc:
            self.errors += 1
            delay = min(30.0, 0.5 * 2 ** min(self.errors, 6))
            log.warning(
                "receive failed; backing off",
                exc_info=exc,
                extra={"fields": {"retry_in_s": delay}},
            )
            if not self.found_empty:
                # A failed receive says nothing about the queue being empty: until a poll has
                # found it empty, the idle clock starts again only once the backoff is over
                # (hence a time in the future), or --idle-exit would take an unreachable or
                # throttling SQS for an empty queue and exit with the work still there.
                self.last_message_at = max(self.last_message_at, time.monotonic() + delay)
            self.stop_event.wait(delay)
            return
        self.last_poll_empty = not messages
        if not messages:
            self.found_empty = True
            return
        self.last_message_at = time.monotonic()
        self.found_empty = False
        # Every message taken off the queue counts, those handed straight back below included:
        # the exit summary must account for each message whose receive count this worker raised.
        self.stats.add("messages", len(messages))
        if self.stop_event.is_set():
            # Received while stopping: hand them straight back rather than hold them.
            self.work_queue.change_visibility(messages, 0)
            self.stats.add("messages_released", len(messages))
            return
        for message in messages:
            self._accept(message)
        if log.isEnabledFor(logging.DEBUG):
            # What the worker holds once this receive is registered: the state tests wait on.
            held, total = len(self.inflight.held()), self.stats.counts["messages"]
            log.debug(
                "received",
                extra={"fields": {"messages": len(messages), "held": held, "total": total}},
            )

    def _accept(self, message: Message) -> None:
        build_tasks(message, self.output_prefix)
        if not self.inflight.register(message):
            return  # the worker is stopping: it was released at once
        for task in message.images:
            try:
                task.output_key = output_key(self.output_prefix, task.ref.key)
            except Exception as exc:
                self.inflight.failed(task, classify(exc))
                continue
            self.dispatch(task)
