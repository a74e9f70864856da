"""The upload path at scale: batches from the buffer queue, ten messages per call, partial failures
handed back record by record, and the measured requests and time behind the README's figures.

Two designs are measured the same way, against moto in-process (request counts) and against a
moto server on loopback (request counts and time per invocation):

* **one invocation per event** (before): EventBridge invokes the function for each upload; the
  function sends one message and runs the scaler (reserved concurrency 1);
* **buffered** (now): EventBridge puts each event on the buffer queue, the event source mapping
  hands the function batches of up to ``BatchSize``, and the scheduled scaler alone scales.

moto has no event source mapping, so :func:`poll_like_lambda` plays its part as an ideal poller
would: ten messages per ``ReceiveMessage``, a batch handed over when full (or when the queue is
empty), the handled records deleted ten per ``DeleteMessageBatch``. Lambda's pollers make at
least these calls, and also long-poll an empty queue (a few requests a minute, which do not grow
with uploads). EventBridge's delivery to the buffer queue happens inside moto, so it is counted
as what AWS bills for it: one ``SendMessage`` per event that reached the queue.

Printed figures (the README's): ``python -m tests.functional.test_upload_path``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import boto3
import pytest

from bottleneck_contract.locations import S3Location
from producer_lambda import handler as handler_module
from producer_lambda.costs import UploadPathUse, cost_per_million
from producer_lambda.handler import LOGGER_NAME, EnqueueError, handle, lambda_handler
from producer_lambda.settings import ScalingSettings, Settings
from tests.factories import FakeContext, eventbridge_s3_event, s3_event, s3_put_record, sqs_event
from tests.moto_batch import ACCOUNT_ID, REGION, create_batch_stack

IMAGES = "images"
OUTPUT = S3Location("feats", "resnet50/")
# The template's defaults (UploadBatchSize, UploadMaxConcurrency) and the function's memory.
BATCH_SIZE = 100
MAX_CONCURRENCY = 10
MEMORY_MB = 256
# Lambda gives a function one vCPU's worth of time at 1,769 MB, and a share in proportion below.
FULL_VCPU_MB = 1769


def created(key: str) -> dict[str, Any]:
    """An EventBridge ``Object Created`` event for an image under uploads/."""
    return eventbridge_s3_event(IMAGES, key, size=10, etag=f"etag-{key}", version_id=None)


def count_calls(client: Any) -> Counter[str]:
    """A Counter that the client's API calls add their operation names to."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    service = client.meta.service_model.service_name
    client.meta.events.register(f"before-call.{service}", count)
    return calls


@pytest.fixture
def settings(queue_url: str) -> Settings:
    """The upload function's settings: no scaling (the scheduled scaler scales)."""
    return Settings(queue_url=queue_url, output=OUTPUT, input_prefix="uploads/")


@pytest.fixture(autouse=True)
def _quiet_producer_logs() -> Iterator[None]:
    # One INFO line per skipped or failed record is right for the Lambda; here it is noise.
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def drain(sqs: Any, queue_url: str) -> list[str]:
    """The keys of every message on the queue."""
    keys: list[str] = []
    while got := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        keys += [json.loads(m["Body"])["key"] for m in got]
    return keys


# -- behaviour ---------------------------------------------------------------------------------


def test_a_batch_of_uploads_goes_ten_per_send_message_batch(
    settings: Settings, sqs: Any, queue_url: str
) -> None:
    # GIVEN a batch of 25 upload events from the buffer queue
    keys = [f"uploads/{i:02d}.jpg" for i in range(25)]
    event = sqs_event(*(created(key) for key in keys))
    sizes: list[int] = []
    sqs.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch",
        lambda params, **_: sizes.append(len(params["Entries"])),
    )
    calls = count_calls(sqs)
    # WHEN the upload function handles it
    summary = handle(event, settings, sqs=sqs, batch=None)
    # THEN three SendMessageBatch calls carried them, and no single SendMessage
    assert sizes == [10, 10, 5]
    assert calls == Counter({"SendMessageBatch": 3})
    assert (summary["enqueued"], summary["batchItemFailures"]) == (25, [])
    assert sorted(drain(sqs, queue_url)) == keys


