"""Quarantine: a message that comes back after its worker died is handled alone.

Decode runs in crash-isolated processes (:mod:`consumer.decode_pool`), but the consumer itself
can still die on an input: the kernel's out-of-memory killer picks it, or native code outside
decoding crashes. Everything it held then comes back with its receive count raised, and a repeat
offender would take fresh neighbours down with it again and again until ``maxReceiveCount`` sent
them all to the dead-letter queue without a reason. So:

- A *suspect* is a message received before (``ApproximateReceiveCount`` > 1) for which this
  worker cannot vouch: a copy it still holds (SQS delivered the message twice, or that copy's
  visibility ran out while it waited) or released itself after a transient failure, received
  just before and run with others, says that no consumer died with it
  (:meth:`consumer.inflight.InFlight.vouches_for`), while two receives are left before
  ``maxReceiveCount`` (:meth:`Quarantine.may_vouch`). A suspect runs alone: the receiver waits
  until nothing else is held (deleted or dead-lettered by the acker, not only settled), runs
  it, and receives nothing more until it is settled.
- Before a suspect runs alone, a marker object is written under the output prefix
  (``<prefix>_bottleneck/running/<message id>``) and removed once the message is settled. Its
  body counts the times the message was running alone when a consumer died. A suspect whose
  marker is still there died *alone* with the consumer. Once is strong evidence but not proof:
  a Spot reclaim without notice, a SIGKILL or an OOM kill caused by something else can land
  during a good image's solo run. So it runs alone once more, unless this receive is its last
  before SQS would move it to the dead-letter queue without a reason (``receive count >=
  maxReceiveCount``); a second death alone, or the first at that last receive, sends it to the
  dead-letter queue with ``error-code`` ``crashed`` instead of running again. A poison message
  thus costs two consumer deaths (one among its neighbours, one alone) with ``maxReceiveCount``
  3, three with the stack's default of 5, where a good image is dead-lettered only if consumers
  die twice while it runs alone.
- After a start (which may follow a crash) and after any suspect, the receivers are *careful*:
  they receive one message at a time, one receiver at a time, so that suspects arrive one by
  one instead of ten held together, until ``CAREFUL_STREAK`` fresh messages in a row show the
  redeliveries are over. Once a suspect has been seen they also wait, before each receive,
  until everything held is settled and done with by the acker (see
  :meth:`Quarantine.polling`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from consumer import aws
from consumer.work import Message

log = logging.getLogger(__name__)

# Fresh messages in a row after which the receivers go back to full receives.
CAREFUL_STREAK = 20
# Deaths alone after which a message is dead-lettered as ``crashed`` (earlier at its last receive).
DEATHS_TO_CONVICT = 2
MARKERS = "_bottleneck/running/"


def max_receive_count(sqs: Any, queue_url: str) -> int | None:
    """The work queue's ``maxReceiveCount`` from its redrive policy, or ``None``."""
    import json

    attributes = aws.call(
        sqs.get_queue_attributes, QueueUrl=queue_url, AttributeNames=["RedrivePolicy"]
    ).get("Attributes", {})
    policy = attributes.get("RedrivePolicy")
    if not policy:
        return None
    return int(json.loads(policy)["maxReceiveCount"])


