"""``bottleneck-enqueue --from-dead-letter URL``: send dead-lettered messages back after a fix.

Each dead letter's body is sent to the work queue unchanged (the consumer parses it as it did the
first time), then deleted from the dead-letter queue; the summary counts them by ``error-code``
(``retries-exhausted`` for messages SQS's redrive moved there, which carry none). Send before
delete: a crash between the two leaves a duplicate on the work queue, which the consumer's
idempotent writes absorb, never a lost message.

Messages are kept invisible while the run lasts, so that each is seen once; those not moved
(``--error-code`` selects others, ``--dry-run``, a failed send) are released at the end. SQS's
own ``start-message-move-task`` does the same without the filter and the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

RETRIES_EXHAUSTED = "retries-exhausted"
# Long enough for a run to finish its batch; released explicitly at the end anyway.
_HOLD_SECONDS = 300
_EMPTY_POLLS = 2


@dataclass
class RedriveResult:
    """Dead letters seen, moved and left, each counted by ``error-code``."""

    seen: Counter[str] = field(default_factory=Counter)
    moved: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "dead_letters": sum(self.seen.values()),
            "by_error_code": dict(self.seen.most_common()),
            "moved": sum(self.moved.values()),
            "moved_by_error_code": dict(self.moved.most_common()),
            "failed": len(self.failed),
            "first_failures": self.failed[:5],
            "dry_run": self.dry_run,
        }


def error_code_of(message: dict[str, Any]) -> str:
    """A dead letter's ``error-code`` attribute, or ``retries-exhausted`` when it has none."""
    attribute = message.get("MessageAttributes", {}).get("error-code", {})
    return str(attribute.get("StringValue") or RETRIES_EXHAUSTED)


def redrive(
    sqs: SQSClient,
    dead_letter_url: str,
    queue_url: str,
    *,
    codes: Sequence[str] = (),
    dry_run: bool = False,
    limit: int | None = None,
    on_moved: Callable[[int], None] | None = None,
) -> RedriveResult:
    """Move dead letters (those with an ``error-code`` in ``codes``; all when empty) back."""
    result = RedriveResult(dry_run=dry_run)
    held: list[dict[str, Any]] = []  # received and not moved: released at the end
    empty = 0
    try:
        while empty < _EMPTY_POLLS and (limit is None or sum(result.seen.values()) < limit):
            messages = sqs.receive_message(
                QueueUrl=dead_letter_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                VisibilityTimeout=_HOLD_SECONDS,
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            empty = 0 if messages else empty + 1
            chosen = []
            for message in messages:
                code = error_code_of(dict(message))
                result.seen[code] += 1
                if dry_run or (codes and code not in codes):
                    held.append(dict(message))
                else:
                    chosen.append(dict(message))
            if chosen:
                held.extend(_move(sqs, dead_letter_url, queue_url, chosen, result))
                if on_moved is not None:
                    on_moved(len(chosen))
    finally:
        _release(sqs, dead_letter_url, held)
    return result


def _move(
    sqs: SQSClient,
    dead_letter_url: str,
    queue_url: str,
    messages: list[dict[str, Any]],
    result: RedriveResult,
) -> list[dict[str, Any]]:
    """Send ``messages`` to the work queue, delete those sent; returns those left behind."""
    entries: list[Any] = [{"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(messages)]
    response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    sent = [messages[int(entry["Id"])] for entry in response.get("Successful", [])]
    left = []
    for entry in response.get("Failed", []):
        message = messages[int(entry["Id"])]
        result.failed.append(f"{message['MessageId']}: {entry.get('Code')}: {entry.get('Message')}")
        left.append(message)
    if sent:
        deletes: list[Any] = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)
        ]
        sqs.delete_message_batch(QueueUrl=dead_letter_url, Entries=deletes)
        for message in sent:
            result.moved[error_code_of(message)] += 1
    return left


def _release(sqs: SQSClient, dead_letter_url: str, messages: list[dict[str, Any]]) -> None:
    for start in range(0, len(messages), 10):
        entries: list[Any] = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(messages[start : start + 10])
        ]
        sqs.change_message_visibility_batch(QueueUrl=dead_letter_url, Entries=entries)
