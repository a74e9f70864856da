"""``bottleneck-status`` against moto with known counts (Batch through a botocore Stubber)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from bottleneck_contract.locations import OutputTemplate, S3Location
from bottleneck_tools import status
from producer_lambda.scaler import Backlog
from tests.fakes import create_work_queue, put_feature

REGION = "us-east-1"
JOB_QUEUE = "gpu-queue"


@dataclass
class World:
    s3: Any
    sqs: Any
    batch: Any
    stubber: Stubber
    queue_url: str
    dlq_url: str


def _job(job_id: str, state: str) -> dict[str, Any]:
    return {"jobId": job_id, "jobName": f"bottleneck-{job_id}", "status": state, "createdAt": 1}


def stub_jobs_round(stubber: Stubber) -> None:
    """One count_jobs round: RUNNABLE 2 (over two pages), RUNNING 3, SUCCEEDED 1, others 0."""
    pages: dict[str, list[dict[str, Any]]] = {
        "SUBMITTED": [{"jobSummaryList": []}],
        "PENDING": [{"jobSummaryList": []}],
        "RUNNABLE": [
            {"jobSummaryList": [_job("r1", "RUNNABLE")], "nextToken": "t1"},
            {"jobSummaryList": [_job("r2", "RUNNABLE")]},
        ],
        "STARTING": [{"jobSummaryList": []}],
        "RUNNING": [{"jobSummaryList": [_job(f"run{i}", "RUNNING") for i in range(3)]}],
        "SUCCEEDED": [{"jobSummaryList": [_job("s1", "SUCCEEDED")]}],
        "FAILED": [{"jobSummaryList": []}],
    }
    for state in status.JOB_STATES:
        token = None
        for page in pages[state]:
            expected: dict[str, Any] = {"jobQueue": JOB_QUEUE, "jobStatus": state}
            if token:
                expected["nextToken"] = token
            stubber.add_response("list_jobs", page, expected)
            token = page.get("nextToken")


@pytest.fixture
def world(aws: None) -> Iterator[World]:
    """GIVEN a work queue with 3 visible, 2 in flight and 1 delayed message, a DLQ with 6
    dead letters (3 not-an-image, 2 truncated, 1 moved by redrive), and 4 feature files."""
    s3 = boto3.client("s3", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    batch = boto3.client("batch", region_name=REGION)
    queue_url, dlq_url = create_work_queue(sqs)
    for i in range(5):
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"bucket": "b", "key": f"{i}"}))
    got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=2, VisibilityTimeout=600)
    assert len(got["Messages"]) == 2
    sqs.send_message(QueueUrl=queue_url, MessageBody="{}", DelaySeconds=600)

    def dead(code: str | None) -> None:
        attrs: dict[str, Any] = {}
        if code:
            attrs = {
                "error-code": {"DataType": "String", "StringValue": code},
                "error-detail": {"DataType": "String", "StringValue": "detail"},
            }
        sqs.send_message(QueueUrl=dlq_url, MessageBody="x", MessageAttributes=attrs)

    for code in ["not-an-image"] * 3 + ["truncated"] * 2 + [None]:
        dead(code)

    s3.create_bucket(Bucket="feats")
    for i in range(4):
        s3.put_object(Bucket="feats", Key=f"resnet50/cats/{i}.jpg.npy", Body=b"x")
    s3.put_object(Bucket="feats", Key="resnet50/notes.txt", Body=b"not a feature")
    s3.put_object(Bucket="feats", Key="other/cats/9.jpg.npy", Body=b"elsewhere")

    with Stubber(batch) as stubber:
        yield World(s3, sqs, batch, stubber, queue_url, dlq_url)


class FakeTime:
    """A clock that only moves when the code under test sleeps; sleeping can also act."""

    def __init__(self, on_sleep: Any = None) -> None:
        self.now = 1000.0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def options(world: World, **overrides: Any) -> status.Options:
    base: dict[str, Any] = {
        "queue_url": world.queue_url,
        "output": S3Location("feats", "resnet50/"),
        "job_queue": JOB_QUEUE,
        "interval": 10.0,
        "json": True,
    }
    base.update(overrides)
    return status.Options(**base)


def run(world: World, opts: status.Options, fake: FakeTime, **kwargs: Any) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = status.run(
        opts,
        sqs=world.sqs,
        s3=world.s3,
        batch=world.batch,
        stdout=out,
        stderr=err,
        sleep=fake.sleep,
        clock=fake.clock,
        now=lambda: datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        **kwargs,
    )
    assert err.getvalue() == ""
    return code, out.getvalue()


def visible_dead_letters(world: World) -> int:
    return status.read_backlog(world.sqs, world.dlq_url).visible


def test_status_reports_known_counts_and_a_rate(world: World) -> None:
    # GIVEN: while the tool waits between its two samples, one message is done (deleted) and
    # one more feature file is written
    def progress() -> None:
        m = world.sqs.receive_message(QueueUrl=world.queue_url, MaxNumberOfMessages=1)
        world.sqs.delete_message(
            QueueUrl=world.queue_url, ReceiptHandle=m["Messages"][0]["ReceiptHandle"]
        )
        world.s3.put_object(Bucket="feats", Key="resnet50/cats/new.jpg.npy", Body=b"x")

    stub_jobs_round(world.stubber)
    stub_jobs_round(world.stubber)

    # WHEN
    code, text = run(world, options(world), FakeTime(progress))

    # THEN
    assert code == 0
    doc = json.loads(text)
    assert doc["backlog"] == {"visible": 2, "in_flight": 2, "delayed": 1, "total": 5}
    assert doc["dead_letters"] == {
        "depth": 6,
        "sampled": 6,
        "complete": True,
        "by_code": {"not-an-image": 3, "retries-exhausted": 1, "truncated": 2},
    }
    assert doc["jobs"] == {
        "SUBMITTED": 0,
        "PENDING": 0,
        "RUNNABLE": 2,
        "STARTING": 0,
        "RUNNING": 3,
        "SUCCEEDED": 1,
        "FAILED": 0,
    }
    assert doc["features"] == 5
    assert doc["rate"] == {
        "window_s": 10.0,
        "drain_per_s": 0.1,
        "features_per_s": 0.1,
        "eta_s": 50.0,
    }
    world.stubber.assert_no_pending_responses()
    # Peeking consumed nothing: every dead letter is visible again.
    assert visible_dead_letters(world) == 6


def test_text_view_names_every_part(world: World) -> None:
    stub_jobs_round(world.stubber)
    code, text = run(world, options(world, json=False, interval=0.0), FakeTime())
    assert code == 0
    assert "6 messages (visible 3, in flight 2, delayed 1)" in text
    assert "dead letters  6: not-an-image 3, truncated 2, retries-exhausted 1" in text
    assert "RUNNABLE 2, RUNNING 3, SUCCEEDED 1" in text
    assert "4 files in s3://feats/resnet50/" in text
    assert "needs two samples" in text


def test_peek_samples_at_most_the_limit_and_says_so(world: World) -> None:
    dlq = status.peek_dead_letters(world.sqs, world.dlq_url, limit=4, wait_seconds=0)
    assert dlq.depth == 6
    assert dlq.sampled == 4
    assert not dlq.complete
    assert sum(dlq.by_code.values()) == 4
    assert visible_dead_letters(world) == 6


def test_watch_refreshes_and_peeks_an_unchanged_dlq_once(world: World) -> None:
    for _ in range(3):
        stub_jobs_round(world.stubber)
    code, text = run(world, options(world, watch=5.0), FakeTime(), max_views=3)
    assert code == 0
    views = [json.loads(line) for line in text.splitlines()]
    assert len(views) == 3
    assert views[0]["rate"] is None
    assert views[2]["rate"]["window_s"] == 10.0
    assert views[2]["rate"]["eta_s"] is None  # nothing drained: no estimate
    assert all(v["dead_letters"]["by_code"]["not-an-image"] == 3 for v in views)
    got = world.sqs.receive_message(
        QueueUrl=world.dlq_url,
        MaxNumberOfMessages=10,
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    )["Messages"]
    # One peek (this receive is the second)
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in got} == {"2"}


def test_no_redrive_policy_and_no_dlq_flag(aws: None) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="plain")["QueueUrl"]
    out = io.StringIO()
    code = status.run(
        status.Options(queue_url=url, interval=0.0),
        sqs=sqs,
        s3=None,
        batch=None,
        stdout=out,
    )
    assert code == 0
    assert "dead letters  - (no --dead-letter-url" in out.getvalue()


def test_missing_queue_is_one_line_error(aws: None) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    err = io.StringIO()
    code = status.run(
        status.Options(queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/nope"),
        sqs=sqs,
        s3=None,
        batch=None,
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == 1
    assert err.getvalue().count("\n") == 1
    assert err.getvalue().startswith("bottleneck-status: error: ")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "--queue-url"),
        (["--queue-url", "q", "--interval", "soon"], "--interval"),
        (["--queue-url", "q", "--watch", "0"], "--watch"),
        (["--queue-url", "q", "--output", "feats/x"], "--output"),
        (["--queue-url", "q", "--peek", "-1"], "--peek"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        status.parse(argv, {})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert needle in err


def _sample(at: float, total: int, features: int | None) -> status.Sample:
    return status.Sample(
        at=at,
        taken=datetime(2024, 5, 1, tzinfo=UTC),
        backlog=Backlog(visible=total),
        features=features,
    )


def test_estimate_arithmetic() -> None:
    rate = status.estimate(_sample(0, 100, 10), _sample(20, 60, 50))
    assert rate is not None
    assert rate.drain_per_s == 2.0
    assert rate.features_per_s == 2.0
    assert rate.eta_s == 30.0
    growing = status.estimate(_sample(0, 100, None), _sample(10, 120, None))
    assert growing is not None
    assert growing.eta_s is None
    assert growing.features_per_s is None
    done = status.estimate(_sample(0, 5, 0), _sample(10, 0, 5))
    assert done is not None
    assert done.eta_s == 0.0
    assert status.estimate(_sample(5, 1, 0), _sample(5, 1, 0)) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (42.4, "42s"), (185, "3m05s"), (3720, "1h02m"), (90000, "1d01h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert status.format_duration(seconds) == text


# ---------------------------------------------------------------------------- versions

FP_A, FP_B = "0123456789abcdef", "fedcba9876543210"


def put_versions(world: World) -> None:
    """GIVEN under features/: resnet50.a1_in1k/FP_A with 3 files and test_vit/FP_B with 1 (and
    quarantine markers), beside a flat output's 2 files left from before the layout changed."""
    for version, count in ((f"resnet50.a1_in1k/{FP_A}", 3), (f"test_vit/{FP_B}", 1)):
        for i in range(count):
            put_feature(
                world.s3,
                f"features/{version}/",
                f"images/{i}.jpg",
                etag="e",
                fingerprint=version[-16:],
            )
        world.s3.put_object(
            Bucket="feats", Key=f"features/{version}/_bottleneck/running/m", Body=b""
        )
    for i in range(2):
        put_feature(world.s3, "features/", f"images/{i}.jpg", etag="e")


