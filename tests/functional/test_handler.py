"""The producer Lambda against moto's SQS and Batch: real event shapes in, messages and jobs out."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from bottleneck_contract import logs
from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import ImageRef, encode
from producer_lambda import handler as handler_module
from producer_lambda.enqueue import SEND_BACKOFF
from producer_lambda.handler import LOGGER_NAME, EnqueueError, handle, lambda_handler
from producer_lambda.settings import ScalingSettings, Settings
from tests.factories import (
    FakeContext,
    eventbridge_s3_event,
    s3_delete_record,
    s3_event,
    s3_put_record,
    s3_test_event,
    scheduled_event,
    sns_envelope,
    sns_lambda_event,
    sqs_event,
)
from tests.moto_batch import REGION, BatchStack, create_batch_stack

IMAGES = "images"
OUTPUT = S3Location("feats", "resnet50/")


@pytest.fixture
def stack(batch: Any) -> BatchStack:
    """Compute environment, job queue and job definition in moto."""
    iam = boto3.client("iam", region_name=REGION)
    return create_batch_stack(iam, boto3.client("ec2", region_name=REGION), batch)


@pytest.fixture
def settings(queue_url: str, stack: BatchStack) -> Settings:
    """The function's settings: images under uploads/, features in another bucket, scaling on."""
    return Settings(
        queue_url=queue_url,
        output=OUTPUT,
        input_prefix="uploads/",
        scaling=ScalingSettings(
            stack.job_queue, stack.job_definition, max_jobs=4, messages_per_job=2
        ),
    )


@pytest.fixture
def enqueue_only(queue_url: str) -> Settings:
    """The same settings without scaling (no Batch stack to build)."""
    return Settings(queue_url=queue_url, output=OUTPUT, input_prefix="uploads/")


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    # logs.configure_logger() (which lambda_handler calls) stops the producer logger propagating;
    # put it back so that tests elsewhere that read it through caplog still see its records.
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """A function returning the JSON log lines written so far."""
    logs.configure_logger(LOGGER_NAME)

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]

    return read


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message body on the queue, parsed (moto delivers each message once)."""
    bodies: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return bodies
        bodies.extend(json.loads(m["Body"]) for m in got)


def jobs_of(batch: Any, stack: BatchStack) -> list[dict[str, Any]]:
    """Every job submitted to the stack's queue (moto marks them SUCCEEDED at once)."""
    found: list[dict[str, Any]] = []
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED"):
        found += batch.list_jobs(jobQueue=stack.job_queue, jobStatus=status)["jobSummaryList"]
    return found


