"""The receiver's accounting when a stop arrives while a receive is under way."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import pytest

from consumer.inflight import InFlight
from consumer.quarantine import CAREFUL_STREAK, Quarantine
from consumer.stages.receive import Receiver, build_tasks
from consumer.stats import Stats
from consumer.work import Message
from tests.unit.test_quarantine import MarkerStore


class StopDuringReceive:
    """A work queue whose long poll is answered only after the worker began to stop."""

    def __init__(self, stop: threading.Event, count: int) -> None:
        self.stop = stop
        self.count = count
        self.released: list[tuple[list[str], int]] = []

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        self.stop.set()  # the SIGTERM lands while SQS is answering
        return [
            Message(f"m{i}", f"h{i}", '{"bucket": "b", "key": "k"}', 1, 0.0, 300.0)
            for i in range(min(self.count, max_messages))
        ]

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        self.released.append(([m.message_id for m in messages], seconds))
        return []


def test_messages_received_during_a_stop_are_counted_and_handed_back_at_once() -> None:
    # GIVEN a receiver whose poll returns 7 messages just after the stop began
    stop = threading.Event()
    work_queue = StopDuringReceive(stop, 7)
    stats = Stats()
    dispatched: list[Any] = []
    receiver = Receiver(
        "receive-0",
        work_queue=work_queue,  # type: ignore[arg-type]
        inflight=InFlight(40, lambda action: None),
        dispatch=dispatched.append,
        output_prefix="v1/",
        visibility=300,
        wait_seconds=1,
        stats=stats,
        receiving_stopped=stop,
    )

    # WHEN it runs until the stop
    receiver.start()
    receiver.join(timeout=10)

    # THEN the 7 are released at once (visibility 0), nothing is dispatched, and the exit
    # summary counts them as received, so that it matches the queue's receive counts
    assert not receiver.is_alive()
    assert work_queue.released == [([f"m{i}" for i in range(7)], 0)]
    assert dispatched == []
    assert stats.summary()["messages"] == 7
    assert stats.counts["messages_released"] == 7


class Scripted:
    """A work queue that answers each receive from a script: a count of messages, or an error."""

    def __init__(self, answers: list[int | Exception], stop: threading.Event) -> None:
        self.answers = answers
        self.stop = stop
        self.calls = 0

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        self.calls += 1
        if not self.answers:
            self.stop.set()
            return []
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [
            Message(f"m{self.calls}-{i}", "h", '{"bucket": "b", "key": "k"}', 1, 0.0, 300.0)
            for i in range(answer)
        ]

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


def receiver_for(
    work_queue: Any,
    stop: threading.Event,
    limit: int = 40,
    *,
    inflight: InFlight | None = None,
    quarantine: Quarantine | None = None,
) -> Receiver:
    return Receiver(
        "receive-0",
        work_queue=work_queue,
        inflight=inflight or InFlight(limit, lambda action: None),
        dispatch=lambda task: None,
        output_prefix="v1/",
        visibility=300,
        wait_seconds=1,
        stats=Stats(),
        receiving_stopped=stop,
        quarantine=quarantine,
    )


def test_empty_receives_start_the_idle_clock_and_a_message_stops_it() -> None:
    # GIVEN a receiver that has seen one empty receive, then one with messages, then one empty
    stop = threading.Event()
    receiver = receiver_for(Scripted([], stop), stop)

    # WHEN its polls come back empty, then with messages
    receiver._poll(10)  # the script is empty: an empty receive (and the stop, for later)
    idle_after_empty = receiver.idle_for(receiver.empty_since + 7.0)  # type: ignore[operator]
    receiver.work_queue = Scripted([3], stop)  # type: ignore[assignment]
    receiver._poll(10)

    # THEN the idle clock ran from the empty poll's start, and a message reset it
    assert idle_after_empty == 7.0
    assert receiver.empty_since is None
    assert receiver.idle_for(1e9) == 0.0


def run_for_a_while(receiver: Receiver, stop: threading.Event) -> None:
    receiver.start()
    threading.Event().wait(1.2)  # longer than one 0.5 s wait for room
    stop.set()
    receiver.join(timeout=5)


def test_a_receiver_waiting_for_room_under_the_cap_is_busy_not_idle() -> None:
    # GIVEN a receiver that found the queue empty once, and an in-flight cap full of held work
    stop = threading.Event()
    receiver = receiver_for(Scripted([], stop), stop, limit=1)
    receiver.empty_since = 0.0
    held = Message("m", "h", '{"bucket": "b", "key": "k"}', 1, 0.0, 300.0)
    build_tasks(held, "v1/")
    assert receiver.inflight.register(held)

    # WHEN it runs for a while, unable to get room
    run_for_a_while(receiver, stop)

    # THEN it counts as busy: its idle clock is not running
    assert receiver.empty_since is None
    assert receiver.idle_for(1e9) == 0.0


def test_a_receiver_whose_room_other_polls_reserved_does_not_hold_the_idle_exit_back() -> None:
    # GIVEN a receiver that never polled, and a cap that another receiver's poll reserved whole
    # while nothing is held (three receivers, a cap of 6: one empty poll after another)
    stop = threading.Event()
    receiver = receiver_for(Scripted([], stop), stop, limit=6)
    assert receiver.inflight.reserve(10, timeout=0) == 6

    # WHEN it runs for a while, unable to get room
    run_for_a_while(receiver, stop)

    # THEN it stands by: the polling receiver's idle clock decides, not this one's
    assert receiver.standing_by
    assert receiver.idle_for(1e9) == math.inf


def test_a_failed_receive_does_not_start_the_idle_clock() -> None:
    # GIVEN a receiver whose receives fail (SQS throttling or unreachable)
    stop = threading.Event()
    receiver = receiver_for(Scripted([RuntimeError("unreachable")], stop), stop)
    stop.set()  # so that the failure's backoff wait returns at once

    # WHEN a receive fails
    receiver._poll(10)

    # THEN that says nothing about the queue being empty: not idle
    assert receiver.empty_since is None


class SuspectsTwice:
    """A work queue that returns one suspect to each of its first two receives, and records
    any receive that returned while another receive was under way or a suspect was unsettled."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.lock = threading.Lock()
        self.calls = 0
        self.under_way = 0
        self.suspects: list[Message] = []
        self.second_started = threading.Event()
        self.overlaps: list[str] = []

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        with self.lock:
            self.calls += 1
            call, self.under_way = self.calls, self.under_way + 1
        if call == 1:
            # Give a second receiver the chance to poll at the same time, as SQS would.
            self.second_started.wait(timeout=0.5)
        elif call == 2:
            self.second_started.set()
        elif call > 30:
            self.stop.set()
        time.sleep(0.01)
        with self.lock:
            self.under_way -= 1
            unsettled = [m.message_id for m in self.suspects if not m.settled]
            if self.under_way or unsettled:
                self.overlaps.append(f"receive {call}: {self.under_way} under way, {unsettled}")
            if call > 2:
                return []
            suspect = Message(f"s{call}", "h", '{"bucket": "b", "key": "k"}', 2, 0.0, 300.0)
            self.suspects.append(suspect)
            return [suspect]

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


