"""The acker: dead letters before deletes, retries by due time (never a sleep), letting go.

The acker runs here over the real :class:`~consumer.sqs.WorkQueue` and a fake SQS client that
answers each batch call from a plan (success, a raised error, or entries that come back in
``Failed``) and records every call. Rounds are driven with :meth:`Acker.tick` at chosen times on
a fake clock, with the jitter pinned to its maximum, so every due time is exact; ``time.sleep``
is made to fail, so that any wait in the acker's thread would show.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bottleneck_contract.messages import ImageRef
from bottleneck_contract.retry import Backoff
from consumer.errors import Failure
from consumer.inflight import InFlight
from consumer.settle import Action, DeadLetter, Verdict
from consumer.sqs import WorkQueue
from consumer.stages.ack import ACK_BACKOFF, Acker
from consumer.stats import Stats
from consumer.work import ImageTask, Message
from tests.faults import client_error

OK = "ok"
THROTTLED = client_error("ThrottlingException", 400, "Batch")
NOT_AN_IMAGE = Failure("not-an-image", "cannot identify image file", permanent=True)
SENDER_FAULT = {"ReceiptHandleIsInvalid", "InvalidParameterValue"}
MAX_JITTER = 1.0  # rand() pinned: every wait is its backoff's ceiling


class FakeSqs:
    """SQS's batch calls, answered from ``plan`` (per operation, one answer per call, then OK).

    An answer is ``OK``, an exception to raise, or ``{name: error code}`` for entries that come
    back in ``Failed`` (the others succeed); an entry's name is its message id, or for a dead
    letter the key in its body. ``calls`` records (operation, message ids) in order;
    ``dead_letters`` the (source message id, body) of every letter really sent.
    """

    def __init__(self, plan: dict[str, list[Any]] | None = None) -> None:
        self.plan = plan or {}
        self.calls: list[tuple[str, list[str]]] = []
        self.dead_letters: list[tuple[str, str]] = []

    def send_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:  # noqa: N803
        ids = [e["MessageAttributes"]["source-message-id"]["StringValue"] for e in Entries]
        names = [json.loads(e["MessageBody"])["key"] for e in Entries]
        response = self._answer("send_message_batch", Entries, ids, names)
        sent = {ok["Id"] for ok in response["Successful"]}
        self.dead_letters += [
            (ids[i], e["MessageBody"]) for i, e in enumerate(Entries) if e["Id"] in sent
        ]
        return response

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:  # noqa: N803
        return self._answer("delete_message_batch", Entries, _ids(Entries))

    def change_message_visibility_batch(
        self,
        *,
        QueueUrl: str,  # noqa: N803
        Entries: list[dict[str, Any]],  # noqa: N803
    ) -> Any:
        seconds = {e["VisibilityTimeout"] for e in Entries}
        return self._answer(
            f"change_message_visibility_batch:{seconds.pop()}", Entries, _ids(Entries)
        )

    def _answer(
        self,
        operation: str,
        entries: list[dict[str, Any]],
        ids: list[str],
        names: list[str] | None = None,
    ) -> Any:
        self.calls.append((operation, ids))
        answers = self.plan.get(operation.split(":")[0], [])
        answer: Any = answers.pop(0) if answers else OK
        if isinstance(answer, Exception):
            raise answer
        failing: dict[str, str] = {} if answer == OK else answer
        response: dict[str, list[dict[str, Any]]] = {"Successful": [], "Failed": []}
        for entry, name in zip(entries, names or ids, strict=True):
            code = failing.get(name)
            if code is None:
                response["Successful"].append({"Id": entry["Id"]})
            else:
                response["Failed"].append(
                    {"Id": entry["Id"], "Code": code, "SenderFault": code in SENDER_FAULT}
                )
        return response


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["ReceiptHandle"].removeprefix("handle-") for e in entries]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    def sleep(seconds: float) -> None:
        raise AssertionError(f"the acker slept {seconds} s")

    monkeypatch.setattr(time, "sleep", sleep)


class Rig:
    """An acker over the fake SQS, with held messages and a fake clock."""

    def __init__(self, plan: dict[str, list[Any]] | None = None) -> None:
        self.sqs = FakeSqs(plan)
        self.inflight = InFlight(100, lambda action: None)
        self.stats = Stats()
        self.clock = Clock()
        self.acker = Acker(
            work_queue=WorkQueue(self.sqs, "work-url", "dead-letter-url"),
            inflight=self.inflight,
            stats=self.stats,
            clock=self.clock,
            rand=lambda: MAX_JITTER,
        )
        self._names: Iterator[int] = itertools.count()

    def held(self) -> Message:
        """A new message, held by the worker (registered with one image)."""
        name = f"m{next(self._names)}"
        message = Message(name, f"handle-{name}", f'{{"key": "{name}"}}', 1, 0.0, 300.0)
        message.images = [ImageTask(message=message, ref=ImageRef("images", f"{name}.jpg"))]
        self.inflight.register(message)
        return message

    def round_at(self, now: float) -> None:
        self.clock.now = now
        self.acker.tick(now)

    def held_ids(self) -> set[str]:
        return {m.message_id for m in self.inflight.held()}

    def due(self) -> list[float]:
        return sorted(due for due, _, _ in self.acker.waiting)


def dead_letter(message: Message, *keys: str) -> Action:
    letters = tuple(DeadLetter(f'{{"key": "{k}"}}', NOT_AN_IMAGE) for k in keys or ("k",))
    return Action(Verdict.DEAD_LETTER, message, letters)


def first_wait() -> float:
    return ACK_BACKOFF.delay(0, lambda: MAX_JITTER)


def test_a_dead_letter_send_precedes_the_delete_of_its_message() -> None:
    # GIVEN a message to dead-letter and one to delete
    rig = Rig()
    bad, good = rig.held(), rig.held()
    rig.acker.put(dead_letter(bad))
    rig.acker.put(Action(Verdict.DELETE, good))

    # WHEN the acker carries them out
    rig.round_at(1000.0)

    # THEN the send went first, then one delete call took both messages
    assert rig.sqs.calls == [
        ("send_message_batch", [bad.message_id]),
        ("delete_message_batch", [good.message_id, bad.message_id]),
    ]
    assert rig.sqs.dead_letters == [(bad.message_id, '{"key": "k"}')]
    assert rig.held_ids() == set()
    assert rig.stats.counts["dead_lettered"] == 1
    assert rig.stats.counts["messages_deleted"] == 2
    assert rig.acker.idle()


def test_a_failed_send_is_retried_when_due_and_its_delete_waits_for_it() -> None:
    # GIVEN a dead-letter send that is throttled once, and another message to delete
    rig = Rig({"send_message_batch": [THROTTLED]})
    bad, good = rig.held(), rig.held()
    rig.acker.put(dead_letter(bad))
    rig.acker.put(Action(Verdict.DELETE, good))

    # WHEN the first round fails the send
    rig.round_at(1000.0)

    # THEN the other message was deleted at once, the failed one neither deleted nor dropped
    # but due again after the first backoff, and the acker is not idle
    assert rig.sqs.calls == [
        ("send_message_batch", [bad.message_id]),
        ("delete_message_batch", [good.message_id]),
    ]
    assert rig.held_ids() == {bad.message_id}
    assert rig.due() == [1000.0 + first_wait()]
    assert not rig.acker.idle()

    # WHEN a round comes before the due time, THEN nothing is tried
    rig.round_at(1000.0 + first_wait() / 2)
    assert len(rig.sqs.calls) == 2

    # WHEN the due time comes
    rig.round_at(1000.0 + first_wait())

    # THEN the letter is sent once, and only then is its message deleted
    assert rig.sqs.calls[2:] == [
        ("send_message_batch", [bad.message_id]),
        ("delete_message_batch", [bad.message_id]),
    ]
    assert rig.sqs.dead_letters == [(bad.message_id, '{"key": "k"}')]
    assert rig.held_ids() == set()
    assert rig.acker.idle()


def test_a_partly_failed_send_sends_only_the_failed_letters_again() -> None:
    # GIVEN a message with two failed images, whose send fails one entry once (SQS's side)
    rig = Rig({"send_message_batch": [{"a.jpg": "InternalError"}]})
    bad = rig.held()
    rig.acker.put(dead_letter(bad, "a.jpg", "b.jpg"))

    # WHEN the acker carries it out, and its retry when due
    rig.round_at(1000.0)
    assert [op for op, _ in rig.sqs.calls] == ["send_message_batch"]
    assert rig.held_ids() == {bad.message_id}
    rig.round_at(1000.0 + first_wait())

    # THEN each letter was recorded exactly once, and then the message was deleted
    assert sorted(rig.sqs.dead_letters) == [
        (bad.message_id, '{"key": "a.jpg"}'),
        (bad.message_id, '{"key": "b.jpg"}'),
    ]
    assert rig.sqs.calls == [
        ("send_message_batch", [bad.message_id] * 2),
        ("send_message_batch", [bad.message_id]),
        ("delete_message_batch", [bad.message_id]),
    ]
    assert rig.stats.counts["dead_lettered"] == 2
    assert rig.held_ids() == set()


def test_a_failing_delete_does_not_hold_up_later_actions() -> None:
    # GIVEN a delete that keeps failing
    rig = Rig({"delete_message_batch": [THROTTLED]})
    stuck = rig.held()
    rig.acker.put(Action(Verdict.DELETE, stuck))
    rig.round_at(1000.0)

    # WHEN other actions arrive before its retry is due
    later = [rig.held() for _ in range(3)]
    rig.acker.put(Action(Verdict.DELETE, later[0]))
    rig.acker.put(Action(Verdict.RELEASE, later[1], delay=30))
    rig.acker.put(dead_letter(later[2]))
    rig.round_at(1000.0 + first_wait() / 10)

    # THEN they are carried out at once, without the stuck one, which waits for its due time
    assert rig.sqs.calls[1:] == [
        ("send_message_batch", [later[2].message_id]),
        ("delete_message_batch", [later[0].message_id, later[2].message_id]),
        ("change_message_visibility_batch:30", [later[1].message_id]),
    ]
    assert rig.held_ids() == {stuck.message_id}
    assert rig.due() == [1000.0 + first_wait()]


def test_when_the_tries_run_out_the_message_is_let_go_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a delete that SQS throttles every time
    rig = Rig({"delete_message_batch": [THROTTLED] * 99})
    message = rig.held()
    rig.acker.put(Action(Verdict.DELETE, message))

    # WHEN the acker tries it, and again each time it is due
    now = 1000.0
    waits: list[float] = []
    with caplog.at_level(logging.WARNING, logger="consumer.stages.ack"):
        rig.round_at(now)
        while rig.due():
            waits.append(rig.due()[0] - now)
            now = rig.due()[0]
            rig.round_at(now)

    # THEN it was tried ACK_BACKOFF.attempts times, each wait the next backoff, growing
    assert len(rig.sqs.calls) == ACK_BACKOFF.attempts
    assert waits == [ACK_BACKOFF.delay(n, lambda: MAX_JITTER) for n in range(len(waits))]
    assert waits == sorted(waits) and waits[0] > 0
    # and then let go: no longer held (SQS redelivers it), counted, logged as an error
    assert rig.held_ids() == set()
    assert rig.stats.counts["messages_abandoned"] == 1
    assert rig.stats.counts["messages_deleted"] == 0
    assert rig.acker.idle()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "left for SQS to redeliver" in errors[0].getMessage()


def test_a_send_and_its_delete_share_one_budget() -> None:
    # GIVEN a dead-letter send that fails all but its last try, then a delete that fails
    sends = [THROTTLED] * (ACK_BACKOFF.attempts - 1)
    rig = Rig({"send_message_batch": sends, "delete_message_batch": [THROTTLED]})
    message = rig.held()
    rig.acker.put(dead_letter(message))

    # WHEN the acker retries until it is done or lets go
    rig.round_at(1000.0)
    while rig.due():
        rig.round_at(rig.due()[0])

    # THEN the letter was recorded once, but the delete had no tries left: let go, counted
    assert rig.sqs.dead_letters == [(message.message_id, '{"key": "k"}')]
    assert [op for op, _ in rig.sqs.calls].count("delete_message_batch") == 1
    assert rig.stats.counts["messages_abandoned"] == 1
    assert rig.held_ids() == set()


def test_a_stale_handle_is_forgotten_without_a_retry() -> None:
    # GIVEN two deletes, one of whose receipt handles SQS no longer accepts
    rig = Rig()
    stale, fresh = rig.held(), rig.held()
    rig.sqs.plan["delete_message_batch"] = [{stale.message_id: "ReceiptHandleIsInvalid"}]
    rig.acker.put(Action(Verdict.DELETE, stale))
    rig.acker.put(Action(Verdict.DELETE, fresh))

    # WHEN the acker carries them out
    rig.round_at(1000.0)

    # THEN both are forgotten, nothing waits for a retry, and only the fresh one counts as deleted
    assert len(rig.sqs.calls) == 1
    assert rig.held_ids() == set()
    assert rig.due() == []
    assert rig.stats.counts["messages_stale"] == 1
    assert rig.stats.counts["messages_deleted"] == 1
    assert rig.stats.counts["messages_abandoned"] == 0


def test_an_entry_rejected_as_the_senders_fault_is_let_go_at_once() -> None:
    # GIVEN a release whose entry SQS rejects as invalid (another try cannot help)
    rig = Rig()
    message = rig.held()
    rig.sqs.plan["change_message_visibility_batch"] = [
        {message.message_id: "InvalidParameterValue"}
    ]
    rig.acker.put(Action(Verdict.RELEASE, message, delay=5))

    # WHEN the acker carries it out
    rig.round_at(1000.0)

    # THEN it is let go after that one try
    assert len(rig.sqs.calls) == 1
    assert rig.due() == []
    assert rig.stats.counts["messages_abandoned"] == 1
    assert rig.held_ids() == set()


def test_a_failed_release_keeps_its_delay_and_a_short_one_holds_off_idle_exit() -> None:
    # GIVEN a release with a 5 s delay whose call is reset once
    reset = client_error("InternalFailure", 500, "ChangeMessageVisibilityBatch")
    rig = Rig({"change_message_visibility_batch": [reset]})
    message = rig.held()
    rig.acker.put(Action(Verdict.RELEASE, message, delay=5))

    # WHEN it fails, then is retried when due
    rig.round_at(1000.0)
    assert rig.acker.redelivery_due == 0.0  # not released yet: nothing is coming back
    retry_at = rig.due()[0]
    rig.round_at(retry_at)

    # THEN the retry asked for the same delay, and the worker knows when the message returns
    assert rig.sqs.calls == [
        ("change_message_visibility_batch:5", [message.message_id]),
        ("change_message_visibility_batch:5", [message.message_id]),
    ]
    assert rig.stats.counts["messages_released"] == 1
    assert rig.acker.redelivery_due == retry_at + 5 + 1.0


def test_a_dropped_message_makes_no_call() -> None:
    rig = Rig()
    message = rig.held()
    rig.acker.put(Action(Verdict.DROP, message))
    rig.round_at(1000.0)
    assert rig.sqs.calls == []
    assert rig.stats.counts["messages_dropped"] == 1
    assert rig.held_ids() == set()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_thread_finishes_its_retries_before_it_stops(
    monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    # GIVEN the acker thread with a short real backoff, and a delete throttled twice
    monkeypatch.undo()  # the thread waits on its queue with timeouts (never a sleep)
    sqs = FakeSqs({"delete_message_batch": [THROTTLED, THROTTLED]})
    inflight = InFlight(100, lambda action: None)
    acker = Acker(
        work_queue=WorkQueue(sqs, "work-url", "dead-letter-url"),
        inflight=inflight,
        stats=Stats(),
        backoff=Backoff(attempts=3, base=0.01, cap=0.01),
        concurrency=concurrency,
    )
    message = Message("m0", "handle-m0", "{}", 1, 0.0, 300.0)
    message.images = [ImageTask(message=message, ref=ImageRef("images", "m0.jpg"))]
    inflight.register(message)
    acker.start()

    # WHEN an action comes and the acker is told to stop at once
    acker.put(Action(Verdict.DELETE, message))
    acker.stop()
    acker.join(timeout=30)

    # THEN it stopped only after the third try deleted the message
    assert not acker.is_alive()
    assert sqs.calls == [("delete_message_batch", ["m0"])] * 3
    assert inflight.empty()
    assert acker.idle()


class SlowSqs(FakeSqs):
    """Deletes that take ``seconds`` each, counting how many are under way at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.under_way = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:  # noqa: N803
        with self._lock:
            self.under_way += 1
            self.most_at_once = max(self.most_at_once, self.under_way)
        try:
            time.sleep(self.seconds)
            return super().delete_message_batch(QueueUrl=QueueUrl, Entries=Entries)
        finally:
            with self._lock:
                self.under_way -= 1


