"""The stages' fire-and-forget thread pools: limits, reuse, shutdown, failures, interpreter exit."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from consumer.task_threads import TaskThreads


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_runs_every_task_with_its_arguments_on_threads_named_for_the_stage() -> None:
    pool = TaskThreads(4, "fetch")
    seen: list[tuple[int, str, str]] = []
    lock = threading.Lock()

    def task(number: int, word: str) -> None:
        with lock:
            seen.append((number, word, threading.current_thread().name))

    for number in range(50):
        pool.submit(task, number, "x")
    pool.shutdown(wait=True)
    assert sorted(n for n, _, _ in seen) == list(range(50))
    assert {word for _, word, _ in seen} == {"x"}
    assert {name for _, _, name in seen} <= {f"fetch_{i}" for i in range(4)}


def test_an_idle_thread_takes_the_next_task_instead_of_a_new_one() -> None:
    pool = TaskThreads(8, "write")
    done = threading.Event()
    for _ in range(5):
        done.clear()
        pool.submit(done.set)
        assert done.wait(5)
        # The thread counts itself idle just after its task returns.
        _wait_until(lambda: pool._crew.idle == 1)
    assert pool.threads == 1
    pool.shutdown(wait=True)


def test_no_more_threads_than_the_limit_and_the_rest_wait_their_turn() -> None:
    pool = TaskThreads(3, "fetch")
    release = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def task(number: int) -> None:
        with lock:
            started.append(number)
        release.wait(10)

    for number in range(7):
        pool.submit(task, number)
    _wait_until(lambda: len(started) == 3)
    time.sleep(0.05)
    assert len(started) == 3 and pool.threads == 3
    release.set()
    pool.shutdown(wait=True)
    assert sorted(started) == list(range(7))


def test_shutdown_can_drop_what_has_not_started_and_refuses_more() -> None:
    pool = TaskThreads(1, "fetch")
    release = threading.Event()
    ran: list[int] = []

    def task(number: int) -> None:
        ran.append(number)
        release.wait(10)

    for number in range(4):
        pool.submit(task, number)
    _wait_until(lambda: ran == [0])
    pool.shutdown(wait=False, cancel_pending=True)
    with pytest.raises(RuntimeError, match="fetch threads are shut down"):
        pool.submit(task, 9)
    release.set()
    pool.shutdown(wait=True)
    assert ran == [0]  # the one under way finished; the three queued never ran


def test_a_task_that_raises_is_logged_and_its_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = TaskThreads(1, "write")

    def broken() -> None:
        raise ValueError("boom")

    after = threading.Event()
    with caplog.at_level(logging.ERROR, logger="consumer.task_threads"):
        pool.submit(broken)
        pool.submit(after.set)
        assert after.wait(5)
    pool.shutdown(wait=True)
    [record] = [r for r in caplog.records if r.name == "consumer.task_threads"]
    assert record.getMessage() == "a task raised"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert record.fields["task"].endswith("<locals>.broken")  # type: ignore[attr-defined]
    assert pool.threads == 1


def test_a_pool_dropped_without_shutdown_stops_its_threads() -> None:
    pool = TaskThreads(2, "fetch")
    done = threading.Event()
    pool.submit(done.set)
    assert done.wait(5)
    [thread] = pool._crew.threads
    del pool
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_refuses_a_pool_without_threads() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        TaskThreads(0, "fetch")


def test_many_submitters_never_start_more_threads_than_the_limit() -> None:
    pool = TaskThreads(3, "fetch")
    ran: list[int] = []
    lock = threading.Lock()

    def task(number: int) -> None:
        with lock:
            ran.append(number)

    def feed(first: int) -> None:
        for number in range(first, first + 200):
            pool.submit(task, number)

    feeders = [threading.Thread(target=feed, args=(i * 200,)) for i in range(8)]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join()
    pool.shutdown(wait=True)
    assert sorted(ran) == list(range(1600))
    assert 1 <= pool.threads <= 3


def test_threads_are_daemons_when_their_submitter_is_as_the_executors_are() -> None:
    # The consumer's stages submit from daemon threads (receivers, inference): the pools' threads
    # were daemons under ThreadPoolExecutor and stay so; from the main thread they are not.
    flags: dict[str, bool] = {}

    def record(key: str) -> None:
        flags[key] = threading.current_thread().daemon

    ours, theirs = TaskThreads(2, "fetch"), ThreadPoolExecutor(2)

    def submit_both(suffix: str) -> None:
        ours.submit(record, "ours" + suffix)
        theirs.submit(record, "theirs" + suffix).result(5)

    daemon = threading.Thread(target=submit_both, args=(" from a daemon",), daemon=True)
    daemon.start()
    daemon.join(5)
    ours.shutdown(wait=True)
    theirs.shutdown(wait=True)
    assert flags == {"ours from a daemon": True, "theirs from a daemon": True}

    ours, theirs = TaskThreads(2, "fetch"), ThreadPoolExecutor(2)
    submit_both(" from main")
    ours.shutdown(wait=True)
    theirs.shutdown(wait=True)
    assert flags["ours from main"] is False and flags["theirs from main"] is False


def test_the_interpreter_exits_after_the_tasks_under_way_and_leaves_idle_threads() -> None:
    # Never shut down, submitted from the main thread: one thread busy at exit, one idle. The
    # busy task finishes (a GET or a PUT is not cut off in native code), the idle thread does not
    # hold the exit, and a task submitted after the exit hook is refused.
    script = textwrap.dedent(
        """
        import atexit, threading
        from consumer.task_threads import TaskThreads
        keep = TaskThreads(2, "write")
        started, go = threading.Event(), threading.Event()
        def slow():
            started.set()
            go.wait(10)
            print("finished", flush=True)
        def late():
            try:
                keep.submit(print, "ran late")
            except RuntimeError as exc:
                print("refused:", exc, flush=True)
        atexit.register(late)
        keep.submit(slow)
        started.wait(10)
        keep.submit(lambda: None)
        print("main done", flush=True)
        go.set()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "main done",
        "finished",
        "refused: the write threads are shut down",
    ]
