"""The load stage: which thread decodes, what a fetched image holds on its way, and the budget
that bounds the encoded bytes held at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from bottleneck_contract.messages import ImageRef
from consumer.batch_queue import BatchQueue
from consumer.byte_budget import ByteBudget
from consumer.decode import DecodeLimits
from consumer.errors import TransientError
from consumer.inflight import InFlight
from consumer.objects import Fetched, SizeCallback
from consumer.stages.load import Loader
from consumer.stats import Stats
from consumer.work import ImageTask, Message


class Objects:
    name = "fake"

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        if on_size is not None:
            on_size(len(key.encode()))
        return Fetched(data=key.encode(), etag="e")


class RecordingPreparer:
    """Records the thread each decode ran on and the encoded bytes held at that moment."""

    limits = DecodeLimits()

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return np.full((2, 2, 3), len(data), np.uint8)


def loader(
    prepare: RecordingPreparer,
    out: BatchQueue[ImageTask],
    *,
    inline: bool,
    objects: object | None = None,
    budget: ByteBudget | None = None,
    on_device: bool = False,
) -> Loader:
    return Loader(
        s3=objects or Objects(),  # type: ignore[arg-type]
        inflight=InFlight(64, on_settle=lambda action: None),
        out=out,
        stats=Stats(),
        halted=threading.Event(),
        prepare=prepare,
        fetch_concurrency=4,
        decode_threads=2,
        output_bucket="features",
        fingerprint="f",
        head_first=False,
        decode_inline=inline,
        decode_on_device=on_device,
        budget=budget,
    )


def task(key: str, size: int | None = None) -> ImageTask:
    message = Message("m-" + key, "r", "{}", 1, time.monotonic(), time.monotonic() + 60)
    ref = ImageRef("images", key, size=size)
    return ImageTask(message=message, ref=ref, output_key=key + ".npy")


@pytest.mark.parametrize(("inline", "thread"), [(True, "fetch"), (False, "decode")])
def test_decode_runs_on_the_fetching_thread_only_when_inline(inline: bool, thread: str) -> None:
    # GIVEN a loader whose preparer is (inline) or is not (a thread pool's) a process pool
    prepare = RecordingPreparer()
    out: BatchQueue[ImageTask] = BatchQueue(16)
    load = loader(prepare, out, inline=inline)

    # WHEN eight images are loaded
    for i in range(8):
        load.submit(task(f"k{i}"))
    got = out.take(8, max_wait=10.0, first_wait=10.0)
    load.shutdown()

    # THEN each reaches the batch queue decoded, its encoded bytes let go, and every decode ran
    # on a fetch thread when inline (no second hand-off), on a decode thread otherwise
    assert sorted(t.ref.key for t in got) == [f"k{i}" for i in range(8)]
    assert all(t.pixels is not None and t.data is None for t in got)
    assert {name.split("_")[0] for name in prepare.threads} == {thread}


def test_an_image_whose_decoders_stopped_with_the_worker_is_left_for_the_release() -> None:
    # GIVEN decode processes that the stopping worker closes while an image waits for one
    halted = threading.Event()

    class Stopped(RecordingPreparer):
        def __call__(self, data: bytes) -> np.ndarray:
            halted.set()
            raise TransientError("stopping", "decoding stopped with the worker")

    out: BatchQueue[ImageTask] = BatchQueue(16)
    load = loader(Stopped(), out, inline=True)
    load.halted = halted
    image = task("k")
    image.data = b"encoded"

    # WHEN the fetch thread's decode fails that way
    load._decode(image)

    # THEN it is not counted as a failed image nor resolved: the release owns its message
    assert load.stats.summary()["images_failed"] == 0
    assert image.failure is None and image.outcome is None
    assert out.take(1, max_wait=0.0, first_wait=0.0) == []


class SizedObjects:
    """Objects of given sizes; records each GET sent and each body read, and fails those named
    in ``failing``. ``tells_size``: the size goes to ``on_size`` between the two, as the real
    clients do once the headers are in."""

    name = "fake"

    def __init__(
        self, sizes: dict[str, int], failing: frozenset[str] = frozenset(), tells_size: bool = True
    ) -> None:
        self.sizes = sizes
        self.failing = failing
        self.tells_size = tells_size
        self.gets: list[str] = []
        self.bodies: list[str] = []
        self._lock = threading.Lock()

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        with self._lock:
            self.gets.append(key)
        if key in self.failing:
            raise TransientError("aws-unavailable", "503")
        if on_size is not None and self.tells_size:
            on_size(self.sizes[key])
        with self._lock:
            self.bodies.append(key)
        return Fetched(data=b"x" * self.sizes[key], etag="e")


class BlockedPreparer(RecordingPreparer):
    """Decodes only once released; records the budget held as each decode starts."""

    def __init__(self, budget: ByteBudget) -> None:
        super().__init__()
        self.budget = budget
        self.release = threading.Event()
        self.held_at_start: list[int] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.held_at_start.append(self.budget.held)
        assert self.release.wait(10)
        return super().__call__(data)


@dataclass
class Budgeted:
    """A loader whose fetches take from ``budget``, over objects of given sizes."""

    budget: ByteBudget
    prepare: BlockedPreparer
    objects: SizedObjects
    out: BatchQueue[ImageTask]
    load: Loader


def budgeted(
    capacity: int,
    sizes: dict[str, int],
    *,
    failing: frozenset[str] = frozenset(),
    blocked: bool = True,
    on_device: bool = False,
    tells_size: bool = True,
) -> Budgeted:
    """``blocked``: decodes wait for ``prepare.release``; otherwise they finish at once."""
    budget = ByteBudget(capacity)
    prepare = BlockedPreparer(budget)
    if not blocked:
        prepare.release.set()
    objects = SizedObjects(sizes, failing, tells_size)
    out: BatchQueue[ImageTask] = BatchQueue(16)
    load = loader(
        prepare, out, inline=not on_device, objects=objects, budget=budget, on_device=on_device
    )
    return Budgeted(budget, prepare, objects, out, load)


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_fetches_wait_before_their_get_while_the_budget_is_held_by_undecoded_images() -> None:
    # GIVEN a budget of 100 bytes, four fetch threads, decodes that do not finish yet, and six
    # images of 40 bytes whose messages name their sizes
    b = budgeted(100, {f"k{i}": 40 for i in range(6)})
    budget, prepare, objects, out, load = b.budget, b.prepare, b.objects, b.out, b.load

    # WHEN all six are submitted
    for i in range(6):
        load.submit(task(f"k{i}", size=40))

    # THEN only two are fetched (80 bytes held: a third would pass 100) until decodes finish;
    # then all six are, and every byte comes back
    wait_until(lambda: len(prepare.held_at_start) == 2)
    time.sleep(0.1)
    assert len(objects.gets) == 2 and budget.held == 80
    prepare.release.set()
    got = out.take(6, max_wait=10.0, first_wait=10.0)
    load.shutdown()
    assert len(got) == 6 and len(objects.gets) == 6
    assert max(prepare.held_at_start) <= 100
    assert budget.held == 0


def test_with_decode_on_the_device_the_bytes_are_held_until_the_image_is_resolved() -> None:
    # GIVEN --decode cuda's path (encoded bytes to the batch queue) and a budget of 100 bytes
    b = budgeted(100, {f"k{i}": 40 for i in range(3)}, on_device=True)
    budget, objects, out, load = b.budget, b.objects, b.out, b.load

    # WHEN three images of 40 bytes are submitted
    for i in range(3):
        load.submit(task(f"k{i}", size=40))
    queued = out.take(2, max_wait=10.0, first_wait=10.0)

    # THEN two wait in the queue with their bytes and the third waits for the budget, until one
    # of the two is resolved (as the inference thread does once the batch's features are back)
    time.sleep(0.1)
    assert len(queued) == 2 and all(t.data for t in queued)
    assert len(objects.gets) == 2 and budget.held == 80
    load.inflight.done(queued[0], "written")
    third = out.take(1, max_wait=10.0, first_wait=10.0)
    load.shutdown()
    assert len(third) == 1 and budget.held == 80
    assert queued[0].data is None


def test_a_message_without_a_size_waits_for_the_budget_with_its_body_unread() -> None:
    # GIVEN a budget of 100 bytes, four fetch threads, decodes that do not finish yet, and six
    # images of 40 bytes whose messages name no size
    b = budgeted(100, {f"k{i}": 40 for i in range(6)})
    budget, prepare, objects, out, load = b.budget, b.prepare, b.objects, b.out, b.load

    # WHEN all six are submitted
    for i in range(6):
        load.submit(task(f"k{i}"))

    # THEN four GETs are sent (one a thread), but only two bodies are read (80 bytes held: a
    # third would pass 100); the other two wait for the budget with no GET open, until decodes
    # finish; then each is fetched again and read once, and every byte comes back
    wait_until(lambda: len(prepare.held_at_start) == 2 and len(budget._line) == 2)
    assert len(objects.bodies) == 2 and len(objects.gets) == 4
    assert budget.held == 80
    prepare.release.set()
    got = out.take(6, max_wait=10.0, first_wait=10.0)
    load.shutdown()
    assert len(got) == 6 and sorted(objects.bodies) == [f"k{i}" for i in range(6)]
    assert max(prepare.held_at_start) <= 100
    assert budget.held == 0


def test_an_object_larger_than_its_message_said_waits_for_its_real_size() -> None:
    # GIVEN a budget of 100 bytes, 80 of it held by an undecoded image, and a message that
    # names 10 bytes for an object replaced since by one of 30
    b = budgeted(100, {"first": 80, "replaced": 30})
    budget, prepare, objects, out, load = b.budget, b.prepare, b.objects, b.out, b.load
    load.submit(task("first", size=80))
    wait_until(lambda: len(prepare.held_at_start) == 1)

    # WHEN it is loaded
    replaced = task("replaced", size=10)
    load.submit(replaced)

    # THEN its GET is sent on the 10 bytes named, but its body is left unread and it waits,
    # holding nothing, until its 30 bytes fit; then it is fetched again and holds exactly
    # those, and everything comes back at the end
    wait_until(lambda: objects.gets == ["first", "replaced"] and len(budget._line) == 1)
    assert objects.bodies == ["first"] and budget.held == 80 and replaced.budget is None
    prepare.release.set()
    got = out.take(2, max_wait=10.0, first_wait=10.0)
    load.shutdown()
    assert objects.gets == ["first", "replaced", "replaced"]
    assert objects.bodies == ["first", "replaced"]
    assert prepare.held_at_start == [80, 30]
    assert len(got) == 2 and budget.held == 0


def test_a_client_that_tells_no_size_before_the_body_holds_the_bytes_as_fetched() -> None:
    # GIVEN a client that never calls on_size, and a message that names no size
    b = budgeted(1000, {"untold": 25}, tells_size=False)
    budget, prepare, out, load = b.budget, b.prepare, b.out, b.load

    # WHEN it is loaded
    load.submit(task("untold"))
    wait_until(lambda: len(prepare.held_at_start) == 1)
    prepare.release.set()
    assert out.take(1, max_wait=10.0, first_wait=10.0)
    load.shutdown()

    # THEN it held its size while it waited for its decode, and gave it all back
    assert prepare.held_at_start == [25]
    assert budget.held == 0


def test_an_image_that_fails_gives_its_bytes_back() -> None:
    # GIVEN a budget, and a GET that fails after the named size was taken
    b = budgeted(100, {"bad": 60, "good": 60}, failing=frozenset({"bad"}), blocked=False)
    budget, out, load = b.budget, b.out, b.load

    # WHEN it is loaded, then another that would not fit beside it
    bad = task("bad", size=60)
    load.submit(bad)
    wait_until(lambda: bad.failure is not None)
    load.submit(task("good", size=60))
    got = out.take(1, max_wait=10.0, first_wait=10.0)
    load.shutdown()

    # THEN the failure gave the budget back, and the other went through
    assert bad.failure is not None and bad.failure.error_code == "aws-unavailable"
    assert [t.ref.key for t in got] == ["good"]
    assert budget.held == 0


@pytest.mark.parametrize("named", [True, False], ids=["size-named", "size-from-headers"])
def test_a_fetch_waiting_for_the_budget_gives_up_without_its_body_when_the_worker_stops(
    named: bool,
) -> None:
    # GIVEN a spent budget (an undecoded image holds it) and a second image waiting for it:
    # before its GET where its message names its size, else with its body unread
    b = budgeted(100, {"first": 100, "second": 50})
    budget, prepare, objects, load = b.budget, b.prepare, b.objects, b.load
    load.submit(task("first", size=100))
    wait_until(lambda: len(prepare.held_at_start) == 1)
    second = task("second", size=50 if named else None)
    load.submit(second)
    wait_until(lambda: len(budget._line) == 1)

    # WHEN the worker halts and the loader shuts down (and the first decode then ends)
    load.halted.set()
    load.shutdown()
    prepare.release.set()
    load.fetch_pool.shutdown(wait=True)

    # THEN the waiting image's body was never read, nor did it fail (the release owns its
    # message), and it holds no bytes of the budget
    assert objects.bodies == ["first"]
    assert objects.gets == (["first"] if named else ["first", "second"])
    assert second.failure is None and second.outcome is None
    assert second.budget is None and budget.held == 0
