"""`bottleneck-enqueue --from-dead-letter`: dead letters back to the work queue after a fix."""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import pytest

from bottleneck_contract.messages import ImageRef, encode
from bottleneck_tools import enqueue

REGION = "us-east-1"


def _attrs(code: str) -> dict[str, Any]:
    return {
        "error-code": {"DataType": "String", "StringValue": code},
        "error-detail": {"DataType": "String", "StringValue": f"{code} detail"},
    }


@pytest.fixture
def queues(aws: None) -> tuple[Any, str, str]:
    sqs = boto3.client("sqs", region_name=REGION)
    work = sqs.create_queue(QueueName="work")["QueueUrl"]
    dlq = sqs.create_queue(QueueName="work-dlq")["QueueUrl"]
    letters = [("a.jpg", "truncated"), ("b.jpg", "aws-error"), ("c.jpg", "aws-error")]
    for key, code in letters:
        sqs.send_message(
            QueueUrl=dlq,
            MessageBody=encode(ImageRef("images", key)),
            MessageAttributes=_attrs(code),
        )
    # One moved by SQS's own redrive after maxReceiveCount: no error-code attribute.
    sqs.send_message(QueueUrl=dlq, MessageBody=encode(ImageRef("images", "d.jpg")))
    return sqs, work, dlq


def _run(sqs: Any, *argv: str) -> tuple[int, dict[str, Any]]:
    options = enqueue.parse(list(argv), {})
    out = io.StringIO()
    code = enqueue.run(options, s3=None, sqs=sqs, batch=None, stdout=out)  # type: ignore[arg-type]
    return code, json.loads(out.getvalue().splitlines()[-1])


def _keys(sqs: Any, url: str) -> list[str]:
    keys: list[str] = []
    while True:
        batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not batch:
            return sorted(keys)
        keys += [json.loads(m["Body"])["key"] for m in batch]


def test_only_the_chosen_error_code_goes_back(queues: tuple[Any, str, str]) -> None:
    sqs, work, dlq = queues

    code, summary = _run(
        sqs, "--from-dead-letter", dlq, "--queue-url", work, "--error-code", "aws-error"
    )

    assert code == 0
    assert summary["by_error_code"] == {"aws-error": 2, "truncated": 1, "retries-exhausted": 1}
    assert summary["moved_by_error_code"] == {"aws-error": 2}
    assert _keys(sqs, work) == ["b.jpg", "c.jpg"]
    # AND the others are visible again in the dead-letter queue at once, not after a timeout
    assert _keys(sqs, dlq) == ["a.jpg", "d.jpg"]


def test_everything_goes_back_without_a_filter(queues: tuple[Any, str, str]) -> None:
    sqs, work, dlq = queues

    code, summary = _run(sqs, "--from-dead-letter", dlq, "--queue-url", work)

    assert code == 0 and summary["moved"] == 4
    assert _keys(sqs, work) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert _keys(sqs, dlq) == []


def test_dry_run_moves_nothing_and_counts_by_code(queues: tuple[Any, str, str]) -> None:
    sqs, work, dlq = queues

    code, summary = _run(sqs, "--from-dead-letter", dlq, "--queue-url", work, "--dry-run")

    assert code == 0 and summary["moved"] == 0 and summary["dead_letters"] == 4
    assert _keys(sqs, work) == []
    assert len(_keys(sqs, dlq)) == 4


def test_a_failed_send_leaves_the_letter_in_place(queues: tuple[Any, str, str]) -> None:
    sqs, work, dlq = queues
    real = sqs.send_message_batch

    def half_fails(**kwargs: Any) -> dict[str, Any]:
        first, *rest = kwargs["Entries"]
        response = real(QueueUrl=kwargs["QueueUrl"], Entries=rest) if rest else {}
        failed = {"Id": first["Id"], "Code": "InternalError", "SenderFault": False, "Message": "x"}
        return {"Successful": response.get("Successful", []), "Failed": [failed]}

    sqs.send_message_batch = half_fails

    code, summary = _run(sqs, "--from-dead-letter", dlq, "--queue-url", work)

    assert code == enqueue.EXIT_FAILED
    assert summary["failed"] >= 1
    assert len(_keys(sqs, work)) + len(_keys(sqs, dlq)) == 4  # nothing lost, nothing doubled


@pytest.mark.parametrize(
    "argv",
    [
        ["s3://images/x/", "--from-dead-letter", "http://q"],
        ["--error-code", "truncated", "s3://images/x/"],
        [],
    ],
)
def test_source_and_dead_letter_are_exclusive(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        enqueue.parse([*argv, "--queue-url", "http://q"], {})

    assert caught.value.code == 2