def careful_receivers(work_queue: Any, stop: threading.Event, n: int, settle_s: float) -> list[Any]:
    """``n`` receivers sharing a fresh quarantine (careful, as after a start) and a pipeline
    that settles each image ``settle_s`` after it is dispatched, and an acker done with each
    settled message 0.05 s later; started and run to the stop. A ``work_queue`` with a
    ``receivers`` or an ``inflight`` attribute is given them before they start."""

    def acker(action: Any) -> None:
        threading.Timer(0.05, inflight.forget, (action.message,)).start()

    inflight = InFlight(40, acker)
    if hasattr(work_queue, "inflight"):
        work_queue.inflight = inflight
    quarantine = Quarantine(s3=MarkerStore(), bucket="feats", prefix="v1/", max_receives=3)

    def dispatch(task: Any) -> None:
        threading.Timer(settle_s, inflight.done, (task, "written")).start()

    receivers = [
        Receiver(
            f"receive-{i}",
            work_queue=work_queue,
            inflight=inflight,
            dispatch=dispatch,
            output_prefix="v1/",
            visibility=300,
            wait_seconds=1,
            stats=Stats(),
            receiving_stopped=stop,
            quarantine=quarantine,
        )
        for i in range(n)
    ]
    if hasattr(work_queue, "receivers"):
        work_queue.receivers = receivers
    for receiver in receivers:
        receiver.start()
    for receiver in receivers:
        receiver.join(timeout=20)
    return receivers


def test_careful_receivers_take_turns_so_nothing_is_received_beside_a_suspect() -> None:
    # GIVEN two careful receivers (a fresh start) whose first two polls return a suspect each
    stop = threading.Event()
    work_queue = SuspectsTwice(stop)

    # WHEN they run until the script ends, the pipeline settling an image in 0.2 s
    receivers = careful_receivers(work_queue, stop, n=2, settle_s=0.2)

    # THEN both suspects ran, and no receive returned while another was under way or while a
    # suspect was held: a consumer crash during a suspect's solo run costs no other message a
    # receive (with maxReceiveCount 3, good images were dead-lettered without a reason so)
    assert not any(receiver.is_alive() for receiver in receivers)
    assert [m.settled for m in work_queue.suspects] == [True, True]
    assert work_queue.overlaps == []


