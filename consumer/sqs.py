"""The SQS side: receive, delete, extend or release visibility, and dead-letter.

Batch calls take up to 10 entries; entries that come back in ``Failed`` are retried when the
failure is on SQS's side and reported when the receipt handle has gone stale (the message was
delivered to someone else: it is theirs now, and the work is idempotent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bottleneck_contract.queues import redrive_target
from consumer import aws
from consumer.errors import ConfigError
from consumer.settle import DeadLetter
from consumer.work import Message

log = logging.getLogger(__name__)

BATCH = 10
# SQS holds a received message at most 12 hours in total; we stay a little inside.
MAX_HOLD_SECONDS = 12 * 3600 - 120
_STALE_CODES = ("ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidReceiptHandle")


def chunks(items: Sequence[Any], size: int = BATCH) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def is_stale(code: str) -> bool:
    return any(stale in code for stale in _STALE_CODES)


def resolve_dead_letter_url(sqs: Any, queue_url: str) -> str:
    """The work queue's redrive target (its URL); a queue without one is a configuration error."""
    url = redrive_target(sqs, queue_url, call=aws.call)
    if url is None:
        raise ConfigError(
            "--dead-letter-url: not given and the work queue has no redrive policy; "
            "permanent failures need somewhere to go"
        )
    return url


class WorkQueue:
    """The work queue and its dead-letter queue, as the pipeline uses them."""

    def __init__(self, sqs: Any, queue_url: str, dead_letter_url: str) -> None:
        self.sqs = sqs
        self.url = queue_url
        self.dead_letter_url = dead_letter_url

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        """One long poll; bodies are parsed later, by the receiver."""
        response = self.sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(BATCH, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=visibility,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=["All"],
        )
        now = time.monotonic()
        return [
            Message(
                message_id=raw["MessageId"],
                receipt_handle=raw["ReceiptHandle"],
                body=raw.get("Body", ""),
                receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                received_at=now,
                visible_until=now + visibility,
            )
            for raw in response.get("Messages", [])
        ]

    def delete(self, messages: Sequence[Message]) -> list[Message]:
        """Delete ``messages``; returns those whose handle had gone stale (not deleted by us)."""
        return self._batch(
            "delete_message_batch",
            messages,
            lambda m, i: {"Id": str(i), "ReceiptHandle": m.receipt_handle},
        )

    def change_visibility(self, messages: Sequence[Message], seconds: int) -> list[Message]:
        """Set the visibility of ``messages`` to ``seconds`` from now; returns the stale ones."""
        return self._batch(
            "change_message_visibility_batch",
            messages,
            lambda m, i: {
                "Id": str(i),
                "ReceiptHandle": m.receipt_handle,
                "VisibilityTimeout": seconds,
            },
        )

    def dead_letter(self, message: Message, letters: Sequence[DeadLetter]) -> None:
        """Record permanent failures in the dead-letter queue; raises if any send fails."""
        entries = []
        for index, letter in enumerate(letters):
            entries.append(
                {
                    "Id": str(index),
                    "MessageBody": letter.body or "(empty body)",
                    "MessageAttributes": {
                        "error-code": _attr(letter.failure.error_code),
                        "error-detail": _attr(letter.failure.detail or letter.failure.error_code),
                        "source-queue": _attr(self.url),
                        "source-message-id": _attr(message.message_id),
                        "receive-count": {
                            "DataType": "Number",
                            "StringValue": str(message.receive_count),
                        },
                    },
                }
            )
        for chunk in chunks(entries):
            pending = list(chunk)
            for _ in range(4):
                response = aws.call(
                    self.sqs.send_message_batch, QueueUrl=self.dead_letter_url, Entries=pending
                )
                failed_ids = {entry["Id"] for entry in response.get("Failed", [])}
                pending = [entry for entry in pending if entry["Id"] in failed_ids]
                if not pending:
                    break
                time.sleep(0.2)
            if pending:
                raise RuntimeError(f"dead-letter send failed for {len(pending)} entries")

    def _batch(self, operation: str, messages: Sequence[Message], entry: Any) -> list[Message]:
        stale: list[Message] = []
        for chunk in chunks(list(messages)):
            pending = {str(i): m for i, m in enumerate(chunk)}
            for attempt in range(5):
                entries = [entry(m, i) for i, m in pending.items()]
                response = aws.call(
                    getattr(self.sqs, operation), QueueUrl=self.url, Entries=entries
                )
                retry: dict[str, Message] = {}
                for failed in response.get("Failed", []):
                    message = pending[failed["Id"]]
                    code = str(failed.get("Code", ""))
                    if is_stale(code):
                        stale.append(message)
                    elif failed.get("SenderFault") and attempt > 0:
                        log.error(
                            f"{operation} rejected an entry",
                            extra={"fields": {"code": code, "message_id": message.message_id}},
                        )
                    else:
                        retry[failed["Id"]] = message
                if not retry:
                    break
                pending = retry
                time.sleep(min(2.0, 0.1 * 2**attempt))
            else:
                raise RuntimeError(f"{operation}: {len(pending)} entries still failing")
        return stale


def _attr(value: str) -> dict[str, str]:
    # SQS rejects empty attribute values and caps a message at 256 KB; details are short already.
    return {"DataType": "String", "StringValue": value[:1000] or "-"}
