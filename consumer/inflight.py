"""What the worker holds: the cap on images in flight and the hand-off to settlement.

Every received message is registered here with its images; stages resolve images one by one.
When the last image of a message is resolved, :func:`consumer.settle.decide` picks the action and
the message goes to the acker. The cap is what bounds memory: receivers only ask SQS for more
when there is room, so a slow stage pushes back all the way to the queue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from consumer.errors import Failure
from consumer.quarantine import is_suspect
from consumer.settle import Action, Verdict, decide
from consumer.work import ImageTask, Message

# Messages released here (a transient failure) remembered so that their return is not taken for
# a crash's: about 200 bytes each, so about 10 MB at most. The oldest are forgotten first; a
# forgotten one comes back as a suspect, as every redelivery did before.
RELEASES_REMEMBERED = 50_000
# Transient failures that say nothing about the image's safety: the consumer itself may be in
# danger (a MemoryError in this process is the out-of-memory killer's next victim; an exception
# nobody expected), so such a release is not remembered and its return stays a suspect.
UNSAFE_FAILURES = frozenset({"out-of-memory", "internal"})


class InFlight:
    """Thread-safe registry of held messages with an image-count cap."""

    def __init__(self, limit: int, on_settle: Callable[[Action], None]) -> None:
        self.limit = limit
        self._on_settle = on_settle
        self._cond = threading.Condition()
        self._messages: dict[str, Message] = {}
        self._images = 0
        self._reserved = 0  # slots granted to receives still in progress
        # What each receiver waiting in reserve() needs: a resolved image wakes them only when
        # one of them can go on, not on every image (each wake-up takes the GIL, per receiver).
        self._needs: list[int] = []
        # Message id -> its receive count when this worker released it (see vouches_for).
        self._released: OrderedDict[str, int] = OrderedDict()
        self.stopping = False

    # --- admission -------------------------------------------------------------------------
    def room(self) -> int:
        with self._cond:
            return self._free()

    def _free(self) -> int:
        """Slots neither held nor reserved; the caller holds the lock."""
        return max(0, self.limit - self._images - self._reserved)

    def reserve(self, wanted: int, timeout: float) -> int:
        """Wait up to ``timeout`` for ``wanted`` free slots, then reserve what is free (possibly
        fewer, possibly none) and return how many, so that concurrent receivers never ask SQS
        for the same free slots. Give them back with :meth:`unreserve` once the received
        messages are registered.

        Waiting for a full ``wanted`` (a receive's 10), not any one slot, keeps receives full
        while work flows: each SQS call costs about as much CPU as a decode, so trickling one
        message per call near the cap would cost more than it gains. Taking the partial room
        once the wait is over is what keeps a cap that is not a multiple of 10 from stalling:
        with 48 slots and a batch of 48, holding 40 and waiting for 10 more would leave the
        batch short until ``--max-wait-ms`` flushed it, every batch."""
        deadline = time.monotonic() + timeout
        need = max(1, min(wanted, self.limit))
        with self._cond:
            self._needs.append(need)
            try:
                while self._free() < need and not self.stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                self._needs.remove(need)
            granted = min(wanted, self._free())
            self._reserved += granted
            return granted

    def unreserve(self, count: int) -> None:
        with self._cond:
            self._reserved -= count
            self._cond.notify_all()

    def register(self, message: Message) -> bool:
        """Start holding ``message``; a message with no images settles at once.

        Returns ``False`` when the worker is already stopping (a receive that was under way when
        the stop came): the message is then settled at once (its unfinished images released with
        visibility 0) and the caller must not dispatch its images."""
        with self._cond:
            # SQS can deliver a message again to this same worker while an older copy is still
            # held (its visibility ran out: a heartbeat failed, or SQS said its handle went
            # stale). Only the newest receipt handle counts, so the older copy is dropped: it
            # is neither written nor deleted, and its unfinished images give their slots back
            # now (its tasks resolve into nothing later, as it is no longer registered).
            # Without this the older copy's slots leaked for good, shrinking the cap.
            previous = self._messages.get(message.message_id)
            superseded = previous is not None and previous is not message and not previous.settled
            if previous is not None and previous is not message:
                previous.lost = True
                self._images -= previous.pending
                previous.pending = 0
                previous.settled = True
            self._messages[message.message_id] = message
            message.pending = len(message.images)
            self._images += message.pending
            stopping = self.stopping
            if stopping:
                message.settled = True
        if superseded:
            assert previous is not None
            self._on_settle(decide(previous))  # lost: dropped (counted as such by the acker)
        if stopping:
            self._on_settle(decide(message, stopping=True))
            return False
        if message.pending == 0:
            self._settle(message)
        return True

    # --- resolution ------------------------------------------------------------------------
    def done(self, task: ImageTask, outcome: str) -> None:
        task.outcome = outcome
        self._resolve(task)

    def failed(self, task: ImageTask, failure: Failure) -> None:
        task.failure = failure
        self._resolve(task)

    def _resolve(self, task: ImageTask) -> None:
        task.drop_data()  # whatever path it took, its encoded bytes are no longer needed
        message = task.message
        with self._cond:
            if self._messages.get(message.message_id) is not message:
                return  # already forgotten (released on stop): its slots were freed then
            message.pending -= 1
            self._images -= 1
            settle_now = message.pending == 0 and not message.settled
            message.settled = message.settled or settle_now
            if self._needs and self._free() >= min(self._needs):
                self._cond.notify_all()
        if settle_now:
            self._settle(message)

    def _settle(self, message: Message) -> None:
        message.settled = True
        action = decide(message, stopping=self.stopping)
        if self._harmless_release(action):
            with self._cond:
                self._released[message.message_id] = message.receive_count
                self._released.move_to_end(message.message_id)
                if len(self._released) > RELEASES_REMEMBERED:
                    self._released.popitem(last=False)
        self._on_settle(action)

    def _harmless_release(self, action: Action) -> bool:
        """A release decided for ``action.message`` after external trouble (throttling, 5xx,
        a conflict), while it ran with others: its return need not run alone."""
        message = action.message
        return (
            action.verdict is Verdict.RELEASE
            and not self.stopping
            and not is_suspect(message)
            and not any(
                task.failure is not None and task.failure.error_code in UNSAFE_FAILURES
                for task in message.images
            )
        )

    def forget(self, message: Message) -> None:
        """The acker finished with ``message`` (deleted, dead-lettered, released or dropped)."""
        with self._cond:
            if self._messages.get(message.message_id) is message:
                del self._messages[message.message_id]
                self._images -= message.pending  # images a stop left unfinished
                message.pending = 0
            self._cond.notify_all()

    # --- views -----------------------------------------------------------------------------
    def vouches_for(self, message: Message) -> bool:
        """Whether this worker can tell that no consumer died with ``message`` since its last
        receive: it holds the copy received just before (SQS delivered it twice, or that copy's
        visibility ran out here), or it decided to release that copy after an external transient
        failure (throttling, a 5xx; not out-of-memory, nor an unexpected exception); that copy
        ran with others (not a suspect), and nobody received the message in between (its
        receive count is one more: this relies on ``ApproximateReceiveCount`` counting every
        receive). The redelivery is then no crash survivor. Whether it may skip its solo run
        near ``maxReceiveCount`` is the quarantine's call (:meth:`Quarantine.may_vouch`).

        Without this, every duplicate SQS delivers, every copy whose visibility ran out here and
        every message released after throttling made the receivers careful and serial for
        ``CAREFUL_STREAK`` messages, each computed in a batch of its own: a throttling burst
        slowed the recovery from it to one message at a time."""
        with self._cond:
            previous = self._messages.get(message.message_id)
            released_at = self._released.get(message.message_id)
        if previous is not None and previous is not message:
            return not is_suspect(previous) and message.receive_count == previous.receive_count + 1
        return released_at is not None and message.receive_count == released_at + 1

    def holds(self, message: Message) -> bool:
        """Whether ``message`` is still held: registered, and the acker not done with it."""
        with self._cond:
            return self._messages.get(message.message_id) is message

    def held(self) -> list[Message]:
        with self._cond:
            return list(self._messages.values())

    def images(self) -> int:
        with self._cond:
            return self._images

    def empty(self) -> bool:
        with self._cond:
            return not self._messages

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    def release_unfinished(self) -> None:
        """On stop: settle every message not yet settled; unfinished ones are released at once."""
        with self._cond:
            self.stopping = True
            unsettled = [m for m in self._messages.values() if not m.settled]
            for message in unsettled:
                message.settled = True
            self._cond.notify_all()
        for message in unsettled:
            self._on_settle(decide(message, stopping=True))
