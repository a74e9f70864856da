"""Decode processes: exactly the thread path's pixels, and a crash costs one image, not the pool."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import consumer.decode_pool
from consumer.decode import DecodeLimits
from consumer.decode_pool import ChildSpec, DecodeProcesses
from consumer.errors import PermanentError, TransientError
from consumer.preprocess import ImagePreparer, InputSpec
from tests.corpus import BAD_CASES, GOOD_CASES, photo_jpeg
from tests.crash_hook import ABORT, HANG, SEGFAULT, mark

SPEC = InputSpec((3, 64, 64), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875, "center")
LIMITS = DecodeLimits(max_pixels=50_000_000)


def child_spec(memory_bytes: int = 1 << 30, hook: str = "") -> ChildSpec:
    return ChildSpec(
        SPEC.input_size,
        SPEC.interpolation,
        SPEC.mean,
        SPEC.std,
        SPEC.crop_pct,
        SPEC.crop_mode,
        LIMITS,
        draft=False,
        memory_bytes=memory_bytes,
        hook=hook,
        consumer_pid=os.getpid(),
    )


@pytest.fixture
def pool() -> Iterator[DecodeProcesses]:
    processes = DecodeProcesses(child_spec(hook="tests.crash_hook:crash_on_marked"), workers=2)
    yield processes
    processes.close()


def test_the_pixels_are_the_thread_paths_exactly(pool: DecodeProcesses) -> None:
    # GIVEN the in-process preparer for the same settings
    exact = ImagePreparer(SPEC, LIMITS)

    # WHEN every accepted kind of image is decoded by the processes
    for name, data in sorted(GOOD_CASES.items()):
        # THEN the pixels are identical
        assert np.array_equal(pool(data), exact(data)), name


def _ran_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0])


def test_one_image_at_a_time_goes_to_the_child_that_decoded_last(pool: DecodeProcesses) -> None:
    # GIVEN two idle children, each having decoded once (so both are warm)
    data = photo_jpeg(1200, 900, seed=3)
    with ThreadPoolExecutor(2) as both:
        list(both.map(pool, [data, data]))
    before = {pid: _ran_ns(pid) for pid in pool.pids}

    # WHEN images come one at a time (fewer than there are children)
    for _ in range(12):
        pool(data)

    # THEN one child decoded them all, its caches warm, not each in turn
    ran = sorted(_ran_ns(pid) - start for pid, start in before.items())
    assert ran[-1] > 0.9 * sum(ran), ran


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="glibc's malloc only"
)
def test_a_child_reuses_what_one_image_frees_for_the_next(pool: DecodeProcesses) -> None:
    # GIVEN a child that has decoded a 2000x1500 photo (one image at a time: always that child)
    data = photo_jpeg(2000, 1500, seed=5)
    pool(data)
    before = {pid: _minor_faults(pid) for pid in pool.pids}

    # WHEN it decodes six more of that size
    for _ in range(6):
        pool(data)

    # THEN it took next to no fresh pages from the kernel: glibc's malloc, left to itself, kept
    # giving an image's 12 MB back and faulting it in again (11,500 to 18,000 page faults over
    # these six; with the child keeping what it frees, 140 to 290)
    faults = sum(_minor_faults(pid) - start for pid, start in before.items())
    assert faults < 1_800, faults


def test_bad_inputs_keep_their_own_error_codes(pool: DecodeProcesses) -> None:
    for name, (data, code) in sorted(BAD_CASES.items()):
        with pytest.raises(PermanentError) as caught:
            pool(data)
        assert caught.value.error_code == code, name


@pytest.mark.parametrize("marker", [SEGFAULT, ABORT], ids=["segfault", "abort"])
def test_a_crashing_decode_fails_that_image_alone_and_the_pool_goes_on(
    pool: DecodeProcesses, marker: bytes
) -> None:
    # GIVEN 12 good images and 2 that crash the decoder, decoded from 2 threads at once
    good = [photo_jpeg(90, 60, seed=i) for i in range(12)]
    poison = [mark(photo_jpeg(90, 60, seed=100 + i), marker) for i in range(2)]
    before = set(pool.pids)

    def attempt(data: bytes) -> str:
        try:
            pool(data)
        except PermanentError as exc:
            return exc.error_code
        return "ok"

    # WHEN they are all decoded
    with ThreadPoolExecutor(2) as threads:
        outcomes = list(threads.map(attempt, [*good[:6], *poison, *good[6:]]))

    # THEN each poison image fails alone with decoder-crashed, every good one decodes, the
    # dead children were replaced, and the pool still decodes afterwards
    assert outcomes == ["ok"] * 6 + ["decoder-crashed"] * 2 + ["ok"] * 6
    assert len(pool.pids) == 2 and set(pool.pids) != before
    assert pool(good[0]).shape == (64, 64, 3)


def test_an_image_needing_more_memory_than_the_limit_is_too_large() -> None:
    # GIVEN decode processes capped at 64 MiB over their start-up size, and a 6000x6000 JPEG
    # (108 MB of RGB once decoded: within --max-pixels, beyond the memory cap)
    pool = DecodeProcesses(child_spec(memory_bytes=64 << 20), workers=1)
    try:
        big = photo_jpeg(6000, 6000, seed=1, quality=50)

        # WHEN it is decoded
        with pytest.raises(PermanentError) as caught:
            pool(big)

        # THEN it fails as too-large instead of taking the process down, and a normal image
        # still decodes in the same child
        assert caught.value.error_code == "too-large"
        assert pool(photo_jpeg(90, 60)).shape == (64, 64, 3)
    finally:
        pool.close()


@pytest.mark.timeout(60)  # without the read's time limit the call would wait an hour
def test_a_decode_that_hangs_is_killed_and_fails_that_image_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN one decode process that gives up on an image after 1 s, and an image that hangs it
    monkeypatch.setattr(consumer.decode_pool, "DECODE_TIMEOUT_S", 1.0)
    pool = DecodeProcesses(child_spec(hook="tests.crash_hook:crash_on_marked"), workers=1)
    try:
        hung = pool.pids[0]

        # WHEN the image is decoded
        with pytest.raises(PermanentError) as caught:
            pool(mark(photo_jpeg(90, 60, seed=3), HANG))

        # THEN it fails alone as decoder-crashed, saying it hung, the stuck process is gone, and
        # a new one decodes the next image
        assert caught.value.error_code == "decoder-crashed"
        assert "hung for more than 1 s" in caught.value.detail
        assert pool(photo_jpeg(90, 60, seed=4)).shape == (64, 64, 3)
        assert pool.pids != [hung] and not os.path.exists(f"/proc/{hung}/status")
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_close_stops_a_busy_child_and_every_caller_waiting_for_one() -> None:
    # GIVEN one decode process stuck on an image, and five more callers waiting for it
    before = set(multiprocessing.active_children())
    pool = DecodeProcesses(child_spec(hook="tests.crash_hook:crash_on_marked"), workers=1)
    outcomes: list[str] = []

    def attempt(data: bytes) -> None:
        try:
            pool(data)
            outcomes.append("ok")
        except TransientError as exc:
            outcomes.append(exc.error_code)

    stuck = threading.Thread(target=attempt, args=(mark(photo_jpeg(90, 60), HANG),))
    stuck.start()
    while not any(child.busy for child in pool._children):
        threading.Event().wait(0.01)
    waiting = [
        threading.Thread(target=attempt, args=(photo_jpeg(90, 60, seed=i),)) for i in range(5)
    ]
    for thread in waiting:
        thread.start()

    # WHEN the pool is closed (the worker stopping)
    pool.close()
    for thread in [stuck, *waiting]:
        thread.join(timeout=20)

    # THEN every caller returns, told decoding stopped (not that its image is bad), and no
    # decode process is left running
    assert not any(thread.is_alive() for thread in [stuck, *waiting])
    assert outcomes == ["stopping"] * 6
    assert set(multiprocessing.active_children()) <= before


def test_a_child_started_as_the_pool_closes_is_stopped_not_left_running() -> None:
    # GIVEN a closed pool
    before = set(multiprocessing.active_children())
    pool = DecodeProcesses(child_spec(), workers=1)
    pool.close()

    # WHEN a caller that was replacing a crashed child starts its replacement
    with pytest.raises(TransientError) as caught:
        pool._spawn(busy=True)

    # THEN it is told decoding stopped, and the new process was stopped, not left to run on
    assert caught.value.error_code == "stopping"
    assert set(multiprocessing.active_children()) <= before and pool.pids == []
