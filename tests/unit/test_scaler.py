"""The scaler's arithmetic and job naming: pure functions, no AWS."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bottleneck_contract.retry import Backoff
from producer_lambda.backoff import call_with_backoff, is_throttling
from producer_lambda.scaler import (
    ActiveJob,
    Backlog,
    Plan,
    choose_surplus,
    desired_jobs,
    job_name,
    plan,
    surplus,
)
from tests.fake_batch import throttled

# (visible, in flight, delayed, active, max_jobs, messages_per_job) -> (desired, submit)
CASES = [
    # nothing waits: no jobs wanted, none submitted
    ((0, 0, 0), 0, 4, 100, 0, 0),
    ((0, 0, 0), 3, 4, 100, 0, 0),
    # one message is enough for one job
    ((1, 0, 0), 0, 4, 100, 1, 1),
    ((0, 1, 0), 0, 4, 100, 1, 1),
    ((0, 0, 1), 0, 4, 100, 1, 1),
    # ceil(backlog / messages_per_job)
    ((100, 0, 0), 0, 4, 100, 1, 1),
    ((101, 0, 0), 0, 4, 100, 2, 2),
    ((150, 40, 10), 0, 4, 100, 2, 2),
    ((299, 1, 0), 1, 4, 100, 3, 2),
    # capped at max_jobs
    ((10_000, 0, 0), 0, 4, 100, 4, 4),
    ((10_000, 0, 0), 3, 4, 100, 4, 1),
    ((10_000, 0, 0), 4, 4, 100, 4, 0),
    # already above the cap (lowered cap, or a race): never a negative or extra submission
    ((10_000, 0, 0), 9, 4, 100, 4, 0),
    # enough active already
    ((250, 0, 0), 3, 8, 100, 3, 0),
    ((250, 0, 0), 2, 8, 100, 3, 1),
    # max_jobs 0 pauses scaling
    ((10_000, 0, 0), 0, 0, 100, 0, 0),
    # one message per job
    ((7, 0, 0), 2, 10, 1, 7, 5),
]


@pytest.mark.parametrize(("counts", "active", "cap", "per_job", "desired", "submit"), CASES)
def test_plan_table(
    counts: tuple[int, int, int], active: int, cap: int, per_job: int, desired: int, submit: int
) -> None:
    # GIVEN a backlog, the active jobs and the cap WHEN the scaler plans
    got = plan(Backlog(*counts), active, max_jobs=cap, messages_per_job=per_job)
    # THEN it wants min(cap, ceil(backlog / per_job)) jobs and submits only the difference
    assert got == Plan(desired=desired, submit=submit)
    # and never takes the active count above the cap
    assert active + got.submit <= max(cap, active)


def test_plan_invariants_over_a_grid() -> None:
    for backlog in (0, 1, 2, 99, 100, 101, 1000, 123_457):
        for active in range(0, 7):
            for cap in range(0, 6):
                got = plan(Backlog(backlog), active, max_jobs=cap, messages_per_job=100)
                assert got.submit >= 0
                assert active + got.submit <= max(cap, active)
                assert got.desired <= cap
                if backlog and cap:
                    assert got.desired >= 1


def test_backlog_total_and_validation() -> None:
    assert Backlog(3, 4, 5).total == 12
    with pytest.raises(ValueError, match="negative"):
        Backlog(-1)


def test_desired_jobs_rejects_zero_messages_per_job() -> None:
    with pytest.raises(ValueError, match="messages_per_job"):
        desired_jobs(Backlog(1), max_jobs=1, messages_per_job=0)


@pytest.mark.parametrize(
    ("active", "cap", "expected"), [(0, 4, 0), (4, 4, 0), (6, 4, 2), (3, 0, 3)]
)
def test_surplus(active: int, cap: int, expected: int) -> None:
    assert surplus(active, cap) == expected


def test_choose_surplus_takes_own_unstarted_jobs_newest_first() -> None:
    jobs = [
        ActiveJob("a", "bottleneck-1", "RUNNING", 1),
        ActiveJob("b", "bottleneck-2", "RUNNABLE", 2),
        ActiveJob("c", "someone-else", "SUBMITTED", 9),
        ActiveJob("d", "bottleneck-3", "SUBMITTED", 3),
        ActiveJob("e", "bottleneck-4", "STARTING", 4),
        ActiveJob("f", "bottleneck-5", "PENDING", 3),
    ]
    # Started jobs and other people's jobs are never chosen; ties on time go by job id.
    assert [j.job_id for j in choose_surplus(jobs, 2, "bottleneck")] == ["f", "d"]
    assert [j.job_id for j in choose_surplus(jobs, 9, "bottleneck")] == ["f", "d", "b"]
    assert choose_surplus(jobs, 0, "bottleneck") == []


def test_choose_surplus_is_the_same_whatever_the_listing_order() -> None:
    jobs = [ActiveJob(f"id{i}", f"bottleneck-{i}", "SUBMITTED", i % 3) for i in range(8)]
    first = choose_surplus(jobs, 3, "bottleneck")
    assert choose_surplus(list(reversed(jobs)), 3, "bottleneck") == first


def test_job_name_is_traceable_and_valid_for_batch() -> None:
    # GIVEN a local time that is not UTC
    when = datetime(2024, 5, 1, 14, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    # WHEN a job is named
    name = job_name("bottleneck-prod", when, "1a2b3c4d")
    # THEN the name carries the prefix, the UTC time and the token
    assert name == "bottleneck-prod-20240501T120005Z-1a2b3c4d"
    # and fits Batch's rule even for the longest prefix settings allow
    longest = job_name("p" * 100, datetime.now(UTC), "ffffffff")
    for candidate in (name, longest):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", candidate)


def test_backoff_retries_throttling_then_gives_up() -> None:
    # GIVEN a call throttled twice, then answered
    answers: list[object] = [throttled("SubmitJob"), throttled("SubmitJob"), "ok"]
    sleeps: list[float] = []

    def call() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    backoff = Backoff(attempts=3, base=0.5, cap=0.75)
    # WHEN it goes through the backoff (jitter pinned to its maximum)
    assert call_with_backoff(call, backoff=backoff, sleep=sleeps.append, rand=lambda: 1.0) == "ok"
    # THEN it slept twice, doubling up to the cap
    assert sleeps == [0.5, 0.75]
    assert backoff.worst_case() == 1.25
    # and a call that keeps being throttled raises the last error after `attempts` tries
    answers[:] = [throttled("ListJobs")] * 3
    with pytest.raises(Exception, match="TooManyRequests"):
        call_with_backoff(call, backoff=backoff, sleep=sleeps.append, rand=lambda: 1.0)
    assert answers == []


def test_only_throttling_is_retried() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("not AWS")

    with pytest.raises(ValueError, match="not AWS"):
        call_with_backoff(call, backoff=Backoff(attempts=5), sleep=lambda _: None)
    assert calls == 1
    assert is_throttling(throttled("X"))
    assert not is_throttling(ValueError())
