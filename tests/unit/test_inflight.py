"""The in-flight cap's admission: full receives while work flows, no stall on a partial room."""

from __future__ import annotations

import threading
import time

from bottleneck_contract.messages import ImageRef
from consumer.inflight import InFlight
from consumer.work import ImageTask, Message


def _hold(inflight: InFlight, name: str, images: int) -> Message:
    """Register a message with ``images`` unfinished images."""
    now = time.monotonic()
    message = Message(name, f"handle-{name}", "{}", 1, now, now + 60)
    message.images = [
        ImageTask(message=message, ref=ImageRef("images", f"{name}/{i}.jpg")) for i in range(images)
    ]
    assert inflight.register(message)
    return message


def test_a_receive_waits_for_a_full_ten_while_slots_are_freeing() -> None:
    # GIVEN a cap of 48 with 40 images held (8 free), and a receive asking for 10
    inflight = InFlight(48, lambda action: None)
    held = _hold(inflight, "a", 40)
    granted: list[int] = []
    receive = threading.Thread(target=lambda: granted.append(inflight.reserve(10, timeout=30)))
    receive.start()

    # WHEN two images finish while it waits
    time.sleep(0.2)
    assert not granted  # 8 free is not enough while the wait lasts
    inflight.done(held.images[0], "written")
    inflight.done(held.images[1], "written")
    receive.join(timeout=10)

    # THEN it is granted a full receive of 10, not the 8 that were free when it asked
    assert granted == [10]


def test_a_partial_room_is_granted_once_the_wait_is_over() -> None:
    # GIVEN a cap of 48 (a batch of 48) with 40 images held and nothing finishing: the batch
    # can only fill with the last 8
    inflight = InFlight(48, lambda action: None)
    _hold(inflight, "a", 40)

    # WHEN a receive asks for 10 and nothing frees up within its wait
    granted = inflight.reserve(10, timeout=0.05)

    # THEN it gets the 8 there are, and they are reserved
    assert granted == 8
    assert inflight.room() == 0
    assert inflight.reserve(10, timeout=0.01) == 0


def test_concurrent_receives_never_get_the_same_slots() -> None:
    # GIVEN a cap of 15 and nothing held
    inflight = InFlight(15, lambda action: None)

    # WHEN two receivers reserve, and the first has not registered its messages yet
    first = inflight.reserve(10, timeout=0.05)
    second = inflight.reserve(10, timeout=0.05)

    # THEN the second gets only what the first left; unreserving gives the slots back
    assert (first, second) == (10, 5)
    inflight.unreserve(first + second)
    assert inflight.room() == 15


def test_a_waiting_receive_is_woken_only_when_an_image_leaves_it_enough_room() -> None:
    # GIVEN a cap of 48 with 45 images held (3 free), and a receive waiting for 10
    inflight = InFlight(48, lambda action: None)
    held = _hold(inflight, "a", 45)
    wakeups = 0
    notify_all = inflight._cond.notify_all

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        notify_all()

    inflight._cond.notify_all = counted  # type: ignore[method-assign]
    granted: list[int] = []
    receive = threading.Thread(target=lambda: granted.append(inflight.reserve(10, timeout=30)))
    receive.start()
    for _ in range(1000):  # until it waits
        with inflight._cond:
            if inflight._needs:
                break
        time.sleep(0.01)

    # WHEN seven images finish, one by one
    for image in held.images[:7]:
        inflight.done(image, "written")
    receive.join(timeout=10)

    # THEN the six that left it short woke nobody; the seventh (10 free) woke it, once
    assert granted == [10]
    assert wakeups == 1
