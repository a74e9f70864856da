"""Quarantine bookkeeping: careful receives after a start or a suspect, turns, the drain rule."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError

from consumer.quarantine import CAREFUL_STREAK, Quarantine, is_suspect
from consumer.work import Message


def message(message_id: str, receive_count: int = 1) -> Message:
    return Message(message_id, "h", "{}", receive_count, 0.0, 60.0)


def quarantine(s3: Any = None, max_receives: int | None = 3) -> Quarantine:
    return Quarantine(s3=s3, bucket="feats", prefix="v1/", max_receives=max_receives)


class MarkerStore:
    """Just enough of S3 for the markers: put, get (404 when absent), delete."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, **call: Any) -> dict[str, Any]:
        self.objects[call["Key"]] = call["Body"]
        return {}

    def get_object(self, **call: Any) -> dict[str, Any]:
        if call["Key"] not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        return {"Body": io.BytesIO(self.objects[call["Key"]])}

    def delete_object(self, **call: Any) -> dict[str, Any]:
        self.objects.pop(call["Key"], None)
        return {}


def test_the_marker_counts_the_deaths_of_consumers_while_a_message_ran_alone() -> None:
    # GIVEN a suspect that never ran alone, and an empty marker store
    store = MarkerStore()
    q = quarantine(store, max_receives=5)
    suspect = message("poison", receive_count=2)
    assert q.deaths_alone(suspect) == 0

    # WHEN it runs alone and the consumer dies (the marker stays), twice
    q.mark_running(suspect, 0)
    after_one = q.deaths_alone(suspect)
    q.mark_running(suspect, after_one)
    after_two = q.deaths_alone(suspect)

    # THEN each redelivery sees one more death; a settled run removes the marker
    assert (after_one, after_two) == (1, 2)
    assert store.objects == {"v1/_bottleneck/running/poison": b"1"}
    q.unmark(suspect)
    assert q.deaths_alone(suspect) == 0


@pytest.mark.parametrize(
    ("deaths", "receive_count", "max_receives", "convicted"),
    [
        (0, 4, 5, False),  # never died alone: runs alone
        (1, 3, 5, False),  # one death alone may be a Spot reclaim or a SIGKILL: once more
        (2, 4, 5, True),  # twice alone: crashed
        (1, 3, 3, True),  # once alone at its last receive: SQS would move it without a reason
        (1, 5, None, False),  # no redrive policy known: only the second death convicts
    ],
)
def test_crashed_after_two_deaths_alone_or_one_at_the_last_receive(
    deaths: int, receive_count: int, max_receives: int | None, convicted: bool
) -> None:
    q = quarantine(max_receives=max_receives)
    assert q.convicted(message("m", receive_count), deaths) is convicted


def test_a_fresh_start_receives_one_at_a_time_until_a_streak_of_fresh_messages() -> None:
    # GIVEN a worker that just started (it may follow a crash)
    q = quarantine()
    assert q.receive_size(10) == 1

    # WHEN fresh messages keep coming, then a redelivered one
    q.saw([message(str(i)) for i in range(CAREFUL_STREAK)])
    full_after_streak = q.receive_size(10)
    q.saw([message("again", receive_count=2)])

    # THEN it went back to full receives after the streak, and a suspect makes it careful again
    assert full_after_streak == 10
    assert q.receive_size(10) == 1


def test_a_suspect_is_a_message_received_before() -> None:
    assert not is_suspect(message("a", 1))
    assert is_suspect(message("b", 2))


def test_a_suspect_runs_only_when_the_rest_held_is_done_with_or_waiting_its_turn() -> None:
    # GIVEN a suspect about to run, another waiting for its turn, and fresh work still in flight
    q = quarantine()
    running, waiting, fresh = message("s1", 2), message("s2", 2), message("f", 1)
    with q.waiting(waiting):
        # WHEN / THEN the fresh message holds it back while it is held, settled or not (its
        # delete still to come would be lost with the consumer), and no longer once it is gone
        assert not q.only_suspects_waiting([running, waiting, fresh], running)
        fresh.settled = True
        assert not q.only_suspects_waiting([running, waiting, fresh], running)
        assert q.only_suspects_waiting([running, waiting], running)
    # AND a suspect that stopped waiting (it has its turn) holds the next one back
    assert not q.only_suspects_waiting([running, waiting], running)


