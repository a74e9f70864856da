"""The receiver's accounting when a stop arrives while a receive is under way."""

from __future__ import annotations

import threading
from typing import Any

from consumer.inflight import InFlight
from consumer.stages.receive import Receiver
from consumer.stats import Stats
from consumer.work import Message


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
        stop=stop,
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
