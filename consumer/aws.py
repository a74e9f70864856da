"""boto3 clients sized for the pipeline, and the retry policy shared by every AWS call.

Endpoints, region and credentials come from the standard chain (``AWS_ENDPOINT_URL_S3`` and
friends), so the same code runs against AWS, a moto server or LocalStack. botocore retries
throttling, 5xx and connection errors itself (standard mode); :func:`call` adds a short,
jittered tenacity layer on top for what outlives those retries and for S3's 409 conditional
conflicts, after which the failure is settled by :func:`consumer.errors.classify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import tenacity

T = TypeVar("T")

_RETRYABLE_CODES = {
    "ConditionalRequestConflict",  # 409: a concurrent conditional write on the same key
    "OperationAborted",
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "KMS.ThrottlingException",
}


@dataclass(frozen=True, slots=True)
class Clients:
    s3: Any
    sqs: Any


def make_clients(*, pool_size: int, session: boto3.Session | None = None) -> Clients:
    """S3 and SQS clients whose connection pools match the pipeline's concurrency."""
    session = session or boto3.Session()
    retries: Any = {"mode": "standard", "max_attempts": 4}
    s3_config = botocore.config.Config(
        max_pool_connections=pool_size,
        retries=retries,
        connect_timeout=5,
        read_timeout=60,
        tcp_keepalive=True,
    )
    # Long polls wait up to 20 s: the read timeout must outlast them.
    sqs_config = botocore.config.Config(
        max_pool_connections=max(10, pool_size // 4),
        retries=retries,
        connect_timeout=5,
        read_timeout=40,
        tcp_keepalive=True,
    )
    return Clients(session.client("s3", config=s3_config), session.client("sqs", config=sqs_config))


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
    return code in _RETRYABLE_CODES or status >= 500 or status == 409


def call(fn: Callable[..., T], *args: Any, attempts: int = 3, **kwargs: Any) -> T:
    """Call an AWS operation; retry :func:`is_retryable` failures with capped jittered backoff."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=5.0),
        stop=tenacity.stop_after_attempt(attempts),
        reraise=True,
    )
    return retrying(fn, *args, **kwargs)
