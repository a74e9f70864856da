"""The in-flight cap's admission (full receives while work flows, no stall on a partial room),
and which redeliveries the worker can vouch for (copies it holds, messages it released)."""

from __future__ import annotations

import threading
import time

import pytest

from bottleneck_contract.messages import ImageRef
from consumer import inflight as inflight_module
from consumer.errors import Failure
from consumer.inflight import InFlight
from consumer.stages.receive import build_tasks
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


def test_a_second_copy_of_a_suspect_this_worker_holds_stays_a_suspect() -> None:
    # GIVEN a worker holding a suspect (received after a consumer died), and a fresh message
    inflight = InFlight(40, lambda action: None)
    held_suspect = Message("s", "h1", "{}", 2, 0.0, 300.0)
    fresh = Message("f", "h1", "{}", 1, 0.0, 300.0)
    inflight.register(held_suspect)  # no images: settled at once, held until acknowledged
    inflight.register(fresh)

    # WHEN each comes again, and a message this worker never held comes with count 2
    again_suspect = Message("s", "h2", "{}", 3, 0.0, 300.0)
    again_fresh = Message("f", "h2", "{}", 2, 0.0, 300.0)
    never_held = Message("n", "h2", "{}", 2, 0.0, 300.0)

    # THEN only the copy of a message that ran with others is vouched for: the others are
    # evidence of a consumer that died (the held copy is not a copy of itself)
    assert [inflight.vouches_for(m) for m in (again_suspect, again_fresh, never_held)] == [
        False,
        True,
        False,
    ]
    assert not inflight.vouches_for(fresh)


def _release(
    inflight: InFlight, message_id: str, receive_count: int, code: str = "throttled"
) -> None:
    """Receive, fail transiently (throttling, unless ``code`` says otherwise) and release a
    one-image message."""
    message = Message(message_id, "h1", '{"bucket": "b", "key": "k"}', receive_count, 0.0, 300.0)
    build_tasks(message, "v1/")
    assert inflight.register(message)
    inflight.failed(message.images[0], Failure(code, "transient", permanent=False))
    inflight.forget(message)  # the acker released it


def test_a_message_this_worker_released_comes_back_vouched_for_once_and_only_by_it() -> None:
    # GIVEN a worker that released three messages after transient failures (throttling): two
    # that ran with others, one that was a suspect running alone
    inflight = InFlight(40, lambda action: None)
    for message_id, count in (("a", 1), ("b", 1), ("s", 2)):
        _release(inflight, message_id, count)

    # WHEN they come back: "a" with its count one higher, "b" two higher (another consumer
    # received it in between, and may have died with it), "s" one higher
    again = [
        Message("a", "h2", "{}", 2, 0.0, 300.0),
        Message("b", "h2", "{}", 3, 0.0, 300.0),
        Message("s", "h2", "{}", 3, 0.0, 300.0),
    ]

    # THEN only "a" is vouched for: "s" had not proven itself (its failure may have come before
    # its decode), "b" went through another consumer's hands
    assert [inflight.vouches_for(m) for m in again] == [True, False, False]


def test_the_memory_of_releases_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a worker that remembers two releases
    monkeypatch.setattr(inflight_module, "RELEASES_REMEMBERED", 2)
    inflight = InFlight(40, lambda action: None)

    # WHEN it releases three messages
    for message_id in ("first", "second", "third"):
        _release(inflight, message_id, 1)

    # THEN the oldest is forgotten (it would come back as a suspect), the others are not
    back = [Message(m, "h2", "{}", 2, 0.0, 300.0) for m in ("first", "second", "third")]
    assert [inflight.vouches_for(m) for m in back] == [False, True, True]


def test_a_release_after_trouble_in_the_consumer_itself_or_on_a_stop_is_not_remembered() -> None:
    # GIVEN a worker that released one message after throttling, one after a MemoryError in
    # this process, one after an exception nobody expected, then one as it stopped
    inflight = InFlight(40, lambda action: None)
    _release(inflight, "throttled", 1)
    _release(inflight, "oom", 1, code="out-of-memory")
    _release(inflight, "bug", 1, code="internal")
    held = Message("stopping", "h1", '{"bucket": "b", "key": "k"}', 1, 0.0, 300.0)
    build_tasks(held, "v1/")
    assert inflight.register(held)
    # Its last image resolves just as the stop begins (before release_unfinished settles the
    # rest): its release then hands it to other workers at once.
    inflight.stopping = True
    inflight.failed(held.images[0], Failure("stopping", "decoding stopped", permanent=False))
    inflight.forget(held)

    # WHEN each comes back with its count one higher
    back = [Message(m, "h2", "{}", 2, 0.0, 300.0) for m in ("throttled", "oom", "bug", "stopping")]

    # THEN only the throttled one is vouched for: the out-of-memory and the unexpected failure
    # may be the consumer's own danger, and a stop's release says nothing about the image
    assert [inflight.vouches_for(m) for m in back] == [True, False, False, False]
