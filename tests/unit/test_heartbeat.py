"""The visibility heartbeat: extend before expiry, give up lost handles, respect the 12 h cap."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytest

from bottleneck_contract.messages import ImageRef
from consumer.inflight import InFlight
from consumer.settle import Action
from consumer.sqs import MAX_HOLD_SECONDS
from consumer.stages.heartbeat import Heartbeat
from consumer.work import ImageTask, Message


class FakeQueue:
    """Records visibility changes; reports chosen receipt handles as stale, like SQS would."""

    def __init__(self, stale: set[str] | None = None) -> None:
        self.stale = stale or set()
        self.calls: list[tuple[list[str], int]] = []

    def change_visibility(self, messages: Sequence[Message], seconds: int) -> list[Message]:
        self.calls.append(([m.message_id for m in messages], seconds))
        return [m for m in messages if m.receipt_handle in self.stale]


def _held(inflight: InFlight, name: str, *, visible_in: float, held_for: float = 0) -> Message:
    now = time.monotonic()
    message = Message(name, f"handle-{name}", "{}", 1, now - held_for, now + visible_in)
    message.images = [ImageTask(message=message, ref=ImageRef("images", f"{name}.jpg"))]
    inflight.register(message)
    return message


def _beat(work_queue: FakeQueue, inflight: InFlight, visibility: int = 60) -> None:
    Heartbeat(work_queue=work_queue, inflight=inflight, visibility=visibility).beat()  # type: ignore[arg-type]


def test_only_messages_near_expiry_are_extended() -> None:
    settled: list[Action] = []
    inflight = InFlight(100, settled.append)
    soon = _held(inflight, "soon", visible_in=10)
    _held(inflight, "later", visible_in=50)
    work_queue = FakeQueue()

    _beat(work_queue, inflight)

    assert work_queue.calls == [(["soon"], 60)]
    assert soon.visible_until > time.monotonic() + 55


def test_a_stale_handle_marks_the_message_lost() -> None:
    inflight = InFlight(100, lambda action: None)
    message = _held(inflight, "taken", visible_in=1)

    _beat(FakeQueue(stale={"handle-taken"}), inflight)

    # Another worker owns it now: this one must neither write nor delete it.
    assert message.lost


def test_a_settled_message_deleted_meanwhile_is_not_reported_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a settled message (its delete with the acker) and a beat that read it as held, and
    # whose extension reaches SQS after the acker's delete: SQS calls its handle invalid
    inflight = InFlight(100, lambda action: None)
    message = _held(inflight, "deleted", visible_in=1)
    inflight.done(message.images[0], "written")
    assert message.settled

    # WHEN the beat gets the answer
    with caplog.at_level(logging.WARNING):
        _beat(FakeQueue(stale={"handle-deleted"}), inflight)

    # THEN nothing is said to be lost: no warning, and the message is not marked
    assert not message.lost
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nothing_is_held_past_the_twelve_hour_limit() -> None:
    inflight = InFlight(100, lambda action: None)
    _held(inflight, "old", visible_in=1, held_for=MAX_HOLD_SECONDS - 20)
    _held(inflight, "ancient", visible_in=1, held_for=MAX_HOLD_SECONDS + 5)
    work_queue = FakeQueue()

    _beat(work_queue, inflight)

    # The old one gets only what is left of its 12 hours; the ancient one is let go.
    assert len(work_queue.calls) == 1
    ids, seconds = work_queue.calls[0]
    assert ids == ["old"] and 0 < seconds <= 20