class FailingSQS:
    """The moto client; entries for the chosen keys always fail (throttled, or rejected)."""

    def __init__(self, real: Any, throttled: set[str], rejected: set[str]) -> None:
        self.real = real
        self.throttled = throttled
        self.rejected = rejected

    def send_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        """Fail the chosen entries, send the rest for real, and merge the answers."""
        failed: list[dict[str, Any]] = []
        passed: list[dict[str, Any]] = []
        for entry in Entries:
            key = json.loads(entry["MessageBody"])["key"]
            if key in self.throttled:
                failed.append(
                    {"Id": entry["Id"], "SenderFault": False, "Code": "ThrottlingException"}
                )
            elif key in self.rejected:
                failed.append(
                    {"Id": entry["Id"], "SenderFault": True, "Code": "InvalidParameterValue"}
                )
            else:
                passed.append(entry)
        response: dict[str, Any] = {"Successful": [], "Failed": failed}
        if passed:
            real = self.real.send_message_batch(QueueUrl=QueueUrl, Entries=passed)
            response["Successful"] = real.get("Successful", [])
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_partial_failure_returns_exactly_the_records_that_failed(
    settings: Settings, sqs: Any, queue_url: str
) -> None:
    # GIVEN 15 records; SQS keeps throttling one image and rejects another; a third record names
    # the throttled image again, and one record cannot be parsed at all
    keys = [f"uploads/{i:02d}.jpg" for i in range(12)]
    bodies: list[Any] = [created(key) for key in keys]
    bodies += [created("uploads/03.jpg"), "not json", s3_event(s3_put_record(IMAGES, "x.txt"))]
    event = sqs_event(*bodies)
    ids = [record["messageId"] for record in event["Records"]]
    failing = FailingSQS(sqs, throttled={"uploads/03.jpg"}, rejected={"uploads/07.jpg"})
    # WHEN the batch is handled
    summary = handle(event, settings, sqs=failing, batch=None, sleep=lambda _: None)  # type: ignore[arg-type]
    # THEN exactly the records naming the two failed images come back, in the batch's order; the
    # unparsable record and the skipped one are done with (they can never succeed)
    assert summary["batchItemFailures"] == [
        {"itemIdentifier": ids[3]},
        {"itemIdentifier": ids[7]},
        {"itemIdentifier": ids[12]},
    ]
    assert (summary["enqueued"], summary["failed"]) == (10, 2)
    assert summary["skipped"] == {"malformed": 1, "outside-input-prefix": 1}
    # AND the other images are on the work queue, once each
    assert sorted(drain(sqs, queue_url)) == sorted(set(keys) - {"uploads/03.jpg", "uploads/07.jpg"})


def test_when_every_record_fails_the_invocation_fails(
    settings: Settings, sqs: Any, queue_url: str
) -> None:
    # GIVEN a batch whose every image SQS keeps throttling
    keys = {f"uploads/{i}.jpg" for i in range(3)}
    failing = FailingSQS(sqs, throttled=keys, rejected=set())
    event = sqs_event(*(created(key) for key in sorted(keys)))
    # WHEN it is handled THEN the invocation raises: the whole batch comes back either way, and
    # Lambda slows the pollers down after a function error
    with pytest.raises(EnqueueError, match="3 of 3 messages not sent"):
        handle(event, settings, sqs=failing, batch=None, sleep=lambda _: None)  # type: ignore[arg-type]
    assert drain(sqs, queue_url) == []


