"""The producer Lambda: S3 events in; work-queue messages, removed feature files, Batch jobs out.

Entry point ``producer_lambda.handler.lambda_handler``. The stack deploys this one code twice: as
the *upload* function, fed in batches by an SQS buffer queue that EventBridge fills (no
concurrency cap of one, no scaling settings), and as the *scaler*, run every minute with reserved
concurrency 1 so that two scaler runs never race. Thin by design: sort the event with
:func:`~producer_lambda.records.select` (parse, key filter), send the images with
:func:`~producer_lambda.enqueue.send_all` (ten per ``SendMessageBatch``), remove the feature
files of images that are really gone with :func:`~producer_lambda.removals.remove_all`, then run
the scaler if this function has scaling settings. Scheduled EventBridge events run the scaler only.

Failure policy:

* a record that cannot be parsed can never succeed: it is logged (``malformed-record``) and
  counted as skipped, and the other records of the event go ahead;
* an SQS batch (the upload function's): a record whose messages could not be sent after retries,
  or whose removals failed, is returned in ``batchItemFailures``, so that SQS delivers exactly
  those records again and deletes the rest (the event source mapping needs
  ``ReportBatchItemFailures``: the stack's has it). When every record failed, the invocation
  raises instead: the whole batch comes back either way, Lambda slows its pollers down after a
  function error (not after a partial failure), and a mapping without
  ``ReportBatchItemFailures`` still loses nothing in an outage;
* any other event: what failed is logged one by one and then raised (:class:`EnqueueError`,
  :class:`RemovalError`), so that Lambda's retry of the invocation sends it again; messages of
  the same event that did go out are sent twice, which the idempotent consumer absorbs, and
  removals are safe to repeat;
* a scaler error after a successful enqueue is logged, not raised: the messages are safe on the
  queue and the next scheduled run scales for them. On a scheduled event it is raised.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from bottleneck_contract.logs import configure_logger, log
from bottleneck_contract.retry import no_botocore_retries
from producer_lambda.enqueue import BatchOutcome, send_all
from producer_lambda.filters import KeyFilter
from producer_lambda.records import Selection, select
from producer_lambda.removals import FAILED, OUTCOMES, RemovalOutcome, remove_all
from producer_lambda.scaler import ScaleResult, scale
from producer_lambda.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "LOGGER_NAME",
    "EnqueueError",
    "EventFailed",
    "RemovalError",
    "handle",
    "is_scheduled",
    "lambda_handler",
]

# Every module of the package logs under it: the one logger the Lambda configures.
LOGGER_NAME = "producer_lambda"
_log = logging.getLogger(__name__)


class EventFailed(RuntimeError):
    """Some of the event's work was not done; raised after logging it, so the event comes again."""


class EnqueueError(EventFailed):
    """Some messages could not be sent."""


class RemovalError(EventFailed):
    """Some deleted images' feature files could not be looked at or removed."""


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """AWS Lambda entry point: settings from the environment, clients made once per container.

    Returns the summary, or for an SQS batch the partial batch response
    ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}`` and nothing else (the
    summary is in the log): that is the one shape the event source mapping reads.
    """
    configure_logger(LOGGER_NAME)
    settings = _settings()
    request_id = getattr(context, "aws_request_id", None)
    summary = handle(
        event,
        settings,
        sqs=_sqs_client(),
        s3=None if is_scheduled(event) else _s3_client(),
        batch=_batch_client() if settings.scaling else None,
        request_id=request_id,
    )
    if "batchItemFailures" in summary:
        return {"batchItemFailures": summary["batchItemFailures"]}
    return summary


