"""The producer Lambda: S3 upload events in, work-queue messages and Batch jobs out.

Entry point ``producer_lambda.handler.lambda_handler``. Thin by design: parse the event with
:mod:`bottleneck_contract.messages`, keep the keys that :class:`~producer_lambda.filters.KeyFilter`
accepts, send them with :func:`~producer_lambda.enqueue.send_all`, then run the scaler. Scheduled
EventBridge events run the scaler only.

Failure policy:

* a record that cannot be parsed can never succeed: it is logged (``malformed-record``) and
  counted as skipped, and the other records of the event go ahead;
* messages that still fail after retries are logged one by one and then raised as
  :class:`EnqueueError`, so that Lambda's retry of the invocation (asynchronous S3 events) or of
  the batch (SQS) sends them again; messages of the same event that did go out are sent twice,
  which the idempotent consumer absorbs;
* a scaler error after a successful enqueue is logged, not raised: the messages are safe on the
  queue and the next scheduled run scales for them. On a scheduled event it is raised.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from bottleneck_contract.logs import configure_logger, log
from bottleneck_contract.messages import ImageRef, MalformedMessage, Skip, parse_notification
from bottleneck_contract.retry import no_botocore_retries
from producer_lambda.enqueue import send_all
from producer_lambda.filters import KeyFilter
from producer_lambda.scaler import ScaleResult, scale
from producer_lambda.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_sqs import SQSClient

__all__ = ["LOGGER_NAME", "EnqueueError", "handle", "is_scheduled", "lambda_handler", "select"]

SKIP_MALFORMED = "malformed"
# Every module of the package logs under it: the one logger the Lambda configures.
LOGGER_NAME = "producer_lambda"
_log = logging.getLogger(__name__)


class EnqueueError(RuntimeError):
    """Some messages could not be sent; raised after logging them, so the event is retried."""


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """AWS Lambda entry point: settings from the environment, clients made once per container."""
    configure_logger(LOGGER_NAME)
    settings = _settings()
    request_id = getattr(context, "aws_request_id", None)
    return handle(
        event,
        settings,
        sqs=_sqs_client(),
        batch=_batch_client() if settings.scaling else None,
        request_id=request_id,
    )


def handle(
    event: Mapping[str, Any],
    settings: Settings,
    *,
    sqs: SQSClient,
    batch: BatchClient | None,
    request_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Process one invocation's event with the given clients; return the JSON summary.

    The summary: ``{"kind": "s3"|"scheduled", "enqueued": n, "failed": n, "skipped":
    {reason: n}, "jobs_submitted": n, "jobs_cancelled": n}``.
    """
    if is_scheduled(event):
        result = _scale(settings, sqs, batch, sleep=sleep, raise_errors=True)
        return _summary("scheduled", 0, 0, Counter(), result, request_id)

    key_filter = KeyFilter(
        suffixes=settings.suffixes, input_prefix=settings.input_prefix, output=settings.output
    )
    refs, skipped = select(event, key_filter)
    outcome = send_all(sqs, settings.queue_url, refs, sleep=sleep)
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
    result = None
    if outcome.sent:
        result = _scale(settings, sqs, batch, sleep=sleep, raise_errors=False)
    summary = _summary("s3", len(outcome.sent), len(outcome.failed), skipped, result, request_id)
    if outcome.failed:
        first = outcome.failed[0]
        raise EnqueueError(
            f"{len(outcome.failed)} of {len(refs)} messages not sent "
            f"(first: s3://{first.ref.bucket}/{first.ref.key}: {first.code})"
        )
    return summary


def is_scheduled(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is an EventBridge scheduled event (which runs the scaler only)."""
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def select(event: Mapping[str, Any], key_filter: KeyFilter) -> tuple[list[ImageRef], Counter[str]]:
    """The images of ``event`` that are work (each once, in order), and the skips by reason."""
    refs: dict[ImageRef, None] = {}
    skipped: Counter[str] = Counter()
    for item in _items(event):
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            log(_log, logging.INFO, "skipped", reason=item.reason, key=item.key)
            continue
        reason = key_filter.reason(item.bucket, item.key, item.size)
        if reason is not None:
            skipped[reason] += 1
            log(_log, logging.INFO, "skipped", reason=reason, bucket=item.bucket, key=item.key)
            continue
        refs[item] = None
    return list(refs), skipped


def _items(event: Mapping[str, Any]) -> Iterator[ImageRef | Skip]:
    # One record at a time, so that a malformed record costs only itself.
    records = event.get("Records")
    if isinstance(records, list) and records:
        docs: list[Mapping[str, Any]] = [{"Records": [record]} for record in records]
    else:
        docs = [event]
    for doc in docs:
        try:
            items = list(parse_notification(doc))
        except MalformedMessage as exc:
            record = doc.get("Records", [None])[0] if "Records" in doc else None
            message_id = record.get("messageId") if isinstance(record, Mapping) else None
            log(_log, logging.ERROR, "malformed-record", error=str(exc), message_id=message_id)
            yield Skip(SKIP_MALFORMED)
            continue
        yield from items


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
    enqueued: int,
    failed: int,
    skipped: Counter[str],
    result: ScaleResult | None,
    request_id: str | None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "kind": kind,
        "enqueued": enqueued,
        "failed": failed,
        "skipped": dict(sorted(skipped.items())),
        "jobs_submitted": len(result.submitted) if result else 0,
        "jobs_cancelled": len(result.cancelled) if result else 0,
    }
    log(
        _log,
        logging.ERROR if failed else logging.INFO,
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
def _batch_client() -> BatchClient:
    import boto3
    from botocore.config import Config

    # The scaler's call_with_backoff is the one layer for Batch: botocore would also retry a
    # SubmitJob after a 5xx, which may submit a second job.
    client: BatchClient = boto3.client("batch", config=Config(retries=no_botocore_retries()))
    return client