def test_lambda_handler_answers_a_batch_with_its_failures_only(
    monkeypatch: pytest.MonkeyPatch, sqs: Any, queue_url: str
) -> None:
    # GIVEN the upload function's environment (no job queue: it never scales) and SQS throttling
    # one of two images
    monkeypatch.setenv("BOTTLENECK_QUEUE_URL", queue_url)
    monkeypatch.setenv("BOTTLENECK_OUTPUT", "s3://feats/resnet50/")
    for name in ("BOTTLENECK_JOB_QUEUE", "BOTTLENECK_JOB_DEFINITION"):
        monkeypatch.delenv(name, raising=False)
    failing = FailingSQS(sqs, throttled={"uploads/b.jpg"}, rejected=set())
    monkeypatch.setattr(handler_module, "_sqs_client", lambda: failing)
    monkeypatch.setattr(handler_module, "_batch_client", _no_batch_client)
    monkeypatch.setattr(
        handler_module, "_s3_client", lambda: boto3.client("s3", region_name=REGION)
    )
    handler_module._settings.cache_clear()
    event = sqs_event(created("uploads/a.jpg"), created("uploads/b.jpg"))
    try:
        # WHEN Lambda invokes the entry point with a batch, and with a plain event
        response = lambda_handler(event, FakeContext())
        plain = lambda_handler(created("uploads/c.jpg"), FakeContext())
    finally:
        handler_module._settings.cache_clear()
    # THEN the batch gets the partial batch response and nothing else, the plain event the summary
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][1]["messageId"]}]}
    assert plain["enqueued"] == 1 and "batchItemFailures" not in plain
    assert sorted(drain(sqs, queue_url)) == ["uploads/a.jpg", "uploads/c.jpg"]


def _no_batch_client() -> Any:
    raise AssertionError("the upload function made a Batch client")


# -- measured: requests per upload, and time per invocation -------------------------------------


@dataclass
class Run:
    """What one design did for ``uploads`` uploads: API calls, invocations, time per invocation."""

    uploads: int
    calls: Counter[str] = field(default_factory=Counter)
    invocations: int = 0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def timed(self, call: Callable[[], Any]) -> Any:
        """Run one invocation, recording its wall time and this thread's CPU time."""
        wall, cpu = time.perf_counter(), time.thread_time()
        result = call()
        self.cpu.append(time.thread_time() - cpu)
        self.wall.append(time.perf_counter() - wall)
        self.invocations += 1
        return result

    def lambda_seconds(self) -> float:
        """Median seconds per invocation on a ``MEMORY_MB`` function: the waits as measured, the
        CPU stretched by the function's share of a vCPU (an estimate, see the module)."""
        waits = statistics.median(w - c for w, c in zip(self.wall, self.cpu, strict=True))
        return max(0.0, waits) + statistics.median(self.cpu) * FULL_VCPU_MB / MEMORY_MB

    def use(self, seconds: float) -> UploadPathUse:
        """Per-upload use, with ``seconds`` per invocation."""
        return UploadPathUse.from_counts(
            self.calls,
            uploads=self.uploads,
            invocations=self.invocations,
            seconds_per_invocation=seconds,
            memory_mb=MEMORY_MB,
        )


def aws_clients(endpoint: str | None) -> dict[str, Any]:
    """Clients of moto in-process (``endpoint`` None) or of a moto server; ``setup`` is an SQS
    client whose calls are the harness's, never counted."""
    session: Any = boto3.session.Session(region_name=REGION)
    extra = {"endpoint_url": endpoint} if endpoint else {}
    clients = {name: session.client(name, **extra) for name in ("sqs", "s3", "batch", "events")}
    clients |= {name: session.client(name, **extra) for name in ("iam", "ec2")}
    clients["setup"] = session.client("sqs", **extra)
    return clients


def fresh_work_queue(aws: dict[str, Any], settings: Settings) -> Settings:
    """``settings`` with a new, empty work queue. moto's SendMessageBatch slows down as a queue
    fills (46 ms at 250 messages, 8 ms when empty): each invocation gets a queue of its own so
    that the times measure the path, not moto's queue. (Real SQS does not slow down so.)"""
    name = f"work-{len(aws.setdefault('queues', []))}"
    aws["queues"].append(name)
    return replace(settings, queue_url=aws["setup"].create_queue(QueueName=name)["QueueUrl"])