def _thread_rig(
    sqs: FakeSqs, concurrency: int, messages: int, nothing_coming: bool = False
) -> tuple[Acker, list[Message]]:
    inflight = InFlight(1000, lambda action: None)
    acker = Acker(
        work_queue=WorkQueue(sqs, "work-url", "dead-letter-url"),
        inflight=inflight,
        stats=Stats(),
        concurrency=concurrency,
        nothing_coming=lambda: nothing_coming,
    )
    held = []
    for i in range(messages):
        message = Message(f"m{i}", f"handle-m{i}", "{}", 1, 0.0, 300.0)
        message.images = [ImageTask(message=message, ref=ImageRef("images", f"m{i}.jpg"))]
        inflight.register(message)
        held.append(message)
    return acker, held


def test_full_batches_are_deleted_several_calls_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an acker allowed 4 calls at once, SQS taking 0.2 s a call, and 60 deletes queued
    monkeypatch.undo()
    sqs = SlowSqs(0.2)
    acker, held = _thread_rig(sqs, concurrency=4, messages=60)
    for message in held:
        acker.put(Action(Verdict.DELETE, message))

    # WHEN the thread carries them out
    acker.start()
    acker.stop()
    acker.join(timeout=30)

    # THEN up to 4 calls were under way at once (one at a time would cap a worker at 10
    # messages per call's latency), never more, each a full batch, every message deleted once
    assert sqs.most_at_once == 4
    assert sorted(len(ids) for _, ids in sqs.calls) == [10] * 6
    assert sorted(i for _, ids in sqs.calls for i in ids) == sorted(m.message_id for m in held)
    assert acker.idle()


