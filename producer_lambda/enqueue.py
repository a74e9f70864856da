"""Sending image references to the work queue, ten per ``SendMessageBatch`` call.

SendMessageBatch succeeds as a call even when some of its entries fail: those come back in
``Failed``, where botocore's retries never see them. Entries that failed through no fault of
ours (``SenderFault`` false: throttling, an internal error) are sent again after a short backoff;
entries the queue rejected as invalid (``SenderFault`` true) would fail again and are reported at
once. A call that raises has had botocore's standard-mode tries already (the one layer for a
raised call, see :mod:`bottleneck_contract.retry`) and is not tried again here. Whatever still
fails is returned to the caller, never dropped silently. The consumer is idempotent, so a message
that was sent twice (a call whose response was lost) costs one duplicate receive, nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.messages import ImageRef, encode
from bottleneck_contract.retry import Backoff
from producer_lambda.backoff import error_code

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

__all__ = [
    "MAX_BATCH",
    "SEND_BACKOFF",
    "BatchOutcome",
    "SendFailure",
    "batched",
    "send_all",
    "send_batch",
]

T = TypeVar("T")

MAX_BATCH = 10  # SendMessageBatch's limit
SEND_BACKOFF = Backoff(attempts=4, base=0.1, cap=2.0)


@dataclass(frozen=True, slots=True)
class SendFailure:
    """An image whose message could not be sent, with the last error SQS gave for it."""

    ref: ImageRef
    code: str
    message: str
    sender_fault: bool


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What happened to a group of images: sent, or failed with a reason."""

    sent: tuple[ImageRef, ...] = ()
    failed: tuple[SendFailure, ...] = ()

    def __add__(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.sent + other.sent, self.failed + other.failed)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yield lists of up to ``size`` consecutive items (the last one may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def send_batch(
    sqs: SQSClient,
    queue_url: str,
    refs: Sequence[ImageRef],
    *,
    backoff: Backoff = SEND_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> BatchOutcome:
    """Send up to ten images in one ``SendMessageBatch``, retrying the entries that failed.

    A call that fails as a whole (an AWS error or a connection error that outlived botocore's
    retries) fails every entry still pending, with no further try. Never raises for AWS errors:
    the outcome says what was sent and what was not.
    """
    if len(refs) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} messages per batch, got {len(refs)}")
    pending: dict[str, ImageRef] = {str(i): ref for i, ref in enumerate(refs)}
    last_error: dict[str, tuple[str, str, bool]] = {}
    sent: list[ImageRef] = []
    failed: list[SendFailure] = []
    for attempt in range(backoff.attempts):
        if not pending:
            break
        if attempt:
            sleep(backoff.delay(attempt - 1))
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": entry_id, "MessageBody": encode(ref)} for entry_id, ref in pending.items()
        ]
        try:
            response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            for entry_id in pending:
                last_error[entry_id] = (error_code(exc), str(exc), False)
            break
        for ok in response.get("Successful", []):
            ref = pending.pop(ok["Id"], None)
            if ref is not None:
                sent.append(ref)
        answered: set[str] = set()
        for bad in response.get("Failed", []):
            entry_id = bad["Id"]
            answered.add(entry_id)
            code = bad.get("Code", "Unknown")
            message = bad.get("Message", "")
            if bad.get("SenderFault", False):
                ref = pending.pop(entry_id, None)
                if ref is not None:
                    failed.append(SendFailure(ref, code, message, sender_fault=True))
            else:
                last_error[entry_id] = (code, message, False)
        for entry_id in pending.keys() - answered:
            last_error[entry_id] = ("Missing", "entry not in the response", False)
    for entry_id, ref in pending.items():
        code, message, sender_fault = last_error[entry_id]
        failed.append(SendFailure(ref, code, message, sender_fault))
    return BatchOutcome(tuple(sent), tuple(failed))


def send_all(
    sqs: SQSClient,
    queue_url: str,
    refs: Iterable[ImageRef],
    *,
    backoff: Backoff = SEND_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> BatchOutcome:
    """Send every image, ten per call, one call after the other (the Lambda's few records)."""
    outcome = BatchOutcome()
    for chunk in batched(refs, MAX_BATCH):
        outcome += send_batch(sqs, queue_url, chunk, backoff=backoff, sleep=sleep)
    return outcome