def one_invocation_per_event(aws: dict[str, Any], uploads: int) -> Run:
    """Before: one invocation per upload event, which sends and runs the scaler.

    One consumer job is kept RUNNING (as on AWS during a burst; moto would finish it at once),
    so that the scaler's run is the usual one: read the depth, list the active jobs, submit none.
    """
    from moto.batch.models import batch_backends

    sqs, batch = aws["sqs"], aws["batch"]
    queue_url = sqs.create_queue(QueueName="work-one-per-event")["QueueUrl"]
    stack = create_batch_stack(aws["iam"], aws["ec2"], batch, name="one-per-event")
    job = batch.submit_job(
        jobName="held", jobQueue=stack.job_queue, jobDefinition=stack.job_definition
    )
    batch_backends[ACCOUNT_ID][REGION]._jobs[job["jobId"]].status = "RUNNING"
    settings = Settings(
        queue_url=queue_url,
        output=OUTPUT,
        input_prefix="uploads/",
        scaling=ScalingSettings(stack.job_queue, stack.job_definition, max_jobs=1),
    )
    run = Run(uploads)
    run.calls = count_calls(sqs)
    batch_calls = count_calls(batch)
    for i in range(uploads):
        event = created(f"uploads/{i:06d}.jpg")
        fresh = fresh_work_queue(aws, settings)
        summary = run.timed(partial(handle, event, fresh, sqs=sqs, batch=batch))
        assert (summary["enqueued"], summary["jobs_submitted"]) == (1, 0)
    run.calls.update({f"batch:{name}": n for name, n in batch_calls.items()})
    return run


def buffered(aws: dict[str, Any], uploads: int, batch_size: int = BATCH_SIZE) -> Run:
    """Now: EventBridge -> buffer queue -> batches of ``batch_size`` -> the upload function."""
    sqs, events = aws["sqs"], aws["events"]
    queue_url = sqs.create_queue(QueueName="work-buffered")["QueueUrl"]
    buffer_url = sqs.create_queue(QueueName="uploads-buffer")["QueueUrl"]
    buffer_arn = sqs.get_queue_attributes(QueueUrl=buffer_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    pattern = {
        "source": ["aws.s3"],
        "detail-type": ["Object Created", "Object Deleted"],
        "detail": {
            "bucket": {"name": [IMAGES]},
            "object": {"key": [{"wildcard": "uploads/*.jpg"}]},
        },
    }
    events.put_rule(Name="uploads", EventPattern=json.dumps(pattern))
    events.put_targets(Rule="uploads", Targets=[{"Id": "buffer", "Arn": buffer_arn}])
    for start in range(0, uploads, 10):
        entries = [
            {
                "Source": "aws.s3",
                "DetailType": "Object Created",
                "Detail": json.dumps(created(f"uploads/{i:06d}.jpg")["detail"]),
            }
            for i in range(start, min(uploads, start + 10))
        ]
        assert events.put_events(Entries=entries)["FailedEntryCount"] == 0
    settings = Settings(queue_url=queue_url, output=OUTPUT, input_prefix="uploads/")
    run = Run(uploads)
    run.calls = count_calls(sqs)

    def invoke(event: dict[str, Any]) -> dict[str, Any]:
        fresh = fresh_work_queue(aws, settings)
        summary: dict[str, Any] = run.timed(partial(handle, event, fresh, sqs=sqs, batch=None))
        return summary

    delivered = poll_like_lambda(sqs, buffer_url, batch_size, invoke, expected=uploads)
    assert delivered == uploads
    # EventBridge's delivery to the buffer: one SendMessage per event, billed to the queue.
    run.calls["SendMessage"] += delivered
    return run


def poll_like_lambda(
    sqs: Any,
    buffer_url: str,
    batch_size: int,
    invoke: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    expected: int,
) -> int:
    """Hand the buffer's messages to ``invoke`` in batches as the event source mapping does, and
    delete what it did not hand back; stop once ``expected`` messages came (an ideal poller: the
    polls of an idle queue are a fixed cost, not a cost per upload). Returns the count received."""
    received = 0
    while received < expected:
        messages: list[dict[str, Any]] = []
        while len(messages) < batch_size and received + len(messages) < expected:
            got = sqs.receive_message(
                QueueUrl=buffer_url, MaxNumberOfMessages=min(10, batch_size - len(messages))
            ).get("Messages", [])
            if not got:
                break
            messages += got
        if not messages:
            return received
        received += len(messages)
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "eventSource": "aws:sqs",
            }
            for m in messages
        ]
        response = invoke({"Records": records})
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            chunk = done[start : start + 10]
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)
            ]
            assert not sqs.delete_message_batch(QueueUrl=buffer_url, Entries=entries).get("Failed")
    return received


