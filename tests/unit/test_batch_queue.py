"""The decoders' hand-off to the inference thread: a batch at a time, one wake-up per batch."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from consumer.batch_queue import BatchQueue

# Generous bounds for a reader or writer that must finish: a hang fails the test, a slow machine
# does not. No test asserts how fast anything is.
LIVENESS_S = 10.0


class CountingQueue(BatchQueue[int]):
    """Counts how often writers woke the reader."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.wakeups = 0
        notify = self._ready.notify

        def counted(n: int = 1) -> None:
            self.wakeups += 1
            notify(n)

        self._ready.notify = counted  # type: ignore[method-assign]


def start_reader(q: BatchQueue[int], **take: Any) -> tuple[threading.Thread, list[list[int]]]:
    got: list[list[int]] = []
    thread = threading.Thread(target=lambda: got.append(q.take(**take)), daemon=True)
    thread.start()
    return thread, got


def wait_until_reader_waits(q: BatchQueue[int], wanted: int) -> None:
    waited = threading.Event()
    for _ in range(int(LIVENESS_S / 0.01)):
        with q._lock:
            if q._wanted == wanted:
                return
        waited.wait(0.01)
    raise AssertionError(f"the reader never waited for {wanted} items")


def test_a_reader_waiting_for_a_batch_is_woken_once_by_the_put_that_fills_it() -> None:
    # GIVEN a reader that has its first item and waits (up to a minute) for a batch of 4
    q = CountingQueue(maxsize=8)
    q.put(0, timeout=0)
    reader, got = start_reader(q, max_items=4, max_wait=60.0, first_wait=1.0)
    wait_until_reader_waits(q, 4)

    # WHEN two more items come, then the fourth
    q.put(1, timeout=0)
    q.put(2, timeout=0)
    reader.join(timeout=0.2)
    still_waiting = reader.is_alive()
    q.put(3, timeout=0)
    reader.join(timeout=LIVENESS_S)

    # THEN it went on waiting through the first two and was woken once, by the fourth, and took
    # the four in order
    assert still_waiting
    assert got == [[0, 1, 2, 3]]
    assert q.wakeups == 1


def test_an_empty_queue_gives_nothing_after_the_first_wait() -> None:
    q: BatchQueue[int] = BatchQueue(maxsize=4)
    assert q.take(max_items=4, max_wait=60.0, first_wait=0.01) == []


def test_a_partial_batch_is_taken_when_its_wait_is_over() -> None:
    q: BatchQueue[int] = BatchQueue(maxsize=4)
    q.put(7, timeout=0)
    assert q.take(max_items=4, max_wait=0.01, first_wait=0.0) == [7]
    assert q.take(max_items=4, max_wait=0.0, first_wait=0.0) == []


def test_a_wake_after_a_stop_reason_is_set_ends_the_wait_with_what_is_there() -> None:
    # GIVEN a reader with one item, waiting up to a minute for 4, and a stop reason it checks
    q: BatchQueue[int] = BatchQueue(maxsize=8)
    stop = threading.Event()
    q.put(0, timeout=0)
    reader, got = start_reader(q, max_items=4, max_wait=60.0, first_wait=1.0, closing=stop.is_set)
    wait_until_reader_waits(q, 4)

    # WHEN a wake comes without the reason, then the reason is set and the queue woken
    q.wake()
    reader.join(timeout=0.2)
    woken_without_reason = reader.is_alive()
    stop.set()
    q.wake()
    reader.join(timeout=LIVENESS_S)

    # THEN the first wake left it waiting; the second ended the wait with the one item
    assert woken_without_reason
    assert got == [[0]]


def test_a_closing_reader_takes_what_is_there_without_waiting() -> None:
    q: BatchQueue[int] = BatchQueue(maxsize=8)
    for i in range(3):
        q.put(i, timeout=0)
    assert q.take(max_items=4, max_wait=60.0, first_wait=1.0, closing=lambda: True) == [0, 1, 2]


def test_a_wake_ends_the_wait_for_a_first_item() -> None:
    # A halted worker's inference thread must not sit out its first wait.
    q: BatchQueue[int] = BatchQueue(maxsize=4)
    reader, got = start_reader(q, max_items=4, max_wait=60.0, first_wait=60.0)
    wait_until_reader_waits(q, 1)
    q.wake()
    reader.join(timeout=LIVENESS_S)
    assert got == [[]]


def test_a_full_queue_refuses_after_the_timeout_and_takes_once_a_batch_leaves() -> None:
    # GIVEN a full queue
    q: BatchQueue[int] = BatchQueue(maxsize=2)
    assert q.put(0, timeout=0) and q.put(1, timeout=0)

    # WHEN a writer tries with a short timeout, and another waits while the reader takes
    refused = not q.put(2, timeout=0.01)
    accepted: list[bool] = []
    writer = threading.Thread(target=lambda: accepted.append(q.put(3, timeout=LIVENESS_S)))
    writer.start()
    batch = q.take(max_items=2, max_wait=0.0, first_wait=0.0)
    writer.join(timeout=LIVENESS_S)

    # THEN the first was refused, the second got in as soon as there was room
    assert refused
    assert batch == [0, 1]
    assert accepted == [True]
    assert q.take(max_items=2, max_wait=0.0, first_wait=0.0) == [3]


def test_a_queue_needs_room_for_one() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        BatchQueue(0)
