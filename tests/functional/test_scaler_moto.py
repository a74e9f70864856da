"""The scaler against moto's SQS and Batch, and against a fake Batch where moto cannot show AWS.

moto keeps no job active (with ``use_docker`` off a job succeeds the moment it is submitted), does
not paginate ListJobs, and lists every job when ``jobStatus`` is left out, where AWS lists RUNNING
jobs only. So the tests that need jobs in a given state put them there in moto's backend, and
pagination, throttling and races run against :class:`tests.fake_batch.FakeBatch`, which behaves
like AWS in those respects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.batch.models import batch_backends

from bottleneck_contract.retry import Backoff
from producer_lambda.scaler import ACTIVE_STATES, Backlog, list_active_jobs, read_backlog, scale
from producer_lambda.settings import ScalingSettings
from tests.fake_batch import FakeBatch
from tests.moto_batch import ACCOUNT_ID, REGION, BatchStack, create_batch_stack

NO_SLEEP = Backoff(attempts=4, base=0.0, cap=0.0)


@pytest.fixture
def stack(aws: None, batch: Any) -> BatchStack:
    """Compute environment, job queue and job definition in moto."""
    return create_batch_stack(
        boto3.client("iam", region_name=REGION), boto3.client("ec2", region_name=REGION), batch
    )


@pytest.fixture
def list_calls(batch: Any) -> Iterator[list[dict[str, Any]]]:
    """The parameters of every ListJobs call the real botocore client makes."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))

    batch.meta.events.register("provide-client-params.batch.ListJobs", record)
    yield calls
    batch.meta.events.unregister("provide-client-params.batch.ListJobs", record)


def send(sqs: Any, queue_url: str, count: int, *, delay: int = 0) -> None:
    """Put ``count`` messages on the queue, ten per call."""
    for start in range(0, count, 10):
        entries = [
            {
                "Id": str(i),
                "MessageBody": f'{{"bucket":"b","key":"{i}.jpg"}}',
                "DelaySeconds": delay,
            }
            for i in range(start, min(count, start + 10))
        ]
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)


def hold(job_id: str, status: str) -> None:
    """Put a moto job into ``status`` (moto itself would have it SUCCEEDED already)."""
    batch_backends[ACCOUNT_ID][REGION]._jobs[job_id].status = status


def settings(stack: BatchStack, **kwargs: Any) -> ScalingSettings:
    """Scaling settings for the moto stack."""
    return ScalingSettings(stack.job_queue, stack.job_definition, **kwargs)


# -- moto ------------------------------------------------------------------------------------


def test_backlog_counts_visible_in_flight_and_delayed(sqs: Any, queue_url: str) -> None:
    # GIVEN 5 visible messages, 3 of them then received (in flight), and 2 delayed
    send(sqs, queue_url, 5)
    sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=3, VisibilityTimeout=300)
    send(sqs, queue_url, 2, delay=600)
    # WHEN the backlog is read THEN every message is counted once
    assert read_backlog(sqs, queue_url) == Backlog(visible=2, in_flight=3, delayed=2)


def test_scaler_submits_for_the_backlog_up_to_the_cap(
    sqs: Any, queue_url: str, batch: Any, stack: BatchStack
) -> None:
    # GIVEN 250 messages, 100 per job, a cap of 2
    send(sqs, queue_url, 250)
    # WHEN the scaler runs
    result = scale(sqs, batch, queue_url, settings(stack, max_jobs=2, messages_per_job=100))
    # THEN it wants min(2, ceil(250 / 100)) = 2 jobs and submits them to the job queue
    assert (result.backlog.total, result.active, result.desired) == (250, 0, 2)
    assert len(result.submitted) == 2
    jobs = batch.describe_jobs(jobs=list(result.submitted))["jobs"]
    assert {j["jobQueue"] for j in jobs} == {
        batch.describe_job_queues(jobQueues=[stack.job_queue])["jobQueues"][0]["jobQueueArn"]
    }
    assert all(":job-definition/bottleneck-consumer:" in j["jobDefinition"] for j in jobs)
    # and names them so they can be listed and traced
    assert all(j["jobName"].startswith("bottleneck-") for j in jobs)
    assert len({j["jobName"] for j in jobs}) == 2