def test_filtered_records_are_enqueued_with_real_keys(
    settings: Settings, sqs: Any, queue_url: str, batch: Any, stack: BatchStack
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    # The delete below looks at the output (for shards, a listing): the bucket exists
    s3.create_bucket(Bucket="feats")
    # GIVEN one S3 event with three images and every kind of record that is not work
    event = s3_event(
        s3_put_record(IMAGES, "uploads/cat 1.jpg", size=10, etag="e1"),
        s3_put_record(IMAGES, "uploads/c++/a+b.PNG", size=20, etag="e2"),
        s3_put_record(IMAGES, "uploads/été/☕.webp", size=30, etag="e3", version_id="v3"),
        s3_put_record("feats", "resnet50/uploads/cat 1.jpg.npy", size=8192),  # our own output
        s3_put_record("feats", "resnet50/uploads/odd.jpg", size=10),  # output, image suffix
        s3_put_record(IMAGES, "uploads/readme.txt", size=10),  # wrong suffix
        s3_put_record(IMAGES, "uploads/folder/.jpg", size=0),  # zero bytes
        s3_delete_record(IMAGES, "uploads/gone.jpg"),  # a delete: no work (see test_deletes)
        s3_put_record(IMAGES, "elsewhere/x.jpg", size=10),  # outside the input prefix
        s3_put_record(IMAGES, "uploads/cat 1.jpg", size=10, etag="e1"),  # S3 may repeat itself
    )
    # WHEN the function handles it
    summary = handle(event, settings, sqs=sqs, s3=s3, batch=batch)
    # THEN exactly the three images are on the queue, with their real keys
    assert sorted(drain(sqs, queue_url), key=lambda b: b["size"]) == [
        {"bucket": IMAGES, "key": "uploads/cat 1.jpg", "etag": "e1", "size": 10},
        {"bucket": IMAGES, "key": "uploads/c++/a+b.PNG", "etag": "e2", "size": 20},
        {
            "bucket": IMAGES,
            "key": "uploads/été/☕.webp",
            "etag": "e3",
            "version_id": "v3",
            "size": 30,
        },
    ]
    # and the summary says why every other record was skipped
    assert summary["enqueued"] == 3
    assert summary["failed"] == 0
    assert summary["skipped"] == {
        "empty-object": 1,
        "outside-input-prefix": 1,
        "output-prefix": 2,
        "suffix": 1,
    }
    # and the delete was looked at, found to have no feature file, and enqueued nothing
    assert summary["deletes"]["already-gone"] == 1
    # and the scaler ran once for the new backlog: ceil(3 / 2) = 2 jobs
    assert summary["jobs_submitted"] == 2
    assert len(jobs_of(batch, stack)) == 2
    assert json.loads(json.dumps(summary)) == summary  # a JSON summary


@pytest.mark.parametrize(
    "event",
    [
        s3_test_event(),
        sqs_event(s3_test_event()),
        sqs_event(sns_envelope(s3_test_event())),
        sns_lambda_event(s3_test_event()),
    ],
    ids=["direct", "sqs", "sqs-sns", "sns"],
)
def test_the_test_event_is_ignored(
    event: dict[str, Any],
    settings: Settings,
    sqs: Any,
    queue_url: str,
    batch: Any,
    stack: BatchStack,
) -> None:
    summary = handle(event, settings, sqs=sqs, batch=batch)
    assert summary["skipped"] == {"test-event": 1}
    assert (summary["enqueued"], summary["jobs_submitted"]) == (0, 0)
    assert drain(sqs, queue_url) == []
    assert jobs_of(batch, stack) == []


@pytest.mark.parametrize(
    "event",
    [
        sqs_event(s3_event(s3_put_record(IMAGES, "uploads/a b+c.jpg", size=3, etag="e"))),
        sqs_event(
            sns_envelope(s3_event(s3_put_record(IMAGES, "uploads/a b+c.jpg", size=3, etag="e")))
        ),
        sns_lambda_event(s3_event(s3_put_record(IMAGES, "uploads/a b+c.jpg", size=3, etag="e"))),
        eventbridge_s3_event(IMAGES, "uploads/a b+c.jpg", size=3, etag="e", version_id=None),
        sqs_event(
            eventbridge_s3_event(IMAGES, "uploads/a b+c.jpg", size=3, etag="e", version_id=None)
        ),
        sqs_event(encode(ImageRef(IMAGES, "uploads/a b+c.jpg", etag="e", size=3))),
    ],
    ids=["sqs", "sqs-sns", "sns", "eventbridge", "sqs-eventbridge", "sqs-own-body"],
)
def test_wrapped_events_are_unwrapped(
    event: dict[str, Any], enqueue_only: Settings, sqs: Any, queue_url: str
) -> None:
    summary = handle(event, enqueue_only, sqs=sqs, batch=None)
    assert summary["enqueued"] == 1
    assert drain(sqs, queue_url) == [
        {"bucket": IMAGES, "key": "uploads/a b+c.jpg", "etag": "e", "size": 3}
    ]


def test_a_malformed_record_costs_only_itself(
    enqueue_only: Settings, sqs: Any, queue_url: str, log_lines: Any
) -> None:
    # GIVEN an SQS batch with a good record between two that can never be parsed
    event = sqs_event(
        "not json",
        s3_event(s3_put_record(IMAGES, "uploads/ok.jpg")),
        {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]},
    )
    # WHEN it is handled THEN the good one is sent and the others are logged and counted
    summary = handle(event, enqueue_only, sqs=sqs, batch=None)
    assert [b["key"] for b in drain(sqs, queue_url)] == ["uploads/ok.jpg"]
    assert summary["skipped"] == {"malformed": 2}
    malformed = [line for line in log_lines() if line["message"] == "malformed-record"]
    assert len(malformed) == 2
    assert malformed[0]["message_id"].startswith("00000000")


def test_a_scheduled_event_runs_only_the_scaler(
    settings: Settings, sqs: Any, queue_url: str, batch: Any, stack: BatchStack
) -> None:
    # GIVEN 5 messages already waiting
    for i in range(5):
        sqs.send_message(
            QueueUrl=queue_url, MessageBody=encode(ImageRef(IMAGES, f"uploads/{i}.jpg"))
        )
    # WHEN the schedule fires
    summary = handle(scheduled_event(), settings, sqs=sqs, batch=batch)
    # THEN nothing is enqueued and ceil(5 / 2) = 3 jobs are submitted
    assert summary["kind"] == "scheduled"
    assert (summary["enqueued"], summary["skipped"], summary["jobs_submitted"]) == (0, {}, 3)
    assert len(drain(sqs, queue_url)) == 5
    assert len(jobs_of(batch, stack)) == 3