@pytest.mark.parametrize(
    "output", ["s3://feats/features/", "s3://feats/features/{model}/{fingerprint}/"]
)
def test_a_root_of_versions_is_counted_per_version(world: World, output: str) -> None:
    put_versions(world)
    opts = status.parse(["--queue-url", world.queue_url, "--output", output, "--json"], {})
    # WHEN status looks at the root, or at the stack's template
    stub_jobs_round(world.stubber)
    code, text = run(world, replace(opts, job_queue=JOB_QUEUE, interval=0.0), FakeTime())
    # THEN each <model>/<fingerprint> has its own count, the flat leftovers are named, not counted
    assert code == 0
    doc = json.loads(text)
    assert doc["versions"] == {f"resnet50.a1_in1k/{FP_A}": 3, f"test_vit/{FP_B}": 1}
    assert doc["features"] == 4
    assert doc["other_folders"] == ["features/images/"]


def test_the_text_view_lists_the_versions(world: World) -> None:
    put_versions(world)
    stub_jobs_round(world.stubber)
    opts = options(world, output=S3Location("feats", "features/"), json=False, interval=0.0)
    code, text = run(world, opts, FakeTime())
    assert code == 0
    assert "4 files in s3://feats/features/ (2 versions: <model>/<fingerprint>, files)" in text
    assert f"                resnet50.a1_in1k/{FP_A}  3\n" in text
    assert f"                test_vit/{FP_B}          1\n" in text
    assert "also under it, in no version (not counted): images/" in text


def test_a_concrete_version_prefix_is_counted_as_before(world: World) -> None:
    # GIVEN the same root WHEN status is given one version's prefix THEN one count, no versions
    put_versions(world)
    stub_jobs_round(world.stubber)
    version = S3Location("feats", f"features/resnet50.a1_in1k/{FP_A}/")
    code, text = run(world, options(world, output=version, interval=0.0), FakeTime())
    doc = json.loads(text)
    assert (code, doc["features"]) == (0, 3)
    assert "versions" not in doc


def test_a_template_whose_root_has_no_version_yet_counts_zero(world: World) -> None:
    stub_jobs_round(world.stubber)
    template = OutputTemplate.parse("s3://feats/new/{model}/{fingerprint}/")
    code, text = run(world, options(world, output=template, interval=0.0), FakeTime())
    doc = json.loads(text)
    assert (code, doc["features"], doc["versions"]) == (0, 0, {})
