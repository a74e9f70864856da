"""The SQS side: receive, delete, extend or release visibility, and dead-letter.

Batch calls take up to 10 entries; an entry can fail while the call succeeds (it comes back in
``Failed``). Each batch call is tried by one of two means, never both (see
:mod:`bottleneck_contract.retry`): :meth:`WorkQueue.change_visibility` retries here, spending one
budget on whole-call failures and on failed entries; the ``try_*`` methods make one call per 10
entries and say what became of each (done, stale, worth another try, rejected), for the acker,
which schedules its own retries instead of waiting. A stale receipt handle means the message
was delivered to someone else: it is theirs now, and the work is idempotent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bottleneck_contract.queues import redrive_target
from bottleneck_contract.retry import Backoff
from consumer import aws
from consumer.errors import ConfigError
from consumer.settle import DeadLetter
from consumer.work import Message

log = logging.getLogger(__name__)

E = TypeVar("E")

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


@dataclass(frozen=True, slots=True)
class Tried(Generic[E]):
    """What one try of a batch call did with each entry; ``done`` ones need nothing more."""

    done: list[E] = field(default_factory=list)
    stale: list[E] = field(default_factory=list)  # the receipt handle is no longer valid
    retry: list[E] = field(default_factory=list)  # failed in a way that may pass: try again
    rejected: list[E] = field(default_factory=list)  # failed for good: another try cannot help
    error: str = ""  # the last failure, for the log


class WorkQueue:
    """The work queue and its dead-letter queue, as the pipeline uses them."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        dead_letter_url: str,
        *,
        backoff: Backoff = aws.CALL_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.sqs = sqs
        self.url = queue_url
        self.dead_letter_url = dead_letter_url
        self.backoff = backoff
        self.sleep = sleep

    def receive(self, max_messages: int, *, wait_seconds: int, visibility: int) -> list[Message]:
        """One long poll; bodies are parsed later, by the receiver (which retries a failure)."""
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

    def change_visibility(self, messages: Sequence[Message], seconds: int) -> list[Message]:
        """Set the visibility of ``messages`` to ``seconds`` from now; returns the stale ones.

        Retried here within :attr:`backoff` (the heartbeat and the receivers' hand-back have no
        retry of their own); raises when entries still fail after the last try.
        """
        stale: list[Message] = []
        pending = list(messages)
        for attempt in range(self.backoff.attempts):
            if attempt:
                self.sleep(self.backoff.delay(attempt - 1))
            tried = self.try_change_visibility(pending, seconds)
            stale += tried.stale
            pending = tried.retry
            if not pending:
                return stale
        raise RuntimeError(
            f"change_message_visibility_batch: {len(pending)} entries still failing "
            f"after {self.backoff.attempts} tries: {tried.error}"
        )

    def try_delete(self, messages: Sequence[Message]) -> Tried[Message]:
        """Delete ``messages``, one try (a call per 10); the caller retries what needs it."""
        return self._try(
            "delete_message_batch",
            self.url,
            messages,
            lambda m, i: {"Id": str(i), "ReceiptHandle": m.receipt_handle},
        )

    def try_change_visibility(self, messages: Sequence[Message], seconds: int) -> Tried[Message]:
        """Set the visibility of ``messages`` to ``seconds`` from now, one try (a call per 10)."""
        return self._try(
            "change_message_visibility_batch",
            self.url,
            messages,
            lambda m, i: {
                "Id": str(i),
                "ReceiptHandle": m.receipt_handle,
                "VisibilityTimeout": seconds,
            },
        )

    def try_dead_letter(self, message: Message, letters: Sequence[DeadLetter]) -> Tried[DeadLetter]:
        """Record permanent failures of ``message`` in the dead-letter queue, one try.

        A letter whose send failed in a way that may pass comes back in ``retry``: send only
        those again, so that the others are not recorded twice.
        """
        return self._try(
            "send_message_batch",
            self.dead_letter_url,
            letters,
            lambda letter, i: {
                "Id": str(i),
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
            },
        )

    def _try(
        self,
        operation: str,
        queue_url: str,
        items: Sequence[E],
        entry: Callable[[E, int], dict[str, Any]],
    ) -> Tried[E]:
        done: list[E] = []
        stale: list[E] = []
        retry: list[E] = []
        rejected: list[E] = []
        error = ""
        for chunk in chunks(list(items)):
            by_id = {str(i): item for i, item in enumerate(chunk)}
            try:
                response = getattr(self.sqs, operation)(
                    QueueUrl=queue_url, Entries=[entry(item, i) for i, item in enumerate(chunk)]
                )
            except Exception as exc:
                error = f"{aws.error_code(exc) or type(exc).__name__}: {exc}"
                (retry if aws.is_retryable(exc) else rejected).extend(chunk)
                continue
            for ok in response.get("Successful", []):
                if (item := by_id.pop(str(ok.get("Id")), None)) is not None:
                    done.append(item)
            for failed in response.get("Failed", []):
                if (item := by_id.pop(str(failed.get("Id")), None)) is None:
                    continue
                code = str(failed.get("Code", ""))
                if is_stale(code):
                    stale.append(item)
                    continue
                error = f"{code}: {failed.get('Message', '')}"
                if failed.get("SenderFault"):
                    log.error(f"{operation} rejected an entry", extra={"fields": {"error": error}})
                    rejected.append(item)
                else:
                    retry.append(item)
            if by_id:  # neither Successful nor Failed: nothing says it was done
                error = "entries missing from the response"
                retry.extend(by_id.values())
        return Tried(done, stale, retry, rejected, error)


def _attr(value: str) -> dict[str, str]:
    # SQS rejects empty attribute values and caps a message at 256 KB; details are short already.
    return {"DataType": "String", "StringValue": value[:1000] or "-"}
