"""The one retry policy: the backoff function, the retry loop, one layer per AWS call.

The clients are real boto3 clients pointed at a loopback port where nothing listens (every
request is refused at once), with a counter on botocore's ``before-send`` event: it counts the
HTTP requests really made, whichever layer made them.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from bottleneck_contract.retry import Backoff, backoff, call_with_backoff
from consumer import aws
from producer_lambda.backoff import is_throttling, is_transient
from producer_lambda.scaler import ACTIVE_STATES, scale
from producer_lambda.settings import ScalingSettings
from tests.fake_batch import FakeBatch, throttled


def client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, "Operation")


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 5000])
def test_backoff_is_uniform_below_the_capped_exponential(attempt: int) -> None:
    # GIVEN a base of 0.25 s and a cap of 4 s
    ceiling = min(4.0, 0.25 * 2**attempt) if attempt < 64 else 4.0
    # WHEN the jitter is at either end, or in the middle
    lowest = backoff(attempt, base=0.25, cap=4.0, rand=lambda: 0.0)
    middle = backoff(attempt, base=0.25, cap=4.0, rand=lambda: 0.5)
    highest = backoff(attempt, base=0.25, cap=4.0, rand=lambda: 0.999)
    # THEN the wait spans [0, ceiling): full jitter, never past the cap, even for huge attempts
    assert lowest == 0.0
    assert middle == pytest.approx(ceiling / 2)
    assert highest == pytest.approx(0.999 * ceiling)


def test_backoff_refuses_negative_inputs() -> None:
    with pytest.raises(ValueError, match="attempt, base and cap"):
        backoff(-1, base=0.1, cap=1.0)


def test_the_loop_waits_the_policys_delays_and_raises_the_last_error() -> None:
    # GIVEN a call that always fails with an error the caller retries
    sleeps: list[float] = []
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise client_error("SlowDown", 503)

    policy = Backoff(attempts=4, base=0.5, cap=1.5)
    # WHEN it goes through the loop (jitter pinned to its maximum)
    with pytest.raises(ClientError, match="SlowDown"):
        call_with_backoff(
            call, backoff=policy, retry_if=lambda exc: True, sleep=sleeps.append, rand=lambda: 1.0
        )
    # THEN it tried `attempts` times, waiting the backoff's ceilings in between
    assert calls == 4
    assert sleeps == [0.5, 1.0, 1.5]
    assert policy.worst_case() == sum(sleeps)


def test_the_loop_raises_at_once_what_the_caller_does_not_retry() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError, match="AccessDenied"):
        call_with_backoff(call, backoff=Backoff(attempts=5), retry_if=aws.is_retryable)
    assert calls == 1


@pytest.mark.parametrize(
    ("error", "consumer_retries", "producer_transient", "throttling"),
    [
        (client_error("SlowDown", 503), True, True, True),
        (client_error("ThrottlingException", 400), True, True, True),
        (client_error("TooManyRequestsException", 429), True, True, True),
        (client_error("InternalError", 500), True, True, False),
        (client_error("ConditionalRequestConflict", 409), True, False, False),
        (client_error("AccessDenied", 403), False, False, False),
        (client_error("NoSuchKey", 404), False, False, False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True, True, False),
        (ValueError("not AWS"), False, False, False),
    ],
)
def test_which_errors_each_layer_retries(
    error: BaseException,
    consumer_retries: bool,
    producer_transient: bool,
    throttling: bool,
) -> None:
    assert aws.is_retryable(error) is consumer_retries
    assert is_transient(error) is producer_transient
    assert is_throttling(error) is throttling


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> str:
    """An endpoint on loopback that refuses every connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")  # what the environment says must not count
    return url


def requests_made(client: Any) -> list[int]:
    counter = [0]

    def count(**_: Any) -> None:
        counter[0] += 1

    client.meta.events.register("before-send", count)
    return counter


def test_the_consumers_clients_leave_every_retry_to_its_own_layer(nowhere: str) -> None:
    # GIVEN the consumer's clients, with a request counter on each
    clients = aws.make_clients(pool_size=4)
    s3_requests, sqs_requests = requests_made(clients.s3), requests_made(clients.sqs)

    # WHEN a call fails to connect, made directly and then through aws.call
    with pytest.raises(EndpointConnectionError):
        clients.sqs.list_queues()
    with pytest.raises(EndpointConnectionError):
        aws.call(clients.s3.head_object, Bucket="b", Key="k")

    # THEN botocore made one request per call: the only retries are aws.call's own tries
    assert sqs_requests == [1]
    assert s3_requests == [aws.CALL_BACKOFF.attempts]


class Backlog:
    """The SQS side of the scaler: a queue with some messages waiting."""

    def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"ApproximateNumberOfMessages": "5"}}


def test_submit_job_is_retried_only_when_throttled_and_reads_on_any_transient_error() -> None:
    # GIVEN Batch answering the first ListJobs with a 500, throttling the first SubmitJob, and
    # failing the next SubmitJob with a 500 (after which the job may exist all the same)
    fake = FakeBatch()
    tries: Counter[str] = Counter()
    answers = {
        "ListJobs": [client_error("InternalError", 500)],
        "SubmitJob": [throttled("SubmitJob"), client_error("InternalError", 500)],
    }

    def planned(operation: str) -> Any:
        def hook(kwargs: dict[str, Any]) -> None:
            tries[operation] += 1
            if answers[operation]:
                raise answers[operation].pop(0)

        return hook

    fake.hooks = {operation: planned(operation) for operation in answers}
    sleeps: list[float] = []

    # WHEN the scaler runs
    with pytest.raises(ClientError, match="InternalError"):
        scale(
            Backlog(),  # type: ignore[arg-type]
            fake,  # type: ignore[arg-type]
            "queue-url",
            ScalingSettings("gpu", "bottleneck-consumer", max_jobs=2, messages_per_job=1),
            backoff=Backoff(attempts=3, base=0.01, cap=0.01),
            sleep=sleeps.append,
        )

    # THEN the listing that failed was tried again, and so was the throttled submission, but not
    # the one that failed with a 500: it is raised, and the next run counts what exists
    assert tries["ListJobs"] == len(ACTIVE_STATES) + 1
    assert tries["SubmitJob"] == 2
    assert len(sleeps) == 2
    assert fake.count(*ACTIVE_STATES) == 0
