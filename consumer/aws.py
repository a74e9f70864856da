"""boto3 clients sized for the pipeline, and the one retry layer of the consumer's AWS calls.

Endpoints, region and credentials come from the standard chain (``AWS_ENDPOINT_URL_S3`` and
friends), so the same code runs against AWS, a moto server or LocalStack. botocore's own retries
are off on these clients: :func:`call` (and the SQS batch calls, see :mod:`consumer.sqs`) is the
one layer that retries, with :data:`CALL_BACKOFF`; why, and what else retries where, is written
once in :mod:`bottleneck_contract.retry`. A failure that outlives the tries is settled by
:func:`consumer.errors.classify`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from bottleneck_contract.retry import Backoff, call_with_backoff, no_botocore_retries

T = TypeVar("T")

log = logging.getLogger(__name__)

# Three quick tries (waits under 0.2 s, then under 0.4 s): a call that still fails releases its
# message, and SQS's redelivery, seconds to minutes later, is the patient second chance. Short
# enough that a visibility extension settles far inside even a short visibility timeout.
CALL_BACKOFF = Backoff(attempts=3, base=0.2, cap=5.0)

_RETRYABLE_CODES = {
    "ConditionalRequestConflict",  # 409: a concurrent conditional write on the same key
    "OperationAborted",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "KMS.ThrottlingException",
}


@dataclass(frozen=True, slots=True)
class Clients:
    s3: Any
    sqs: Any
    # The session the clients came from: its credentials sign the lean SQS client's requests
    # (consumer.sqs_lean). None for clients made elsewhere (tests): the default session's then.
    session: boto3.Session | None = None


def make_clients(
    *, pool_size: int, sqs_pool_size: int = 10, session: boto3.Session | None = None
) -> Clients:
    """S3 and SQS clients whose connection pools match the pipeline's concurrency: the S3
    calls in flight at once (``pool_size``) and the SQS calls (``sqs_pool_size``)."""
    session = session or boto3.Session()
    retries = no_botocore_retries()
    s3_config = botocore.config.Config(
        max_pool_connections=pool_size,
        retries=retries,
        connect_timeout=5,
        read_timeout=60,
        tcp_keepalive=True,
    )
    # Long polls wait up to 20 s: the read timeout must outlast them.
    sqs_config = botocore.config.Config(
        max_pool_connections=max(10, sqs_pool_size),
        retries=retries,
        connect_timeout=5,
        read_timeout=40,
        tcp_keepalive=True,
    )
    return Clients(
        session.client("s3", config=s3_config),
        session.client("sqs", config=sqs_config),
        session,
    )


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a ClientError (``None`` for anything else)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return None


def http_status(exc: BaseException) -> int | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx, 409 conflicts and connection-level failures."""
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError
        # HTTPClientError covers a connection closed or reset mid-request.
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError,
    ):
        return True
    code = error_code(exc)
    if code is None:
        return False
    status = http_status(exc) or 0
    return code in _RETRYABLE_CODES or status >= 500 or status in (409, 429)


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call an AWS operation; retry :func:`is_retryable` failures as :data:`CALL_BACKOFF` says."""
    return call_with_backoff(
        partial(fn, *args, **kwargs),
        backoff=CALL_BACKOFF,
        retry_if=is_retryable,
        on_retry=_log_retry,
    )


def _log_retry(exc: BaseException, pause: float) -> None:
    log.debug(
        "AWS call failed; retrying",
        extra={"fields": {"error": error_code(exc) or type(exc).__name__, "retry_in_s": pause}},
    )
