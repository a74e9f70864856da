"""The queue-depth scaler: submit AWS Batch jobs for the work queue's backlog, up to a cap.

One function, :func:`scale`, serves the Lambda (after every S3 event that enqueued something,
and on every scheduled event) and ``bottleneck-enqueue --scale``. The rule:

    backlog = visible + in flight (not visible) + delayed messages
    desired = min(max_jobs, ceil(backlog / messages_per_job))     (so >= 1 while backlog > 0)
    submit  = max(0, desired - active)                            (never active + submit > cap)

where ``active`` counts this job queue's jobs in SUBMITTED, PENDING, RUNNABLE, STARTING and
RUNNING. The arithmetic (:func:`desired_jobs`, :func:`plan`, :func:`surplus`,
:func:`choose_surplus`) is pure; the AWS calls are at the edge, with the clients passed in.
``ListJobs`` is always called with ``jobStatus`` (AWS returns only RUNNING jobs without it) and
followed through ``nextToken``; the five states are listed in lifecycle order and de-duplicated by
job id, so a job that moves on between two listings is counted once and never missed.

The scaler never scales down by stopping a job that has started: a job that finds the queue empty
exits on its own after the consumer's ``--idle-exit`` seconds. The only jobs it cancels are its
own queued ones above the cap (see below).

Concurrency. Batch has no conditional ``SubmitJob``, so count-then-submit is a read-modify-write:
two scalers that run at once can both count ``active`` jobs and both submit ``cap - active``,
leaving up to ``k * cap`` jobs for ``k`` racers. No lock-free scheme closes that window, so:

1. The deployment serialises the scaler: the function's reserved concurrency is 1, so S3 events
   and the schedule never run it twice at once. That is the guarantee; what follows limits the
   damage where it does not reach (``bottleneck-enqueue --scale`` at the same moment as the
   Lambda, or two operators running it).
2. Reconcile: a run that submitted anything lists the active jobs again, asks ``DescribeJobs``
   about the jobs it submitted that the listing does not show (a listing may lag a submission; a
   racer may already have cancelled them), and while more than ``max_jobs`` are active cancels
   the surplus among the scaler's own jobs (name prefix) that have not started, newest first.
   The same step runs without a submission, so lowering ``max_jobs`` (0 pauses) withdraws queued
   jobs. ``CancelJob`` cannot touch a STARTING or RUNNING job, so no message in progress is
   interrupted. Racers that see the same jobs pick the same victims (the order is by Batch's
   ``createdAt``, then job id) and cancelling twice is harmless; racers whose views differ may
   cancel a few too many, an undershoot the next run fills. The last racer to re-list sees every
   submission, so once all have finished no more than ``max_jobs`` are active, except surplus
   jobs that had already started.
3. Such a started surplus job shares the backlog with the others and exits through the
   consumer's ``--idle-exit`` when the queue is drained; the compute environment's maxvCpus
   bounds what can run at all.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.logs import log
from bottleneck_contract.retry import Backoff
from producer_lambda.backoff import call_with_backoff, error_code, is_throttling, is_transient
from producer_lambda.settings import ScalingSettings

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_batch.literals import JobStatusType
    from mypy_boto3_sqs import SQSClient

_log = logging.getLogger(__name__)

__all__ = [
    "ACTIVE_STATES",
    "BATCH_BACKOFF",
    "CANCELLABLE_STATES",
    "ActiveJob",
    "Backlog",
    "Plan",
    "ScaleResult",
    "choose_surplus",
    "desired_jobs",
    "job_name",
    "list_active_jobs",
    "plan",
    "read_backlog",
    "scale",
    "surplus",
]

# Lifecycle order matters: see list_active_jobs.
ACTIVE_STATES: tuple[JobStatusType, ...] = (
    "SUBMITTED",
    "PENDING",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
)
CANCELLABLE_STATES = frozenset({"SUBMITTED", "PENDING", "RUNNABLE"})
BATCH_BACKOFF = Backoff(attempts=6, base=0.25, cap=4.0)


@dataclass(frozen=True, slots=True)
class Backlog:
    """The work queue's approximate message counts."""

    visible: int = 0
    in_flight: int = 0
    delayed: int = 0

    def __post_init__(self) -> None:
        if min(self.visible, self.in_flight, self.delayed) < 0:
            raise ValueError(f"negative message count in {self}")

    @property
    def total(self) -> int:
        """Messages waiting, being worked on, or about to become visible."""
        return self.visible + self.in_flight + self.delayed