def test_one_suspect_at_a_time_and_a_stop_ends_the_wait_for_a_turn() -> None:
    # GIVEN one suspect running (it holds the turn)
    q = quarantine()
    stopped = threading.Event()
    assert q.take_turn(stopped)

    # WHEN a second asks for its turn and the worker stops meanwhile
    stopped.set()

    # THEN it gives up instead of waiting forever; once the first ends, a turn is free again
    assert not q.take_turn(stopped)
    q.end_turn()
    assert q.take_turn(threading.Event())


def test_receivers_hold_back_while_a_suspect_waits_or_runs() -> None:
    q = quarantine()
    assert not q.solo_active
    with q.solo(), q.solo():
        assert q.solo_active
    assert not q.solo_active


def test_nothing_comes_while_a_suspect_runs_or_receives_are_serial_and_the_batch_is_told() -> None:
    # GIVEN a fresh worker (careful, not serial) that counts the pauses it announces
    pauses: list[str] = []
    q = Quarantine(
        s3=None,
        bucket="feats",
        prefix="v1/",
        max_receives=3,
        on_pause=lambda: pauses.append("nothing coming" if q.nothing_coming else "?"),
    )
    fresh_start = q.nothing_coming

    # WHEN a suspect runs alone
    with q.solo():
        during_solo = q.nothing_coming
    after_solo = q.nothing_coming
    # AND a suspect is received (serial receives start), then another while serial
    q.saw([message("again", receive_count=2)])
    serial = q.nothing_coming
    q.saw([message("once more", receive_count=3)])
    # AND a streak of fresh messages ends the careful receives
    q.saw([message(str(i)) for i in range(CAREFUL_STREAK)])

    # THEN receiving was paused during the solo run and while serial, each pause announced once
    # and after its state changed (the batch queue's reader checks it when woken)
    assert (fresh_start, during_solo, after_solo, serial) == (False, True, False, True)
    assert not q.nothing_coming
    assert pauses == ["nothing coming", "nothing coming"]


@pytest.mark.parametrize(
    ("max_receives", "receive_count", "may"),
    [
        (3, 2, False),  # a death among others at 2 would leave only a solo run at its last receive
        (5, 2, True),
        (5, 3, True),  # dies among others at 3, alone at 4, convicted as crashed at 5
        (5, 4, False),
        (None, 9, True),  # no redrive policy: SQS never dead-letters it without a reason
    ],
)
def test_a_vouched_redelivery_skips_its_solo_run_only_with_two_receives_left(
    max_receives: int | None, receive_count: int, may: bool
) -> None:
    assert quarantine(max_receives=max_receives).may_vouch(message("m", receive_count)) is may


def test_the_queues_empty_run_is_shared_while_careful_and_ends_with_messages() -> None:
    quarantine = Quarantine(s3=MarkerStore(), bucket="feats", prefix="v1/", max_receives=5)
    assert quarantine.empty_run() is None
    # empty polls, one after another: the run began with the first
    quarantine.polled(10.0, 0)
    quarantine.polled(12.0, 0)
    assert quarantine.empty_run() == 10.0
    # a poll that got messages ends it; the next empty poll starts another
    quarantine.polled(13.0, 1)
    assert quarantine.empty_run() is None
    quarantine.polled(14.0, 0)
    assert quarantine.empty_run() == 14.0
    # once receivers poll in parallel, each speaks for itself
    quarantine.saw([Message(f"m{i}", "h", "{}", 1, 0.0, 60.0) for i in range(CAREFUL_STREAK)])
    assert not quarantine.careful and quarantine.empty_run() is None
