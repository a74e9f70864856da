"""An in-memory AWS Batch client with the semantics moto does not reproduce.

moto records jobs but never keeps them active (with ``use_docker`` off they succeed at once), does
not paginate ``ListJobs``, and answers ``ListJobs`` without ``jobStatus`` with every job. AWS
answers it with RUNNING jobs only, pages at ``maxResults`` (default 100), keeps a job SUBMITTED
until the scheduler moves it, and lets ``CancelJob`` fail only jobs that have not started. This
fake does what AWS does, is thread-safe, and can throttle or pause any operation, so that
pagination, every active state, backoff and races can be tested deterministically.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

BEFORE_START = ("SUBMITTED", "PENDING", "RUNNABLE")


@dataclass
class FakeJob:
    """One job: the fields ListJobs and DescribeJobs return."""

    job_id: str
    name: str
    queue: str
    definition: str
    status: str
    created_at: int

    def summary(self) -> dict[str, Any]:
        """The ListJobs / DescribeJobs view of the job."""
        return {
            "jobId": self.job_id,
            "jobName": self.name,
            "jobArn": f"arn:aws:batch:us-east-1:123456789012:job/{self.job_id}",
            "status": self.status,
            "createdAt": self.created_at,
            "jobQueue": self.queue,
            "jobDefinition": self.definition,
        }


def throttled(operation: str) -> ClientError:
    """The error AWS Batch raises when a caller exceeds its request rate."""
    response: Any = {
        "Error": {"Code": "TooManyRequestsException", "Message": "Too Many Requests"},
        "ResponseMetadata": {"HTTPStatusCode": 429},
    }
    return ClientError(response, operation)


class FakeBatch:
    """A thread-safe stand-in for a boto3 Batch client (SubmitJob, ListJobs, DescribeJobs,
    CancelJob), with a small page size so that every listing paginates."""

    def __init__(self, *, page_size: int = 2, start_status: str = "SUBMITTED") -> None:
        self.page_size = page_size
        self.start_status = start_status
        self.jobs: dict[str, FakeJob] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.throttle: Counter[str] = Counter()  # operation -> how many calls to throttle
        self.hooks: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._clock = itertools.count(1_714_564_800_000)

    # -- test helpers -------------------------------------------------------------------------

    def add_job(self, status: str, *, name: str = "other", queue: str = "gpu") -> str:
        """Put a job straight into ``status`` (as if Batch had moved it there)."""
        with self._lock:
            job_id = f"job-{next(self._ids):04d}"
            self.jobs[job_id] = FakeJob(job_id, name, queue, "def", status, next(self._clock))
        return job_id

    def count(self, *statuses: str, queue: str = "gpu") -> int:
        """How many jobs of ``queue`` are in one of ``statuses``."""
        with self._lock:
            return sum(1 for j in self.jobs.values() if j.queue == queue and j.status in statuses)

    def _enter(self, operation: str, kwargs: dict[str, Any]) -> None:
        # Hooks run outside the lock: a test may block one thread here while another proceeds.
        hook = self.hooks.get(operation)
        if hook is not None:
            hook(kwargs)
        with self._lock:
            self.calls.append((operation, dict(kwargs)))
            if self.throttle[operation] > 0:
                self.throttle[operation] -= 1
                raise throttled(operation)

    # -- the boto3 surface --------------------------------------------------------------------

    def submit_job(self, *, jobName: str, jobQueue: str, jobDefinition: str) -> dict[str, Any]:  # noqa: N803
        """SubmitJob: a new job in ``start_status`` (SUBMITTED on AWS)."""
        self._enter("SubmitJob", {"jobName": jobName, "jobQueue": jobQueue})
        with self._lock:
            job_id = f"job-{next(self._ids):04d}"
            self.jobs[job_id] = FakeJob(
                job_id, jobName, jobQueue, jobDefinition, self.start_status, next(self._clock)
            )
        return {"jobId": job_id, "jobName": jobName, "jobArn": f"arn:aws:batch:::job/{job_id}"}

    def list_jobs(
        self,
        *,
        jobQueue: str,  # noqa: N803
        jobStatus: str | None = None,  # noqa: N803
        nextToken: str | None = None,  # noqa: N803
        maxResults: int | None = None,  # noqa: N803
    ) -> dict[str, Any]:
        """ListJobs: RUNNING only when ``jobStatus`` is left out, as AWS does; paginated."""
        self._enter("ListJobs", {"jobQueue": jobQueue, "jobStatus": jobStatus, "next": nextToken})
        status = jobStatus or "RUNNING"
        size = maxResults or self.page_size
        with self._lock:
            matching = [
                j.summary()
                for j in self.jobs.values()
                if j.queue == jobQueue and j.status == status
            ]
        # A cursor, not an offset: a job that changes state mid-listing does not shift the pages.
        after = [j for j in matching if nextToken is None or j["jobId"] > nextToken]
        page: dict[str, Any] = {"jobSummaryList": after[:size]}
        if len(after) > size:
            page["nextToken"] = after[size - 1]["jobId"]
        return page

    def describe_jobs(self, *, jobs: list[str]) -> dict[str, Any]:
        """DescribeJobs: the jobs that exist among ``jobs``."""
        self._enter("DescribeJobs", {"jobs": list(jobs)})
        with self._lock:
            return {"jobs": [self.jobs[i].summary() for i in jobs if i in self.jobs]}

    def cancel_job(self, *, jobId: str, reason: str) -> dict[str, Any]:  # noqa: N803
        """CancelJob: fails a job that has not started; a no-op for any other job."""
        self._enter("CancelJob", {"jobId": jobId, "reason": reason})
        with self._lock:
            job = self.jobs.get(jobId)
            if job is not None and job.status in BEFORE_START:
                job.status = "FAILED"
        return {}
