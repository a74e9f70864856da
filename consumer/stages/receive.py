"""Receive: long-poll SQS while there is room in flight, parse bodies into image tasks."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from bottleneck_contract.messages import MalformedMessage, parse_body
from bottleneck_contract.retry import backoff
from consumer.errors import Failure, classify
from consumer.features import output_key
from consumer.inflight import InFlight
from consumer.quarantine import Quarantine, is_suspect
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
        receiving_stopped: threading.Event,
        quarantine: Quarantine | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.work_queue = work_queue
        self.inflight = inflight
        self.dispatch = dispatch
        self.output_prefix = output_prefix
        self.visibility = visibility
        self.wait_seconds = wait_seconds
        self.stats = stats
        self.receiving_stopped = receiving_stopped
        self.quarantine = quarantine
        # When the current run of empty receives began (the poll's start), or None while this
        # receiver is busy: it got messages, it waits for room under the in-flight cap, or it
        # has not yet found the queue empty. --idle-exit counts from here, never from the last
        # message: a receiver held back by a full cap is working, not idle.
        self.empty_since: float | None = None
        # Waiting for room that only other receivers' polls have reserved (nothing is held):
        # such a receiver has nothing to say about the queue, and must not hold an idle exit
        # back. Counting it as busy did: with three receivers and a cap of 6, one receiver
        # reserved all 6 slots for each empty poll while the other two waited for room
        # forever, and the worker never exited.
        self.standing_by = False
        self.errors = 0

    def idle_for(self, now: float) -> float:
        """Seconds in which every receive of this receiver came back empty (0 when busy,
        infinite while it stands by for room that other receivers' polls reserved)."""
        if self.standing_by:
            return math.inf
        since = self.empty_since
        return 0.0 if since is None else max(0.0, now - since)

    def run(self) -> None:
        while not self.receiving_stopped.is_set():
            if self.quarantine is not None and self.quarantine.solo_active:
                # A suspect is running alone: nothing new may join it in flight.
                self.empty_since = None
                self.receiving_stopped.wait(0.05)
                continue
            room = self.inflight.reserve(BATCH, timeout=0.5)
            if room <= 0:
                if self.inflight.empty():
                    self.standing_by = True  # the room is reserved by other receivers' polls
                else:
                    self.standing_by = False
                    self.empty_since = None  # waiting for room: the worker is full of work
                continue
            if self.receiving_stopped.is_set():
                # Slots freed by the stop's own releases: receiving now would take messages
                # this worker will never process (hidden until their visibility runs out).
                self.inflight.unreserve(room)
                break
            try:
                if self.quarantine is None:
                    self.standing_by = False
                    self._poll(room)
                else:
                    # Waiting for a careful turn changes nothing: a receiver that stood by
                    # stands by until it has one (the waits are most of its time while another
                    # polls; counted as busy, they kept an idle worker with eight receivers
                    # from ever seeing all of them idle at once).
                    with self.quarantine.polling(self.inflight.held) as turn:
                        # Without a turn this receiver stands by: the one polling speaks for
                        # the queue, and held work holds the idle exit back by itself.
                        self.standing_by = not turn
                        if turn:
                            if self.empty_since is None:
                                # A first turn continues the empty polls other receivers made
                                # before it, one at a time (None when they poll in parallel).
                                self.empty_since = self.quarantine.empty_run()
                            self._poll(room)
                    if not turn:
                        self.receiving_stopped.wait(0.01)
            finally:
                # Registered messages now count as images; the reservation is no longer needed.
                self.inflight.unreserve(room)

    def _poll(self, room: int) -> None:
        started = time.monotonic()
        try:
            size = room if self.quarantine is None else self.quarantine.receive_size(room)
            messages = self.work_queue.receive(
                size, wait_seconds=self.wait_seconds, visibility=self.visibility
            )
            self.errors = 0
        except Exception as exc:
            self.errors += 1
            delay = backoff(self.errors, base=0.5, cap=30.0)
            log.warning(
                "receive failed; backing off",
                exc_info=exc,
                extra={"fields": {"retry_in_s": delay}},
            )
            # A failed receive says nothing about the queue being empty: it leaves the idle
            # clock as it was (running only if an earlier poll found the queue empty), or
            # --idle-exit would take an unreachable or throttling SQS for an empty queue.
            self.receiving_stopped.wait(delay)
            return
        if self.quarantine is not None:
            self.quarantine.polled(started, len(messages))
        if not messages:
            if self.empty_since is None:
                self.empty_since = started
            return
        self.empty_since = None
        # Every message taken off the queue counts, those handed straight back below included:
        # the exit summary must account for each message whose receive count this worker raised.
        self.stats.add("messages", len(messages))
        if self.receiving_stopped.is_set():
            # Received while stopping: hand them straight back rather than hold them.
            self.work_queue.change_visibility(messages, 0)
            self.stats.add("messages_released", len(messages))
            return
        if self.quarantine is None:
            for message in messages:
                self._accept(message)
        else:
            for message in messages:
                message.vouched = (
                    message.receive_count > 1
                    and self.quarantine.may_vouch(message)
                    and self.inflight.vouches_for(message)
                )
            self.quarantine.saw(messages)
            suspects = [m for m in messages if is_suspect(m)]
            for message in messages:
                if not is_suspect(message):
                    self._accept(message)
            for message in suspects:
                self._run_alone(message, self.quarantine)
        if log.isEnabledFor(logging.DEBUG):
            # What the worker holds once this receive is registered: the state tests wait on.
            held, total = len(self.inflight.held()), self.stats.counts["messages"]
            log.debug(
                "received",
                extra={"fields": {"messages": len(messages), "held": held, "total": total}},
            )

    def _run_alone(self, message: Message, quarantine: Quarantine) -> None:
        """A suspect (see :mod:`consumer.quarantine`): dead-lettered as ``crashed`` if consumers
        died while it ran alone (twice, or once by its last receive), else run with nothing else
        in flight, behind a marker that counts those deaths."""
        with quarantine.solo():
            self._quarantined(message, quarantine)

    def _quarantined(self, message: Message, quarantine: Quarantine) -> None:
        try:
            deaths = quarantine.deaths_alone(message)
        except Exception as exc:  # cannot tell: run it alone, which is always safe
            log.warning("quarantine marker check failed", exc_info=exc)
            deaths = 0
        if quarantine.convicted(message, deaths):
            log.warning(
                "a message that crashed the consumer alone: dead-lettered",
                extra={"fields": {"message_id": message.message_id, "deaths_alone": deaths}},
            )
            message.images = []
            message.malformed = Failure(
                "crashed", quarantine.crashed_detail(message, deaths), permanent=True
            )
            self.inflight.register(message)  # no images: settles (dead-letter) at once
            # Nothing else is received (this is a solo turn) until the acker has sent the dead
            # letter and deleted the message: a poison image received meanwhile could kill the
            # consumer in between, and the message would come back without its marker, to run
            # again, or at its last receive reach the dead-letter queue a second time, without
            # a reason.
            while self.inflight.holds(message) and not self.receiving_stopped.wait(0.01):
                pass
            quarantine.unmark(message)
            return
        build_tasks(message, self.output_prefix)
        if not self.inflight.register(message):
            return  # the worker is stopping: it was released at once
        # Registered (the heartbeat keeps it invisible) but not dispatched until its turn
        # comes and nothing else is in flight but suspects waiting for theirs.
        with quarantine.waiting(message):
            if not quarantine.take_turn(self.receiving_stopped):
                return  # stopping: the stop releases it with the rest of what is unsettled
        try:
            while not quarantine.only_suspects_waiting(self.inflight.held(), message):
                if self.receiving_stopped.wait(0.02):
                    return
            try:
                quarantine.mark_running(message, deaths)
            except Exception as exc:  # run it all the same: alone is what counts
                log.warning("could not write a quarantine marker", exc_info=exc)
            log.info(
                "running a redelivered message alone",
                extra={
                    "fields": {
                        "message_id": message.message_id,
                        "receive_count": message.receive_count,
                        "deaths_alone": deaths,
                        # Which images: what an operator (or a test) looks for in the logs.
                        "keys": [task.ref.key for task in message.images[:5]],
                    }
                },
            )
            self._dispatch(message)
            # Until it is settled, or the worker stops (the stop then releases it): either
            # way the marker goes, since only a consumer that died leaves it behind, or one
            # that stalled on it (consumer.stall).
            while not message.settled and not self.receiving_stopped.wait(0.02):
                pass
            if message.settled or not quarantine.keep_markers:
                quarantine.unmark(message)
        finally:
            quarantine.end_turn()

    def _accept(self, message: Message) -> None:
        build_tasks(message, self.output_prefix)
        if not self.inflight.register(message):
            return  # the worker is stopping: it was released at once
        self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        for task in message.images:
            try:
                task.output_key = output_key(self.output_prefix, task.ref.key)
            except Exception as exc:
                self.inflight.failed(task, classify(exc))
                continue
            self.dispatch(task)