def test_scaler_errors_are_raised_on_schedule_and_logged_after_an_upload(
    queue_url: str, sqs: Any, batch: Any, log_lines: Any
) -> None:
    # GIVEN scaling settings naming a job queue that does not exist
    broken = Settings(
        queue_url=queue_url, output=OUTPUT, scaling=ScalingSettings("missing", "missing")
    )
    sqs.send_message(QueueUrl=queue_url, MessageBody=encode(ImageRef(IMAGES, "a.jpg")))
    # WHEN the schedule fires THEN the error surfaces (the invocation fails, and is visible)
    with pytest.raises(Exception, match="missing"):
        handle(scheduled_event(), broken, sqs=sqs, batch=batch)
    # WHEN an upload arrives THEN its message is still sent, and the scaler error only logged
    summary = handle(s3_event(s3_put_record(IMAGES, "b.jpg")), broken, sqs=sqs, batch=batch)
    assert (summary["enqueued"], summary["jobs_submitted"]) == (1, 0)
    assert sum(1 for line in log_lines() if line["message"] == "scale-failed") == 2


def test_without_scaling_settings_nothing_is_submitted(
    queue_url: str, sqs: Any, batch: Any, stack: BatchStack
) -> None:
    plain = Settings(queue_url=queue_url, output=OUTPUT)
    summary = handle(s3_event(s3_put_record(IMAGES, "b.jpg")), plain, sqs=sqs, batch=None)
    assert (summary["enqueued"], summary["jobs_submitted"]) == (1, 0)
    assert jobs_of(batch, stack) == []


def test_many_records_go_ten_per_call(enqueue_only: Settings, sqs: Any, queue_url: str) -> None:
    calls: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        calls.append(len(params["Entries"]))

    sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", count)
    event = s3_event(*(s3_put_record(IMAGES, f"uploads/{i:02d}.jpg") for i in range(25)))
    summary = handle(event, enqueue_only, sqs=sqs, batch=None)
    assert summary["enqueued"] == 25
    assert calls == [10, 10, 5]
    assert sorted(b["key"] for b in drain(sqs, queue_url)) == [
        f"uploads/{i:02d}.jpg" for i in range(25)
    ]


class FlakySQS:
    """The moto SQS client, with SendMessageBatch entries failing as the test says.

    ``transient``: key -> how many calls fail that entry with ``SenderFault`` false (throttling,
    an internal error); ``permanent``: keys whose entries SQS rejects as the sender's fault.
    Failed entries are not passed on, so they are really not on the queue.
    """

    def __init__(self, real: Any, transient: dict[str, int], permanent: set[str]) -> None:
        self.real = real
        self.transient = dict(transient)
        self.permanent = permanent
        self.calls: list[list[str]] = []

    def send_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        """Fail the chosen entries, send the rest for real, and merge the answers."""
        keys = {e["Id"]: json.loads(e["MessageBody"])["key"] for e in Entries}
        self.calls.append(sorted(keys.values()))
        failed: list[dict[str, Any]] = []
        passed: list[dict[str, Any]] = []
        for entry in Entries:
            key = keys[entry["Id"]]
            if key in self.permanent:
                failed.append(
                    {"Id": entry["Id"], "SenderFault": True, "Code": "InvalidParameterValue",
                     "Message": "message attribute invalid"}
                )  # fmt: skip
            elif self.transient.get(key, 0) > 0:
                self.transient[key] -= 1
                failed.append(
                    {"Id": entry["Id"], "SenderFault": False, "Code": "InternalError",
                     "Message": "try again"}
                )  # fmt: skip
            else:
                passed.append(entry)
        response: dict[str, Any] = {"Successful": [], "Failed": failed}
        if passed:
            real = self.real.send_message_batch(QueueUrl=QueueUrl, Entries=passed)
            response["Successful"] = real.get("Successful", [])
            response["Failed"] += real.get("Failed", [])
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_partial_batch_failure_is_retried_then_reported_and_raised(
    enqueue_only: Settings, sqs: Any, queue_url: str, log_lines: Any
) -> None:
    # GIVEN SQS failing one entry once, one entry every time, and rejecting a third outright
    flaky = FlakySQS(
        sqs,
        transient={"uploads/once.jpg": 1, "uploads/always.jpg": 99},
        permanent={"uploads/rejected.jpg"},
    )
    keys = ["ok1", "once", "always", "rejected", "ok2"]
    event = s3_event(*(s3_put_record(IMAGES, f"uploads/{k}.jpg") for k in keys))
    # WHEN the function handles the event
    with pytest.raises(EnqueueError, match="2 of 5 messages not sent") as caught:
        handle(event, enqueue_only, sqs=flaky, batch=None, sleep=lambda _: None)  # type: ignore[arg-type]
    # THEN the entry that failed once was retried and sent, with the two good ones, once each
    assert sorted(b["key"] for b in drain(sqs, queue_url)) == [
        "uploads/ok1.jpg",
        "uploads/ok2.jpg",
        "uploads/once.jpg",
    ]
    # and only the failing entries were sent again: the rejected one never, the other until the
    # attempts ran out
    assert flaky.calls[0] == sorted(f"uploads/{k}.jpg" for k in keys)
    assert flaky.calls[1] == ["uploads/always.jpg", "uploads/once.jpg"]
    assert flaky.calls[2:] == [["uploads/always.jpg"]] * (SEND_BACKOFF.attempts - 2)
    # and only what still failed is reported, one log line each, and raised (so S3 retries)
    reported = {
        line["key"]: line["code"] for line in log_lines() if line["message"] == "send-failed"
    }
    assert reported == {
        "uploads/always.jpg": "InternalError",
        "uploads/rejected.jpg": "InvalidParameterValue",
    }
    assert "uploads/" in str(caught.value)