class AfterASuspect:
    """A work queue that returns a suspect, then one fresh message per receive, and records the
    receives made while a message it returned was still held (unsettled, or its delete still
    to come from the acker)."""

    def __init__(self, stop: threading.Event, count: int) -> None:
        self.stop = stop
        self.count = count
        self.returned: list[Message] = []
        self.beside_held: list[int] = []
        self.inflight: InFlight | None = None

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        assert self.inflight is not None
        if any(self.inflight.holds(m) for m in self.returned):
            self.beside_held.append(len(self.returned) + 1)
        if len(self.returned) >= self.count:
            self.stop.set()
            return []
        # The first is a redelivery (a suspect): from then on the receiver receives serially.
        count = 1 if self.returned else 2
        message = Message(
            f"f{len(self.returned)}", "h", '{"bucket": "b", "key": "k"}', count, 0.0, 60.0
        )
        self.returned.append(message)
        return [message]

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


def test_after_a_suspect_a_careful_receiver_waits_until_what_it_holds_is_done_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a careful receiver that gets a suspect, then fresh messages
    stop = threading.Event()
    work_queue = AfterASuspect(stop, count=6)

    # WHEN it runs through them, the pipeline settling an image in 0.1 s
    with caplog.at_level(logging.INFO, logger="consumer.stages.receive"):
        receivers = careful_receivers(work_queue, stop, n=1, settle_s=0.1)

    # THEN it received each only once the one before was settled and deleted: were the fresh
    # one poison, nothing else (a suspect above all) would have spent a receive beside it
    assert not receivers[0].is_alive()
    assert [m.settled for m in work_queue.returned] == [True] * 6
    assert work_queue.beside_held == []
    # (and the log of the suspect's solo run names its image, which the message id does not)
    alone = [r for r in caplog.records if r.getMessage() == "running a redelivered message alone"]
    assert [r.fields["keys"] for r in alone] == [["k"]]  # type: ignore[attr-defined]


class Redelivers:
    """A work queue that returns, once, a second copy of a message (receive count 2)."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        body = '{"bucket": "b", "key": "k"}'
        return [Message(self.message_id, "h2", body, 2, 0.0, 300.0)]

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


class RecordingStore(MarkerStore):
    """A marker store that records the markers written (a solo run removes its own after)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def put_object(self, **call: Any) -> dict[str, Any]:
        self.written.append(call["Key"])
        return super().put_object(**call)


@pytest.mark.parametrize(
    ("max_receives", "suspect"),
    [
        (5, False),  # no consumer died with it: it runs with the others
        (3, True),  # vouched for, but one receive from the last: it still runs alone
    ],
)
def test_a_second_copy_of_a_message_this_worker_holds_is_not_a_suspect(
    max_receives: int, suspect: bool
) -> None:
    # GIVEN a worker past its careful start (full receives) that holds copy 1 of a message,
    # its image still being computed, and a quarantine that would run any suspect alone
    stop = threading.Event()
    dispatched: list[Any] = []
    store = RecordingStore()
    quarantine = Quarantine(s3=store, bucket="feats", prefix="v1/", max_receives=max_receives)
    quarantine.saw([Message(str(i), "h", "{}", 1, 0.0, 60.0) for i in range(CAREFUL_STREAK)])
    receiver = receiver_for(Redelivers("m"), stop)
    receiver.quarantine = quarantine

    def dispatch(task: Any) -> None:  # computed at once
        dispatched.append(task)
        receiver.inflight.done(task, "written")

    receiver.dispatch = dispatch
    first = Message("m", "h1", '{"bucket": "b", "key": "k"}', 1, 0.0, 300.0)
    build_tasks(first, "v1/")
    assert receiver.inflight.register(first)

    # WHEN SQS delivers it again (a duplicate, or its visibility ran out here)
    receiver._poll(10)

    # THEN with receives to spare no consumer died with it: the new copy runs with the others
    # at once (no marker, no solo run, no serial receives); one receive from the last it runs
    # alone all the same. Either way it supersedes the copy held before
    assert [task.message.receipt_handle for task in dispatched] == ["h2"]
    assert store.written == (["v1/_bottleneck/running/m"] if suspect else [])
    assert quarantine.careful is suspect
    assert first.lost and receiver.inflight.held()[0].receipt_handle == "h2"