def test_requests_per_upload_of_both_designs(aws: None) -> None:
    # GIVEN uploads WHEN each design carries them (moto in-process; the first design's run is
    # shorter: its counts are the same for every upload)
    before = one_invocation_per_event(aws_clients(None), 40)
    now = buffered(aws_clients(None), 200)
    # THEN before: an invocation per upload, with a message and a depth read each (the scaler's
    # five ListJobs calls are free, but not instant)
    assert before.invocations == 40
    assert +before.calls == Counter(
        {"SendMessageBatch": 40, "GetQueueAttributes": 40, "batch:ListJobs": 200}
    )
    # AND now: one SendMessage per event into the buffer, and per 100 uploads one invocation,
    # ten receives, ten sends and ten deletes, ten messages each
    assert now.invocations == 2
    assert +now.calls == Counter(
        {"SendMessage": 200, "ReceiveMessage": 20, "SendMessageBatch": 20, "DeleteMessageBatch": 20}
    )
    # AND at list prices (request charges only: no time is measured here) the buffer costs less
    # per million uploads: 1.3 SQS requests and 0.01 invocations per upload, against 2 and 1
    before_cost = cost_per_million(before.use(seconds=0.0))
    now_cost = cost_per_million(now.use(seconds=0.0))
    assert (round(before_cost.sqs, 2), round(before_cost.invocations, 2)) == (0.80, 0.20)
    assert (round(now_cost.sqs, 2), round(now_cost.invocations, 3)) == (0.52, 0.002)
    assert now_cost.total < before_cost.total


@pytest.fixture
def moto_endpoint(moto_server: str) -> Iterator[str]:
    """The moto server, with Batch recording jobs instead of running containers."""
    _moto_api(moto_server, "config", {"batch": {"use_docker": False}})
    yield moto_server
    _moto_api(moto_server, "config", {"batch": {"use_docker": True}})