def test_a_batch_call_that_fails_as_a_whole_is_not_tried_again(
    enqueue_only: Settings, sqs: Any, queue_url: str, log_lines: Any
) -> None:
    from botocore.exceptions import ClientError

    # GIVEN a SendMessageBatch that raises: botocore's standard mode, the one layer that retries
    # a raised SQS call, has spent its tries (the proxy stands where they would be)
    failures = [
        ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "x"}}, "SendMessageBatch")
    ]

    class Outage(FlakySQS):
        def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
            self.calls.append([])
            if failures:
                raise failures.pop()
            return super().send_message_batch(**kwargs)

    flaky = Outage(sqs, {}, set())

    # WHEN the function handles an upload
    with pytest.raises(EnqueueError, match="1 of 1 messages not sent"):
        handle(
            s3_event(s3_put_record(IMAGES, "uploads/a.jpg")),
            enqueue_only,
            sqs=flaky,  # type: ignore[arg-type]
            batch=None,
            sleep=lambda _: None,
        )

    # THEN the call was made once (no second layer multiplies botocore's tries), the image is
    # reported with the error, and raised so that the S3 event is retried as a whole
    assert flaky.calls == [[]]
    assert drain(sqs, queue_url) == []
    failed = [line for line in log_lines() if line["message"] == "send-failed"]
    assert [(line["key"], line["code"]) for line in failed] == [
        ("uploads/a.jpg", "ServiceUnavailable")
    ]


def test_moto_s3_notifications_through_sqs(
    settings: Settings, sqs: Any, queue_url: str, batch: Any
) -> None:
    # GIVEN a bucket that notifies an SQS queue, as S3 itself would (moto: no sequencer and no
    # versionId in its records, which the parser must not need)
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=IMAGES)
    uploads_url = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    uploads_arn = sqs.get_queue_attributes(QueueUrl=uploads_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=IMAGES,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": uploads_arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    keys = ["uploads/a cat.jpg", "uploads/1+1=2.png", "uploads/日本.jpg", "uploads/notes.txt"]
    for key in keys:
        s3.put_object(Bucket=IMAGES, Key=key, Body=b"\xff\xd8 not really a jpeg")
    received = sqs.receive_message(QueueUrl=uploads_url, MaxNumberOfMessages=10)["Messages"]
    # WHEN the function is triggered by that queue
    summary = handle(sqs_event(*(m["Body"] for m in received)), settings, sqs=sqs, batch=batch)
    # THEN the three images are enqueued under their real keys, with their real ETags
    bodies = drain(sqs, queue_url)
    assert sorted(b["key"] for b in bodies) == sorted(keys[:3])
    etag = s3.head_object(Bucket=IMAGES, Key=keys[0])["ETag"].strip('"')
    assert {b["etag"] for b in bodies} == {etag}
    assert summary["skipped"].get("suffix") == 1


def test_lambda_handler_reads_its_environment(
    monkeypatch: pytest.MonkeyPatch, queue_url: str, sqs: Any
) -> None:
    # GIVEN the function's environment (no scaling configured)
    monkeypatch.setenv("BOTTLENECK_QUEUE_URL", queue_url)
    monkeypatch.setenv("BOTTLENECK_OUTPUT", "s3://feats/resnet50/")
    monkeypatch.setenv("BOTTLENECK_SUFFIXES", ".jpg")
    for cached in (
        handler_module._settings,
        handler_module._sqs_client,
        handler_module._s3_client,
        handler_module._batch_client,
    ):
        cached.cache_clear()
    try:
        # WHEN Lambda invokes the entry point
        summary = lambda_handler(
            s3_event(s3_put_record(IMAGES, "x.jpg"), s3_put_record(IMAGES, "y.png")), FakeContext()
        )
    finally:
        for cached in (
            handler_module._settings,
            handler_module._sqs_client,
            handler_module._s3_client,
            handler_module._batch_client,
        ):
            cached.cache_clear()
    # THEN it enqueued with its own clients and settings
    assert (summary["enqueued"], summary["skipped"]) == (1, {"suffix": 1})
    assert [b["key"] for b in drain(sqs, queue_url)] == ["x.jpg"]
