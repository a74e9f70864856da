"""A small capped exponential backoff with full jitter, for AWS throttling.

The Lambda zip carries no third-party retry library, and botocore's own retries stop after a few
attempts, so calls to AWS Batch (whose ``SubmitJob`` and ``ListJobs`` throttle at low request
rates with ``TooManyRequestsException``) go through :func:`call_with_backoff`. Only throttling is
retried here: a throttled request was not executed, so retrying it can never submit a job twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import ClientError

__all__ = ["THROTTLING_CODES", "Backoff", "call_with_backoff", "error_code", "is_throttling"]

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


@dataclass(frozen=True, slots=True)
class Backoff:
    """``attempts`` tries in all; before try n+1 sleep uniform(0, min(cap, base * 2**n)) seconds."""

    attempts: int = 6
    base: float = 0.25
    cap: float = 4.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < 0:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to sleep before retry number ``retry`` (0 for the first retry)."""
        return rand() * min(self.cap, self.base * (2**retry))

    def worst_case(self) -> float:
        """The longest total sleep :func:`call_with_backoff` can add (for timeout budgets)."""
        return sum(min(self.cap, self.base * (2**n)) for n in range(self.attempts - 1))


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


def call_with_backoff(
    call: Callable[[], T],
    *,
    backoff: Backoff,
    retry_if: Callable[[BaseException], bool] = is_throttling,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``call()``; while it raises an error that ``retry_if`` accepts, sleep and try again.

    After ``backoff.attempts`` tries the last error is raised. Other errors are raised at once.
    """
    for retry in range(backoff.attempts):
        try:
            return call()
        except Exception as exc:
            if retry + 1 >= backoff.attempts or not retry_if(exc):
                raise
            pause = backoff.delay(retry, rand)
            if on_retry is not None:
                on_retry(exc, pause)
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