class EmptyQueue:
    """An empty queue whose every receive takes 20 ms, during which it looks at the receivers
    four times: who is polling and its idle time as it begins (what ``Worker.idle_for`` takes
    the least of), and any other receiver that had stood by but counted as busy again (neither
    standing by nor with an idle clock) while not polling. Stops once every receiver has
    polled, or after 300 polls."""

    def __init__(self, stop: threading.Event, n: int) -> None:
        self.stop = stop
        self.n = n
        self.receivers: list[Any] = []
        self.calls: list[tuple[str, float]] = []
        self.stood_by: set[str] = set()
        self.busy_again: list[str] = []

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        caller = threading.current_thread().name
        for look in range(4):
            now = time.monotonic()
            for r in self.receivers:
                if r.name == caller:
                    if look == 0:
                        self.calls.append((caller, r.idle_for(now)))
                elif r.standing_by:
                    self.stood_by.add(r.name)
                elif r.name in self.stood_by and r.empty_since is None:
                    self.busy_again.append(r.name)
            time.sleep(0.005)
        if len({name for name, _ in self.calls}) == self.n or len(self.calls) >= 300:
            self.stop.set()
        return []

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


def test_careful_receivers_taking_turns_keep_the_queues_idle_clock_running() -> None:
    # GIVEN three careful receivers (a fresh start) polling an empty queue one at a time
    stop = threading.Event()
    work_queue = EmptyQueue(stop, n=3)

    # WHEN they run until each has taken a turn
    careful_receivers(work_queue, stop, n=3, settle_s=0.0)

    # THEN a receiver's first turn continued the idle time of the empty polls before it (it
    # began at 0 with every receiver's first turn, so an idle worker with eight receivers
    # waited eight long polls before it could exit)
    assert len({name for name, _ in work_queue.calls}) == 3
    assert all(idle > 0 for _, idle in work_queue.calls[1:]), work_queue.calls
    # and a receiver waiting for its turn kept standing by (counted as busy while it waited, it
    # held the worker's idle clock at 0 most of the time)
    assert work_queue.busy_again == []


class ConvictedThenFresh:
    """A work queue whose first receive returns a message at its last receive that already
    killed a consumer alone (its marker says so), and every later one a fresh message; records
    whether the convicted message was still held by the worker at each later receive."""

    def __init__(self, inflight: InFlight, stop: threading.Event) -> None:
        self.inflight = inflight
        self.stop = stop
        self.convicted = Message("poison", "h", '{"bucket": "b", "key": "k"}', 3, 0.0, 60.0)
        self.calls = 0
        self.beside_the_dead_letter: list[bool] = []
        self.later = threading.Event()

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        self.calls += 1
        if self.calls == 1:
            return [self.convicted]
        self.beside_the_dead_letter.append(self.inflight.holds(self.convicted))
        self.later.set()
        self.stop.set()
        return []

    def change_visibility(self, messages: list[Message], seconds: int) -> list[Message]:
        return []


def test_nothing_is_received_until_a_convicted_message_is_dead_lettered_and_deleted() -> None:
    # GIVEN a careful receiver whose first receive brings a message convicted as crashed (its
    # marker: one death alone; this is its last receive, maxReceiveCount 3), and an acker that
    # has not yet sent the dead letter nor deleted the message
    stop = threading.Event()
    actions: list[Any] = []
    inflight = InFlight(40, actions.append)
    work_queue = ConvictedThenFresh(inflight, stop)
    store = MarkerStore()
    quarantine = Quarantine(s3=store, bucket="feats", prefix="v1/", max_receives=3)
    quarantine.mark_running(work_queue.convicted, 0)
    receiver = receiver_for(work_queue, stop, inflight=inflight, quarantine=quarantine)

    # WHEN it runs, and the acker finishes with the dead letter only 0.3 s after it was decided
    receiver.start()
    deadline = time.monotonic() + 10
    while not actions and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    received_meanwhile = work_queue.calls
    marker_meanwhile = list(store.objects)
    inflight.forget(work_queue.convicted)
    assert work_queue.later.wait(10)
    receiver.join(timeout=10)

    # THEN the dead letter was decided at once, with its reason, but the next receive came only
    # once the acker was done with it, and the marker went only then too
    assert [action.message.malformed.error_code for action in actions] == ["crashed"]
    assert (received_meanwhile, marker_meanwhile) == (1, ["v1/_bottleneck/running/poison"])
    assert work_queue.beside_the_dead_letter == [False]
    assert store.objects == {}