@dataclass(frozen=True, slots=True)
class ActiveJob:
    """One job of the job queue in an active state (``created_at`` in epoch milliseconds)."""

    job_id: str
    name: str
    status: str
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one scaler run wants: ``desired`` jobs in all, ``submit`` of them new."""

    desired: int
    submit: int


@dataclass(frozen=True, slots=True)
class ScaleResult:
    """What one scaler run saw and did (job ids submitted and cancelled).

    ``active`` is the count the plan was made from; ``active_after`` the count this run saw at its
    end (after its submissions and cancellations), which a racer may since have changed.
    """

    backlog: Backlog
    active: int
    desired: int
    submitted: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()
    active_after: int = 0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict for logs and the handler's return value."""
        return {
            "backlog": {
                "visible": self.backlog.visible,
                "in_flight": self.backlog.in_flight,
                "delayed": self.backlog.delayed,
            },
            "active": self.active,
            "desired": self.desired,
            "active_after": self.active_after,
            "submitted": list(self.submitted),
            "cancelled": list(self.cancelled),
        }


def desired_jobs(backlog: Backlog, *, max_jobs: int, messages_per_job: int) -> int:
    """``min(max_jobs, ceil(backlog.total / messages_per_job))``: at least 1 while work waits.

    ``max_jobs`` 0 pauses scaling.
    """
    if messages_per_job < 1:
        raise ValueError(f"messages_per_job must be >= 1, got {messages_per_job}")
    if max_jobs <= 0 or backlog.total == 0:
        return 0
    return min(max_jobs, -(-backlog.total // messages_per_job))


def plan(backlog: Backlog, active: int, *, max_jobs: int, messages_per_job: int) -> Plan:
    """How many jobs to submit given ``active`` ones: never more than takes the total to the cap."""
    desired = desired_jobs(backlog, max_jobs=max_jobs, messages_per_job=messages_per_job)
    return Plan(desired=desired, submit=max(0, desired - max(0, active)))


def surplus(active: int, max_jobs: int) -> int:
    """How many active jobs are above the cap."""
    return max(0, active - max(0, max_jobs))


def choose_surplus(jobs: Iterable[ActiveJob], count: int, name_prefix: str) -> list[ActiveJob]:
    """The ``count`` jobs to cancel: this scaler's own not-yet-started jobs, newest first.

    Deterministic (by creation time, then job id), so that racers with the same view agree.
    """
    if count <= 0:
        return []
    own = [
        job
        for job in jobs
        if job.status in CANCELLABLE_STATES and job.name.startswith(f"{name_prefix}-")
    ]
    own.sort(key=lambda job: (job.created_at, job.job_id), reverse=True)
    return own[:count]


def job_name(prefix: str, now: datetime, token: str) -> str:
    """``<prefix>-<UTC time>-<token>``, e.g. ``bottleneck-20240501T120000Z-1a2b3c4d``.

    Sortable by time, traceable in ListJobs and the logs, and made of the characters a Batch job
    name allows (letters, digits, '-', '_').
    """
    return f"{prefix}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{token}"


def read_backlog(sqs: SQSClient, queue_url: str) -> Backlog:
    """The queue's visible, in-flight and delayed message counts (one GetQueueAttributes)."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    ).get("Attributes", {})
    return Backlog(
        visible=int(attributes.get("ApproximateNumberOfMessages", "0")),
        in_flight=int(attributes.get("ApproximateNumberOfMessagesNotVisible", "0")),
        delayed=int(attributes.get("ApproximateNumberOfMessagesDelayed", "0")),
    )


def list_active_jobs(
    batch: BatchClient,
    job_queue: str,
    *,
    backoff: Backoff = BATCH_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> list[ActiveJob]:
    """Every job of ``job_queue`` in an active state, each once, with its latest seen status.

    One ``ListJobs`` per state and page. Listing the states in lifecycle order means a job that
    advances while we list is seen at least once (it would have to overtake the listing to be
    missed); the dict keeps one entry per job id.
    """
    jobs: dict[str, ActiveJob] = {}
    for status in ACTIVE_STATES:
        token: str | None = None
        while True:
            if token:
                call = partial(
                    batch.list_jobs, jobQueue=job_queue, jobStatus=status, nextToken=token
                )
            else:
                call = partial(batch.list_jobs, jobQueue=job_queue, jobStatus=status)
            page = call_with_backoff(
                call, backoff=backoff, retry_if=is_transient, sleep=sleep, on_retry=_on_throttle
            )
            for summary in page.get("jobSummaryList", []):
                jobs[summary["jobId"]] = ActiveJob(
                    job_id=summary["jobId"],
                    name=summary.get("jobName", ""),
                    status=summary.get("status", status),
                    created_at=int(summary.get("createdAt", 0)),
                )
            token = page.get("nextToken")
            if not token:
                break
    # A job that reached SUCCEEDED/FAILED between listings may still be in the dict from an
    # earlier state: that over-counts by a job for one run, which only delays a submission.
    return list(jobs.values())


def scale(
    sqs: SQSClient,
    batch: BatchClient,
    queue_url: str,
    scaling: ScalingSettings,
    *,
    backoff: Backoff = BATCH_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    token: Callable[[], str] = lambda: uuid.uuid4().hex[:8],
) -> ScaleResult:
    """Run the scaler once: count, submit up to the cap, reconcile (see the module docstring).

    Raises the AWS error when counting or submitting fails after backoff; jobs submitted before
    the error are in the log (``job-submitted``). A failed cancellation is logged and skipped.
    """
    backlog = read_backlog(sqs, queue_url)
    jobs = list_active_jobs(batch, scaling.job_queue, backoff=backoff, sleep=sleep)
    wanted = plan(
        backlog,
        len(jobs),
        max_jobs=scaling.max_jobs,
        messages_per_job=scaling.messages_per_job,
    )
    submitted: list[ActiveJob] = []
    for _ in range(wanted.submit):
        name = job_name(scaling.job_name_prefix, now(), token())
        response = call_with_backoff(
            partial(
                batch.submit_job,
                jobName=name,
                jobQueue=scaling.job_queue,
                jobDefinition=scaling.job_definition,
            ),
            backoff=backoff,
            # Throttled only: after a 5xx or a reset the job may exist, and a retry would
            # submit a second one (the next run counts it instead).
            retry_if=is_throttling,
            sleep=sleep,
            on_retry=_on_throttle,
        )
        job = ActiveJob(
            job_id=response["jobId"],
            name=name,
            status="SUBMITTED",
            created_at=int(now().timestamp() * 1000),
        )
        submitted.append(job)
        log(_log, logging.INFO, "job-submitted", job_id=job.job_id, job_name=name)

    current = jobs
    if submitted:
        current = list_active_jobs(batch, scaling.job_queue, backoff=backoff, sleep=sleep)
        seen = {job.job_id for job in current}
        unseen = [job for job in submitted if job.job_id not in seen]
        current += _still_active(batch, unseen, backoff=backoff, sleep=sleep)
    victims = choose_surplus(
        current, surplus(len(current), scaling.max_jobs), scaling.job_name_prefix
    )
    cancelled = _cancel(
        batch,
        victims,
        reason=f"surplus: {len(current)} active jobs, cap {scaling.max_jobs}",
        backoff=backoff,
        sleep=sleep,
    )
    result = ScaleResult(
        backlog=backlog,
        active=len(jobs),
        desired=wanted.desired,
        submitted=tuple(job.job_id for job in submitted),
        cancelled=tuple(cancelled),
        active_after=len(current) - len(cancelled),
    )
    log(_log, logging.INFO, "scaled", job_queue=scaling.job_queue, **result.summary())
    return result


def _still_active(
    batch: BatchClient,
    jobs: Sequence[ActiveJob],
    *,
    backoff: Backoff,
    sleep: Callable[[float], None],
) -> list[ActiveJob]:
    # DescribeJobs by id, not the guess that an unlisted job is still SUBMITTED: a racer may have
    # cancelled it, and counting it anyway would make this run cancel somebody else's job.
    if not jobs:
        return []
    mine = {job.job_id: job for job in jobs}
    described: dict[str, ActiveJob] = {}
    for start in range(0, len(jobs), 100):  # DescribeJobs takes at most 100 ids
        ids = [job.job_id for job in jobs[start : start + 100]]
        page = call_with_backoff(
            partial(batch.describe_jobs, jobs=ids),
            backoff=backoff,
            retry_if=is_transient,
            sleep=sleep,
            on_retry=_on_throttle,
        )
        for detail in page.get("jobs", []):
            described[detail["jobId"]] = ActiveJob(
                job_id=detail["jobId"],
                name=detail.get("jobName", ""),
                status=detail.get("status", "SUBMITTED"),
                created_at=int(detail.get("createdAt", 0)),
            )
    active: list[ActiveJob] = []
    for job_id, job in mine.items():
        found = described.get(job_id)
        if found is None:
            active.append(job)  # not even described yet: just submitted, so active
        elif found.status in ACTIVE_STATES:
            active.append(found)
    return active


def _cancel(
    batch: BatchClient,
    victims: Sequence[ActiveJob],
    *,
    reason: str,
    backoff: Backoff,
    sleep: Callable[[float], None],
) -> list[str]:
    cancelled: list[str] = []
    for job in victims:
        try:
            call_with_backoff(
                partial(batch.cancel_job, jobId=job.job_id, reason=reason),
                backoff=backoff,
                retry_if=is_transient,
                sleep=sleep,
                on_retry=_on_throttle,
            )
        except (ClientError, BotoCoreError) as exc:
            log(_log, logging.WARNING, "cancel-failed", job_id=job.job_id, error=error_code(exc))
            continue
        cancelled.append(job.job_id)
        log(
            _log, logging.INFO, "job-cancelled", job_id=job.job_id, job_name=job.name, reason=reason
        )
    return cancelled


def _on_throttle(exc: BaseException, pause: float) -> None:
    log(_log, logging.WARNING, "throttled", error=error_code(exc), retry_in_s=round(pause, 3))