def test_empty_queue_submits_nothing(
    sqs: Any, queue_url: str, batch: Any, stack: BatchStack
) -> None:
    result = scale(sqs, batch, queue_url, settings(stack))
    assert (result.desired, result.submitted) == (0, ())
    assert batch.list_jobs(jobQueue=stack.job_queue, jobStatus="SUCCEEDED")["jobSummaryList"] == []


def test_active_jobs_in_all_five_states_are_counted(
    sqs: Any,
    queue_url: str,
    batch: Any,
    stack: BatchStack,
    list_calls: list[dict[str, Any]],
) -> None:
    # GIVEN one job in each active state, plus a finished and a failed one
    ids = {}
    for status in (*ACTIVE_STATES, "SUCCEEDED", "FAILED"):
        ids[status] = batch.submit_job(
            jobName=f"seen-{status.lower()}",
            jobQueue=stack.job_queue,
            jobDefinition=stack.job_definition,
        )["jobId"]
        hold(ids[status], status)
    send(sqs, queue_url, 20)
    # WHEN the scaler counts them
    listed = list_active_jobs(batch, stack.job_queue)
    # THEN all five active ones are counted, once each, and no finished one
    assert sorted(j.job_id for j in listed) == sorted(ids[s] for s in ACTIVE_STATES)
    assert {j.job_id: j.status for j in listed} == {ids[s]: s for s in ACTIVE_STATES}
    # and every ListJobs call named a status (AWS answers RUNNING only without one)
    assert [c.get("jobStatus") for c in list_calls] == list(ACTIVE_STATES)
    # AND a scaler with a cap of 7 submits only the 2 that bring the total to the cap
    result = scale(sqs, batch, queue_url, settings(stack, max_jobs=7, messages_per_job=1))
    assert (result.active, result.desired, len(result.submitted)) == (5, 7, 2)
    assert all(c.get("jobStatus") in ACTIVE_STATES for c in list_calls)


def test_at_the_cap_nothing_is_submitted(
    sqs: Any, queue_url: str, batch: Any, stack: BatchStack
) -> None:
    for status in ("RUNNING", "RUNNING", "RUNNABLE"):
        job_id = batch.submit_job(
            jobName="running", jobQueue=stack.job_queue, jobDefinition=stack.job_definition
        )["jobId"]
        hold(job_id, status)
    send(sqs, queue_url, 50)
    result = scale(sqs, batch, queue_url, settings(stack, max_jobs=3, messages_per_job=1))
    assert (result.active, result.desired, result.submitted, result.cancelled) == (3, 3, (), ())


# -- AWS behaviour moto does not have: the fake Batch ----------------------------------------


def fake_settings(**kwargs: Any) -> ScalingSettings:
    """Scaling settings for the fake's job queue ``gpu``."""
    return ScalingSettings("gpu", "bottleneck-consumer", **kwargs)


def test_listing_follows_pagination_in_every_state() -> None:
    # GIVEN 3 jobs in each active state, 2 per ListJobs page, and finished jobs around them
    fake = FakeBatch(page_size=2)
    for status in (*ACTIVE_STATES, "SUCCEEDED", "FAILED"):
        for _ in range(3):
            fake.add_job(status)
    fake.add_job("RUNNING", queue="another-queue")
    # WHEN the active jobs are listed
    jobs = list_active_jobs(fake, "gpu")  # type: ignore[arg-type]
    # THEN every page of every state was read, and only this queue's active jobs are counted
    assert len(jobs) == 15
    assert len({j.job_id for j in jobs}) == 15
    pages = [c for op, c in fake.calls if op == "ListJobs"]
    assert len(pages) == 10  # two pages per state
    assert all(c["jobStatus"] in ACTIVE_STATES for c in pages)
    assert sum(1 for c in pages if c["next"]) == 5


def test_the_fake_answers_like_aws_without_a_status() -> None:
    # Guards the fake itself: without jobStatus only RUNNING jobs come back.
    fake = FakeBatch(page_size=100)
    fake.add_job("SUBMITTED")
    running = fake.add_job("RUNNING")
    assert [j["jobId"] for j in fake.list_jobs(jobQueue="gpu")["jobSummaryList"]] == [running]