def _moto_api(url: str, path: str, body: dict[str, Any]) -> None:
    import urllib.request

    request = urllib.request.Request(
        f"{url}/moto-api/{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)


def test_the_same_requests_over_http_with_time_per_invocation(moto_endpoint: str) -> None:
    # GIVEN a moto server on loopback WHEN both designs carry uploads over real HTTP
    before = one_invocation_per_event(aws_clients(moto_endpoint), 20)
    now = buffered(aws_clients(moto_endpoint), 100)
    # THEN the requests are those counted in-process, and every invocation was timed (what the
    # times are is for the README's measurement, not for a test)
    assert before.calls["SendMessageBatch"] == before.calls["GetQueueAttributes"] == 20
    assert (now.invocations, now.calls["SendMessageBatch"], now.calls["ReceiveMessage"]) == (
        1,
        10,
        10,
    )
    assert len(before.wall) == 20 and len(now.wall) == 1
    assert all(seconds > 0 for seconds in before.wall + now.wall)


def _removal_batch(aws: dict[str, Any], count: int) -> Run:
    """One batch of ``count`` delete events whose images are gone and whose features exist."""
    s3, sqs = aws["s3"], aws["sqs"]
    s3.create_bucket(Bucket=IMAGES)
    s3.create_bucket(Bucket=OUTPUT.bucket)
    for i in range(count):
        s3.put_object(
            Bucket=OUTPUT.bucket, Key=OUTPUT.feature_key(f"uploads/{i:06d}.jpg"), Body=b"x"
        )
    queue_url = sqs.create_queue(QueueName="work-removals")["QueueUrl"]
    settings = Settings(queue_url=queue_url, output=OUTPUT, input_prefix="uploads/")
    keys = [f"uploads/{i:06d}.jpg" for i in range(count)]
    gone = "Object Deleted"
    event = sqs_event(
        *(eventbridge_s3_event(IMAGES, k, detail_type=gone, version_id=None) for k in keys)
    )
    run = Run(count)
    run.calls = count_calls(s3)
    summary = run.timed(lambda: handle(event, settings, sqs=sqs, s3=s3, batch=None))
    assert summary["deletes"]["deleted"] == count
    return run


def measure(endpoint: str, *, uploads: int, one_per_event: int, repeats: int) -> dict[str, Any]:
    """The README's figures, against the moto server at ``endpoint``."""
    _moto_api(endpoint, "config", {"batch": {"use_docker": False}})
    befores, nows, removals = [], [], []
    for _ in range(repeats):
        _moto_api(endpoint, "reset", {})
        befores.append(one_invocation_per_event(aws_clients(endpoint), one_per_event))
        _moto_api(endpoint, "reset", {})
        nows.append(buffered(aws_clients(endpoint), uploads))
        _moto_api(endpoint, "reset", {})
        removals.append(_removal_batch(aws_clients(endpoint), BATCH_SIZE))
    before, now = befores[-1], nows[-1]
    before_wall = statistics.median(s for run in befores for s in run.wall)
    before_cpu = statistics.median(s for run in befores for s in run.cpu)
    now_wall = statistics.median(s for run in nows for s in run.wall)
    now_cpu = statistics.median(s for run in nows for s in run.cpu)
    before_lambda = statistics.median(run.lambda_seconds() for run in befores)
    now_lambda = statistics.median(run.lambda_seconds() for run in nows)
    removal_wall = statistics.median(s for run in removals for s in run.wall)
    designs = {}
    for name, run, wall, cpu, on_lambda, per_invocation, concurrency in (
        ("one invocation per event", before, before_wall, before_cpu, before_lambda, 1, 1),
        ("buffered", now, now_wall, now_cpu, now_lambda, BATCH_SIZE, MAX_CONCURRENCY),
    ):
        use = run.use(on_lambda)
        cost = cost_per_million(use)
        designs[name] = {
            "requests_per_upload": {k: v / run.uploads for k, v in sorted((+run.calls).items())},
            "sqs_requests_per_upload": use.sqs_requests,
            "invocations_per_upload": use.invocations,
            "moto_wall_s_per_invocation": wall,
            "moto_cpu_s_per_invocation": cpu,
            "estimated_lambda_s_per_invocation": on_lambda,
            "usd_per_million": {
                "sqs": cost.sqs,
                "invocations": cost.invocations,
                "compute": cost.compute,
                "total": cost.total,
            },
            "uploads_per_s_per_invocation_moto": per_invocation / wall,
            "uploads_per_s_per_invocation_estimated_lambda": per_invocation / on_lambda,
            "concurrency": concurrency,
            "uploads_per_s_at_concurrency_moto": concurrency * per_invocation / wall,
            "uploads_per_s_at_concurrency_estimated_lambda": (
                concurrency * per_invocation / on_lambda
            ),
        }
    return {
        "label": "measured against moto on loopback (moto server in this process), not AWS",
        "uploads": uploads,
        "one_per_event_uploads": one_per_event,
        "repeats": repeats,
        "batch_size": BATCH_SIZE,
        "memory_mb": MEMORY_MB,
        "designs": designs,
        "removal_batch_of_100_moto_wall_s": removal_wall,
        "removal_requests_per_delete": {
            k: v / BATCH_SIZE for k, v in (+removals[-1].calls).items()
        },
        "ceil_batches": math.ceil(uploads / BATCH_SIZE),
    }


if __name__ == "__main__":  # pragma: no cover - the README's measurement
    import os
    import sys

    from moto.server import ThreadedMotoServer

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION
    )
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        figures = measure(f"http://{host}:{port}", uploads=1000, one_per_event=300, repeats=3)
    finally:
        server.stop()
    json.dump(figures, sys.stdout, indent=2)
    print()