class Quarantine:
    """Shared by the receivers: whether to receive carefully, and the solo runs of suspects."""

    def __init__(
        self,
        *,
        s3: Any,
        bucket: str,
        prefix: str,
        max_receives: int | None,
        on_pause: Callable[[], None] = lambda: None,
    ) -> None:
        self.s3 = s3
        # Called (outside the lock) when receiving pauses until what is held settles: a suspect
        # about to run alone, or serial receives starting. The batch being collected then
        # closes now instead of waiting --max-wait-ms for images that cannot come.
        self.on_pause = on_pause
        self.bucket = bucket
        self.prefix = prefix + MARKERS
        self.max_receives = max_receives
        # Set when the worker stops because it stalled (consumer.stall): a suspect running
        # alone then keeps its marker, the stall counting against it as a death would.
        self.keep_markers = False
        self._lock = threading.Lock()
        self._careful = True
        # Careful and a suspect seen since: receive only with nothing held.
        self._serial = False
        self._streak = 0
        # Suspects waiting for the pipeline to drain or running alone: while there is one, no
        # receiver receives, so nothing new joins it in flight.
        self._solo = 0
        # One suspect runs at a time; the others wait, registered, for their turn.
        self._turn = threading.Lock()
        self._waiting: set[str] = set()
        # While careful, one receiver polls at a time (see :meth:`polling`).
        self._poll = threading.Lock()
        # When the current run of empty polls began, any receiver's (None after a poll that got
        # messages). While careful the polls are one at a time, so each speaks for the queue: a
        # receiver taking its first turn continues the run instead of starting the idle clock
        # again (with eight receivers taking turns, an idle worker waited eight long polls).
        self._empty_since: float | None = None

    # --- turns ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def solo(self) -> Iterator[None]:
        with self._lock:
            self._solo += 1
        self.on_pause()
        try:
            yield
        finally:
            with self._lock:
                self._solo -= 1

    @property
    def solo_active(self) -> bool:
        with self._lock:
            return self._solo > 0

    @property
    def nothing_coming(self) -> bool:
        """No receive until what is held settles: a suspect runs alone, or receives are serial."""
        with self._lock:
            return self._solo > 0 or (self._careful and self._serial)

    @contextlib.contextmanager
    def waiting(self, message: Message) -> Iterator[None]:
        with self._lock:
            self._waiting.add(message.message_id)
        try:
            yield
        finally:
            with self._lock:
                self._waiting.discard(message.message_id)

    def take_turn(self, stopped: threading.Event) -> bool:
        """Block until it is this caller's turn to run a suspect (``False`` if stopped first)."""
        while not self._turn.acquire(timeout=0.05):
            if stopped.is_set():
                return False
        return True

    def end_turn(self) -> None:
        self._turn.release()

    def only_suspects_waiting(self, held: list[Message], running: Message) -> bool:
        """Whether everything held but ``running`` is a suspect waiting for its turn: the rest
        is settled and done with by the acker too. A message whose delete was still to come
        when the consumer died comes back with a receive spent (with maxReceiveCount 3, a good
        image that ran alone just before a poison one was dead-lettered without a reason so)."""
        with self._lock:
            return all(m is running or m.message_id in self._waiting for m in held)

    # --- how to receive ----------------------------------------------------------------------
    @contextlib.contextmanager
    def polling(self, held: Callable[[], list[Message]]) -> Iterator[bool]:
        """Whether the caller may poll now. While careful, one receiver polls at a time (the
        poll and a suspect's whole run are one turn); once a suspect has been seen, receiving
        is serial too: a poll waits until nothing is ``held``, deletes included.

        A message received beside unsettled work spends a receive if that work crashes the
        consumer: a suspect received while another ran alone, or while a fresh poison image
        decoded, came back without having run alone, and with ``maxReceiveCount`` 3 good
        images and poison alike reached the dead-letter queue without a reason. Serial
        receives cost a little: they last until ``CAREFUL_STREAK`` fresh messages in a row
        (each computed in a batch of its own, closed at once: :attr:`nothing_coming`), and
        only where redeliveries come.
        """
        with self._lock:
            careful, serial = self._careful, self._serial
        if not careful:
            yield True
            return
        if not self._poll.acquire(timeout=0.05):
            yield False  # another receiver is polling carefully, or running what it got
            return
        try:
            # Serial: nothing held at all, deletes and dead letters included (the acker sends
            # them at once while nothing is coming), for the reason only_suspects_waiting gives.
            done = not serial or not held()
            yield done and not self.solo_active
        finally:
            self._poll.release()

    def polled(self, started: float, got: int) -> None:
        """Record a poll begun at ``started`` that returned ``got`` messages."""
        with self._lock:
            if got:
                self._empty_since = None
            elif self._empty_since is None:
                self._empty_since = started

    def empty_run(self) -> float | None:
        """While careful: when the queue's current run of empty polls began (``None`` when the
        last poll got messages, or when receivers poll in parallel and each speaks for itself)."""
        with self._lock:
            return self._empty_since if self._careful else None

    def may_vouch(self, message: Message) -> bool:
        """Whether a redelivery this worker vouches for may run with others: only while two
        receives are left after this one. If it does crash the consumer among others, it then
        still has a solo run (which dies, leaving the marker) and a receive that convicts it as
        ``crashed``; nearer ``maxReceiveCount`` SQS would dead-letter it without a reason."""
        return self.max_receives is None or message.receive_count <= self.max_receives - 2

    def receive_size(self, room: int) -> int:
        with self._lock:
            return min(room, 1) if self._careful else room

    def saw(self, messages: list[Message]) -> None:
        """Update the careful state after a receive."""
        with self._lock:
            if any(is_suspect(m) for m in messages):
                pausing = not (self._careful and self._serial)
                self._careful, self._serial, self._streak = True, True, 0
            else:
                pausing = False
                self._streak += len(messages)
                if self._careful and self._streak >= CAREFUL_STREAK:
                    self._careful = self._serial = False
                    log.info("no more redeliveries seen; receiving in full batches again")
        if pausing:
            self.on_pause()

    @property
    def careful(self) -> bool:
        with self._lock:
            return self._careful

    # --- the marker ----------------------------------------------------------------------------
    def marker_key(self, message: Message) -> str:
        return self.prefix + message.message_id

    def deaths_alone(self, message: Message) -> int:
        """How many times a consumer died while ``message`` ran alone: its marker's count plus
        the death that left the marker there; 0 without a marker."""
        try:
            response = aws.call(
                self.s3.get_object, Bucket=self.bucket, Key=self.marker_key(message)
            )
            body = response["Body"].read()
        except Exception as exc:
            if aws.error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return 0
            raise
        try:
            return int(body) + 1
        except ValueError:  # unreadable: the marker itself is the evidence of one death
            return 1

    def convicted(self, message: Message, deaths: int) -> bool:
        """Whether ``deaths`` alone send ``message`` to the dead-letter queue as ``crashed``."""
        if deaths >= DEATHS_TO_CONVICT:
            return True
        last_receive = self.max_receives is not None and message.receive_count >= self.max_receives
        return deaths >= 1 and last_receive

    def mark_running(self, message: Message, deaths: int) -> None:
        aws.call(
            self.s3.put_object,
            Bucket=self.bucket,
            Key=self.marker_key(message),
            Body=str(deaths).encode(),
            ContentType="text/plain",
        )

    def unmark(self, message: Message) -> None:
        try:
            aws.call(self.s3.delete_object, Bucket=self.bucket, Key=self.marker_key(message))
        except Exception as exc:  # a marker left behind costs one HEAD at a later redelivery
            log.warning(
                "could not remove a quarantine marker",
                exc_info=exc,
                extra={"fields": {"key": self.marker_key(message)}},
            )

    def crashed_detail(self, message: Message, deaths: int) -> str:
        limit = f" (maxReceiveCount {self.max_receives})" if self.max_receives else ""
        times = "once" if deaths == 1 else f"{deaths} times"
        return (
            f"the consumer died (or stalled) {times} while it processed this message alone; "
            f"receive {message.receive_count}{limit}"
        )


def is_suspect(message: Message) -> bool:
    """Received before, and not vouched for (:meth:`consumer.inflight.InFlight.vouches_for`):
    only a receive count that a consumer's death may have raised is evidence against it."""
    return message.receive_count > 1 and not message.vouched
