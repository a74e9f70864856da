"""The work queue's dead-letter queue, found the way SQS records it: the queue's redrive policy.

The consumer needs it to send permanent failures there; ``bottleneck-status`` to count them.
The SQS client is passed in, and so is the way each call is made, so that the consumer can put
its own retry policy around them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["redrive_target"]


def _direct(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return fn(**kwargs)


def redrive_target(sqs: Any, queue_url: str, *, call: Callable[..., Any] = _direct) -> str | None:
    """The URL of ``queue_url``'s redrive target, or ``None`` when it has no redrive policy.

    ``call(fn, **kwargs)`` makes each of the two SQS calls (GetQueueAttributes, then GetQueueUrl
    with the target's account, which may differ from the work queue's).
    """
    response = call(sqs.get_queue_attributes, QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = response.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        return None
    arn = json.loads(policy)["deadLetterTargetArn"]
    _, _, _, _region, account, name = arn.split(":", 5)
    found = call(sqs.get_queue_url, QueueName=name, QueueOwnerAWSAccountId=account)
    return str(found["QueueUrl"])