def handle(
    event: Mapping[str, Any],
    settings: Settings,
    *,
    sqs: SQSClient,
    batch: BatchClient | None,
    s3: S3Client | None = None,
    request_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Process one invocation's event with the given clients; return the JSON summary.

    The summary: ``{"kind": "s3"|"scheduled", "enqueued": n, "failed": n, "skipped":
    {reason: n}, "deletes": {outcome: n}, "jobs_submitted": n, "jobs_cancelled": n}`` (deletes
    count feature files: one per deleted image, or one per image and version with a templated
    output), and for
    an SQS batch ``"batchItemFailures"`` (the records to deliver again). ``s3`` is needed only
    when the event holds deletions.
    """
    if is_scheduled(event):
        result = _scale(settings, sqs, batch, sleep=sleep, raise_errors=True)
        return _summary("scheduled", BatchOutcome(), [], Counter(), result, request_id)

    key_filter = KeyFilter(
        suffixes=settings.suffixes, input_prefix=settings.input_prefix, output=settings.output
    )
    selection = select(event, key_filter)
    if selection.removals and s3 is None:
        raise ValueError("handle() needs an s3 client for an event with deletions")
    outcome = send_all(sqs, settings.queue_url, selection.images, sleep=sleep)
    for failure in outcome.failed:
        log(
            _log,
            logging.ERROR,
            "send-failed",
            bucket=failure.ref.bucket,
            key=failure.ref.key,
            code=failure.code,
            error=failure.message,
            sender_fault=failure.sender_fault,
        )
    removed = _remove(s3, settings, selection)
    result = None
    if outcome.sent:
        result = _scale(settings, sqs, batch, sleep=sleep, raise_errors=False)
    summary = _summary("s3", outcome, removed, selection.skipped, result, request_id)
    failed_removals = [r for r in removed if r.result == FAILED]
    if selection.record_ids is not None:
        return _partial_batch_response(
            summary, selection, selection.record_ids, outcome, failed_removals
        )
    _raise_if_incomplete(outcome, len(selection.images), failed_removals)
    return summary


def is_scheduled(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is an EventBridge scheduled event (which runs the scaler only)."""
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def _remove(s3: S3Client | None, settings: Settings, selection: Selection) -> list[RemovalOutcome]:
    if not selection.removals or s3 is None:
        return []
    # A templated output: its versions are listed once here, for the whole batch.
    removed = remove_all(s3, settings.feature_output, selection.removals.values())
    for item in removed:
        fields: dict[str, Any] = {
            "bucket": item.removal.bucket,
            "key": item.removal.key,
            "event": item.removal.event,
            "feature_key": item.feature_key,
            "result": item.result,
        }
        if item.result == FAILED:
            log(_log, logging.ERROR, "remove-failed", **fields, code=item.code, error=item.error)
        else:
            log(_log, logging.INFO, "removal", **fields)
    return removed


def _partial_batch_response(
    summary: dict[str, Any],
    selection: Selection,
    record_ids: tuple[str, ...],
    outcome: BatchOutcome,
    failed_removals: list[RemovalOutcome],
) -> dict[str, Any]:
    failed = selection.records_of(
        (f.ref for f in outcome.failed), (r.removal for r in failed_removals)
    )
    ids = [record_id for record_id in record_ids if record_id in failed]
    summary["batchItemFailures"] = [{"itemIdentifier": record_id} for record_id in ids]
    if ids:
        log(_log, logging.ERROR, "batch-item-failures", count=len(ids), message_ids=ids)
    if ids and len(ids) == len(record_ids):
        # Every record failed: raise (see the module docstring).
        _raise_if_incomplete(outcome, len(selection.images), failed_removals)
    return summary


def _raise_if_incomplete(
    outcome: BatchOutcome, images: int, failed_removals: list[RemovalOutcome]
) -> None:
    if outcome.failed:
        first = outcome.failed[0]
        also = f"; {len(failed_removals)} removals failed" if failed_removals else ""
        raise EnqueueError(
            f"{len(outcome.failed)} of {images} messages not sent "
            f"(first: s3://{first.ref.bucket}/{first.ref.key}: {first.code}){also}"
        )
    if failed_removals:
        first_removal = failed_removals[0]
        raise RemovalError(
            f"{len(failed_removals)} removals failed (first: s3://"
            f"{first_removal.removal.bucket}/{first_removal.removal.key}: {first_removal.code})"
        )


def _scale(
    settings: Settings,
    sqs: SQSClient,
    batch: BatchClient | None,
    *,
    sleep: Callable[[float], None],
    raise_errors: bool,
) -> ScaleResult | None:
    if settings.scaling is None or batch is None:
        log(_log, logging.INFO, "scaling-disabled")
        return None
    try:
        return scale(sqs, batch, settings.queue_url, settings.scaling, sleep=sleep)
    except Exception as exc:
        log(_log, logging.ERROR, "scale-failed", error=f"{type(exc).__name__}: {exc}")
        if raise_errors:
            raise
        return None


def _summary(
    kind: str,
    outcome: BatchOutcome,
    removed: list[RemovalOutcome],
    skipped: Counter[str],
    result: ScaleResult | None,
    request_id: str | None,
) -> dict[str, Any]:
    deletes = Counter(item.result for item in removed)
    summary: dict[str, Any] = {
        "kind": kind,
        "enqueued": len(outcome.sent),
        "failed": len(outcome.failed),
        "skipped": dict(sorted(skipped.items())),
        "deletes": {name: deletes[name] for name in OUTCOMES},
        "jobs_submitted": len(result.submitted) if result else 0,
        "jobs_cancelled": len(result.cancelled) if result else 0,
    }
    log(
        _log,
        logging.ERROR if outcome.failed or deletes[FAILED] else logging.INFO,
        "invocation",
        request_id=request_id,
        **summary,
        scaler=result.summary() if result else None,
    )
    return summary


@cache
def _settings() -> Settings:
    # Once per container: Lambda's environment does not change between invocations.
    try:
        return Settings.from_env()
    except ValueError as exc:
        log(_log, logging.ERROR, "bad-settings", error=str(exc))
        raise


@cache
def _sqs_client() -> SQSClient:
    import boto3
    from botocore.config import Config

    # botocore's standard mode is the one layer that retries a raised SQS call (six tries).
    client: SQSClient = boto3.client(
        "sqs", config=Config(retries={"mode": "standard", "total_max_attempts": 6})
    )
    return client


@cache
def _s3_client() -> S3Client:
    import boto3
    from botocore.config import Config

    # botocore's standard mode is the one layer that retries a raised S3 call. Three tries, not
    # six: a removal that still fails comes back with its SQS record, and fewer waits inside the
    # call keep a batch of removals well inside the function's timeout.
    client: S3Client = boto3.client(
        "s3", config=Config(retries={"mode": "standard", "total_max_attempts": 3})
    )
    return client


@cache
def _batch_client() -> BatchClient:
    import boto3
    from botocore.config import Config

    # The scaler's call_with_backoff is the one layer for Batch: botocore would also retry a
    # SubmitJob after a 5xx, which may submit a second job.
    client: BatchClient = boto3.client("batch", config=Config(retries=no_botocore_retries()))
    return client
