"""The producer's retry layer: which AWS errors it retries, over the project's one retry loop.

The policy (one layer per call; the one backoff function) is :mod:`bottleneck_contract.retry`.
On this side our layer is used for AWS Batch only, whose clients are built with botocore's
retries off (:func:`~bottleneck_contract.retry.no_botocore_retries`): ``SubmitJob`` is retried
only when throttled (:func:`is_throttling`: a throttled request was not carried out, so a retry
can never submit a job twice), reads and ``CancelJob`` on any transient error
(:func:`is_transient`). SQS and S3 calls keep botocore's standard-mode retries and no loop here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from bottleneck_contract import retry

__all__ = ["THROTTLING_CODES", "call_with_backoff", "error_code", "is_throttling", "is_transient"]

T = TypeVar("T")

THROTTLING_CODES = frozenset(
    {
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
# Failures on AWS's side that a later try can get past (botocore's standard mode retries these).
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "InternalError"})


def error_code(exc: BaseException) -> str:
    """The AWS error code of ``exc`` (``ClientError``), else its class name."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "ClientError")
    return type(exc).__name__


def is_throttling(exc: BaseException) -> bool:
    """Whether ``exc`` is an AWS throttling error (HTTP 429 or a known throttling code)."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error_code(exc) in THROTTLING_CODES or status == 429


def is_transient(exc: BaseException) -> bool:
    """Throttling, a 5xx, a request timeout, or a connection that failed or broke."""
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return is_throttling(exc) or error_code(exc) in _TRANSIENT_CODES or int(status) >= 500


def call_with_backoff(
    call: Callable[[], T],
    *,
    backoff: retry.Backoff,
    retry_if: Callable[[BaseException], bool] = is_throttling,
    sleep: Callable[[float], None] = time.sleep,
    rand: retry.Rand = random.random,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """:func:`bottleneck_contract.retry.call_with_backoff`, retrying only throttling unless told.

    Throttling is the one failure after which any call, ``SubmitJob`` included, is surely safe
    to repeat; a caller whose call is idempotent passes ``retry_if=is_transient``.
    """
    return retry.call_with_backoff(
        call, backoff=backoff, retry_if=retry_if, sleep=sleep, rand=rand, on_retry=on_retry
    )