def test_a_job_that_moves_on_while_listing_is_counted_once() -> None:
    # GIVEN a job that Batch moves from SUBMITTED to RUNNABLE between two ListJobs calls
    fake = FakeBatch(page_size=100)
    moving = fake.add_job("SUBMITTED")
    fake.add_job("RUNNING")

    def advance(kwargs: dict[str, Any]) -> None:
        if kwargs["jobStatus"] == "PENDING":
            fake.jobs[moving].status = "RUNNABLE"

    fake.hooks["ListJobs"] = advance
    # WHEN the jobs are listed THEN it is counted once, with its latest status
    jobs = list_active_jobs(fake, "gpu")  # type: ignore[arg-type]
    assert sorted((j.job_id, j.status) for j in jobs)[0] == (moving, "RUNNABLE")
    assert len(jobs) == 2


def test_throttling_is_retried_with_backoff(sqs: Any, queue_url: str) -> None:
    # GIVEN Batch throttling two ListJobs calls and two SubmitJob calls
    fake = FakeBatch()
    fake.throttle.update({"ListJobs": 2, "SubmitJob": 2})
    send(sqs, queue_url, 3)
    sleeps: list[float] = []
    # WHEN the scaler runs
    result = scale(
        sqs,
        fake,  # type: ignore[arg-type]
        queue_url,
        fake_settings(max_jobs=4, messages_per_job=1),
        backoff=Backoff(attempts=3, base=0.1, cap=1.0),
        sleep=sleeps.append,
    )
    # THEN it slept before each retry and still did the whole job
    assert len(sleeps) == 4
    assert all(0 <= s <= 0.2 for s in sleeps)
    assert len(result.submitted) == 3
    assert fake.count("SUBMITTED") == 3
    assert sum(1 for op, _ in fake.calls if op == "SubmitJob") == 5


def test_throttling_that_does_not_stop_is_raised(sqs: Any, queue_url: str) -> None:
    fake = FakeBatch()
    fake.throttle["SubmitJob"] = 99
    send(sqs, queue_url, 1)
    with pytest.raises(Exception, match="TooManyRequestsException"):
        scale(sqs, fake, queue_url, fake_settings(), backoff=NO_SLEEP, sleep=lambda _: None)  # type: ignore[arg-type]
    assert sum(1 for op, _ in fake.calls if op == "SubmitJob") == NO_SLEEP.attempts
    assert fake.count(*ACTIVE_STATES) == 0


