"""The shared dead-letter lookup: the redrive policy's target, through the caller's call."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bottleneck_contract.queues import redrive_target
from consumer.errors import ConfigError
from consumer.sqs import resolve_dead_letter_url

WORK = "https://sqs.eu-west-1.amazonaws.com/111111111111/work"
TARGET_ARN = "arn:aws:sqs:eu-west-1:222222222222:work-dlq"


class FakeSqs:
    """Answers the two calls of the lookup; ``policy`` None means the queue has none."""

    def __init__(self, policy: dict[str, str] | None) -> None:
        self.policy = policy
        self.url_requests: list[dict[str, Any]] = []

    def get_queue_attributes(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs == {"QueueUrl": WORK, "AttributeNames": ["RedrivePolicy"]}
        if self.policy is None:
            return {"Attributes": {}}
        return {"Attributes": {"RedrivePolicy": json.dumps(self.policy)}}

    def get_queue_url(self, **kwargs: Any) -> dict[str, Any]:
        self.url_requests.append(kwargs)
        return {
            "QueueUrl": f"https://sqs.eu-west-1.amazonaws.com/{kwargs['QueueOwnerAWSAccountId']}"
            f"/{kwargs['QueueName']}"
        }


def test_the_target_is_found_in_its_own_account_through_the_callers_call() -> None:
    # GIVEN a work queue whose dead-letter queue lives in another account
    sqs = FakeSqs({"deadLetterTargetArn": TARGET_ARN, "maxReceiveCount": "5"})
    made: list[str] = []

    def call(fn: Callable[..., Any], **kwargs: Any) -> Any:
        made.append(fn.__name__)
        return fn(**kwargs)

    # WHEN looked up with a caller's call wrapper (the consumer's retry policy)
    url = redrive_target(sqs, WORK, call=call)
    # THEN both calls went through the wrapper and the owner account was asked for
    assert url == "https://sqs.eu-west-1.amazonaws.com/222222222222/work-dlq"
    assert made == ["get_queue_attributes", "get_queue_url"]
    assert sqs.url_requests == [{"QueueName": "work-dlq", "QueueOwnerAWSAccountId": "222222222222"}]


def test_no_redrive_policy_means_no_target() -> None:
    assert redrive_target(FakeSqs(None), WORK) is None


def test_the_consumer_refuses_a_queue_without_a_dead_letter_target() -> None:
    # GIVEN no --dead-letter-url and a work queue without a redrive policy
    # WHEN the consumer resolves it THEN it is a one-line configuration error naming the flag
    with pytest.raises(ConfigError, match="--dead-letter-url"):
        resolve_dead_letter_url(FakeSqs(None), WORK)
    # AND with a policy it is the same target the tools find
    sqs = FakeSqs({"deadLetterTargetArn": TARGET_ARN})
    assert resolve_dead_letter_url(sqs, WORK) == redrive_target(sqs, WORK)