@pytest.mark.parametrize(
    ("nothing_coming", "calls"),
    [
        # idle callers do not split a batch (each call costs as much as the ten deletes in it)
        (False, [10]),
        # while receiving waits for what is held to be done with (a suspect's solo run, serial
        # receives), none is coming until the last is deleted: each goes at once
        (True, [1] * 10),
    ],
)
def test_a_trickle_is_gathered_into_one_call_unless_nothing_else_is_coming(
    monkeypatch: pytest.MonkeyPatch, nothing_coming: bool, calls: list[int]
) -> None:
    # GIVEN an acker allowed 4 calls at once, and deletes arriving one every 10 ms
    monkeypatch.undo()
    sqs = SlowSqs(0.0)
    acker, held = _thread_rig(sqs, concurrency=4, messages=10, nothing_coming=nothing_coming)
    acker.start()

    # WHEN ten come within the flush time
    for message in held:
        acker.put(Action(Verdict.DELETE, message))
        time.sleep(0.01)
    acker.stop()
    acker.join(timeout=30)

    # THEN they went in one call of ten, or, while nothing else is coming, one call each
    assert [len(ids) for _, ids in sqs.calls] == calls


class BuggyQueue(WorkQueue):
    """A work queue whose first delete raises: a bug, not an SQS failure (those are results)."""

    def __init__(self) -> None:
        super().__init__(FakeSqs(), "work-url", "dead-letter-url")
        self.raised = False

    def try_delete(self, messages: Any) -> Any:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a bug in a round")
        return super().try_delete(messages)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_round_that_raises_lets_its_messages_go_and_the_acker_goes_on(
    monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    # GIVEN an acker thread whose first round raises, with 20 deletes queued (with helpers, the
    # first full batch goes to one of them)
    monkeypatch.undo()
    work_queue = BuggyQueue()
    inflight = InFlight(1000, lambda action: None)
    stats = Stats()
    acker = Acker(work_queue=work_queue, inflight=inflight, stats=stats, concurrency=concurrency)
    held = []
    for i in range(21):
        message = Message(f"m{i}", f"handle-m{i}", "{}", 1, 0.0, 300.0)
        message.images = [ImageTask(message=message, ref=ImageRef("images", f"m{i}.jpg"))]
        inflight.register(message)
        held.append(message)
    for message in held[:20]:
        acker.put(Action(Verdict.DELETE, message))

    # WHEN the thread runs, and one more delete comes afterwards
    acker.start()
    deadline = time.monotonic() + 10
    while not acker.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    acker.put(Action(Verdict.DELETE, held[20]))
    acker.stop()
    acker.join(timeout=10)

    # THEN the failed round's ten were let go (SQS delivers them again), the others deleted,
    # nothing is left unfinished, and the acker went on with the later delete
    assert not acker.is_alive()
    assert stats.counts["messages_abandoned"] == 10
    assert stats.counts["messages_deleted"] == 11
    assert inflight.empty() and acker.idle()


def test_the_helpers_are_daemon_threads_that_end_with_the_acker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a running acker allowed 3 calls at once
    monkeypatch.undo()
    acker, _ = _thread_rig(FakeSqs(), concurrency=3, messages=0)
    before = set(threading.enumerate())
    acker.start()
    deadline = time.monotonic() + 10
    helpers: list[threading.Thread] = []
    while len(helpers) < 2 and time.monotonic() < deadline:  # run() starts them
        helpers = [t for t in set(threading.enumerate()) - before if t.name.startswith("ack_")]
        time.sleep(0.01)

    # THEN its two helpers are daemon threads (a ThreadPoolExecutor's are joined at exit, with
    # every queued call: a hanging SQS call would hold up the process's exit)
    assert len(helpers) == 2 and all(t.daemon for t in helpers)
    acker.stop()
    acker.join(timeout=10)
    for helper in helpers:
        helper.join(timeout=10)
    assert not any(t.is_alive() for t in helpers)