def _race(fake: FakeBatch, sqs: Any, queue_url: str, cap: int) -> list[Any]:
    """Run two scalers at once, both counting before either submits; return their results."""
    both_counted = threading.Barrier(2, timeout=30)
    submitting = threading.local()

    def wait_for_the_other(kwargs: dict[str, Any]) -> None:
        # A racer's first SubmitJob waits until the other has counted too (it has reached its
        # own first SubmitJob): both plan from the same, stale count.
        if not getattr(submitting, "started", False):
            submitting.started = True
            both_counted.wait()

    fake.hooks["SubmitJob"] = wait_for_the_other
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(
                scale(
                    sqs,
                    fake,  # type: ignore[arg-type]
                    queue_url,
                    fake_settings(max_jobs=cap, messages_per_job=10),
                    backoff=NO_SLEEP,
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    del fake.hooks["SubmitJob"]
    assert not errors, errors
    assert len(results) == 2
    return results


def test_racing_scalers_end_at_the_cap(sqs: Any, queue_url: str) -> None:
    # GIVEN a backlog that wants 4 jobs and two scalers that both count 0 active jobs
    fake = FakeBatch(page_size=100)
    send(sqs, queue_url, 40)
    # WHEN both submit at once (the race reserved concurrency 1 prevents for the Lambda)
    results = _race(fake, sqs, queue_url, cap=4)
    # THEN both planned from 0 and submitted 4 each: the window is real
    assert [r.active for r in results] == [0, 0]
    assert sum(len(r.submitted) for r in results) == 8
    # but the reconcile step cancelled the surplus: exactly the cap remains active
    assert fake.count(*ACTIVE_STATES) == 4
    assert fake.count("FAILED") == 4
    # the newest four, whichever racer submitted them (both racers pick by the same order)
    newest = sorted(fake.jobs.values(), key=lambda j: j.created_at)[-4:]
    assert {j.status for j in newest} == {"FAILED"}
    # and the last racer's view ended at the cap
    assert min(r.active_after for r in results) == 4
    # AND the next run (say, the schedule) neither submits nor cancels
    again = scale(sqs, fake, queue_url, fake_settings(max_jobs=4, messages_per_job=10))  # type: ignore[arg-type]
    assert (again.active, again.submitted, again.cancelled) == (4, (), ())


def test_racing_scalers_leave_started_jobs_to_idle_exit(sqs: Any, queue_url: str) -> None:
    # GIVEN jobs that start at once (capacity was waiting), so CancelJob cannot stop them
    fake = FakeBatch(start_status="RUNNING")
    send(sqs, queue_url, 40)
    # WHEN two scalers race
    results = _race(fake, sqs, queue_url, cap=3)
    # THEN the surplus stays: nothing in progress is interrupted, as documented; those jobs
    # drain the same queue and leave through the consumer's --idle-exit
    assert fake.count("RUNNING") == 6
    assert all(r.cancelled == () for r in results)
    assert all(op != "CancelJob" for op, _ in fake.calls)
    # and no further job is added while the count is above the cap
    again = scale(sqs, fake, queue_url, fake_settings(max_jobs=3, messages_per_job=10))  # type: ignore[arg-type]
    assert again.submitted == ()


def test_a_lowered_cap_withdraws_own_queued_jobs_only(sqs: Any, queue_url: str) -> None:
    # GIVEN 2 running jobs, 3 of ours queued and 1 queued by someone else, and a cap of 2
    fake = FakeBatch()
    for _ in range(2):
        fake.add_job("RUNNING", name="bottleneck-old")
    ours = [fake.add_job("RUNNABLE", name=f"bottleneck-q{i}") for i in range(3)]
    theirs = fake.add_job("RUNNABLE", name="manual-job")
    send(sqs, queue_url, 40)
    # WHEN the scaler runs
    result = scale(sqs, fake, queue_url, fake_settings(max_jobs=2, messages_per_job=10))  # type: ignore[arg-type]
    # THEN it submits nothing and cancels our queued jobs, newest first, never theirs
    assert result.submitted == ()
    assert list(result.cancelled) == list(reversed(ours))
    assert fake.jobs[theirs].status == "RUNNABLE"
    assert fake.count("RUNNING") == 2


def test_a_submission_the_listing_has_not_caught_up_with_still_counts(
    sqs: Any, queue_url: str
) -> None:
    # GIVEN a job queue at 3 of 4, and a ListJobs that lags: it does not show new jobs yet
    fake = FakeBatch(page_size=100)
    for _ in range(3):
        fake.add_job("RUNNABLE", name="bottleneck-old")
    hidden: set[str] = set()
    real_list = fake.list_jobs

    def lagging_list(**kwargs: Any) -> dict[str, Any]:
        page = real_list(**kwargs)
        page["jobSummaryList"] = [j for j in page["jobSummaryList"] if j["jobId"] not in hidden]
        return page

    real_submit = fake.submit_job

    def submit(**kwargs: Any) -> dict[str, Any]:
        response = real_submit(**kwargs)
        hidden.add(response["jobId"])
        return response

    fake.list_jobs = lagging_list  # type: ignore[method-assign]
    fake.submit_job = submit  # type: ignore[method-assign]
    send(sqs, queue_url, 40)
    # WHEN the scaler submits the fourth job
    result = scale(sqs, fake, queue_url, fake_settings(max_jobs=4, messages_per_job=10))  # type: ignore[arg-type]
    # THEN DescribeJobs confirms it, it counts, and nothing is cancelled
    assert len(result.submitted) == 1
    assert (result.active_after, result.cancelled) == (4, ())
    assert any(op == "DescribeJobs" for op, _ in fake.calls)
