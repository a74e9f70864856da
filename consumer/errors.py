"""The consumer's exception family, and the one place that decides retry versus dead-letter.

Every failure that reaches a message's settlement is turned into a :class:`Failure` by
:func:`classify`: permanent failures go to the dead-letter queue with their ``error-code``;
everything else is transient and the message is released for a later try (SQS's redrive moves it
to the dead-letter queue after ``maxReceiveCount`` receives).
"""

from __future__ import annotations

from dataclasses import dataclass

import botocore.exceptions


class ConfigError(ValueError):
    """Invalid configuration; the message is one line naming the option (exit code 2)."""


class PermanentError(Exception):
    """The input can never succeed (missing object, not an image, too large, bad message)."""

    def __init__(self, error_code: str, detail: str) -> None:
        super().__init__(f"{error_code}: {detail}")
        self.error_code = error_code
        self.detail = detail


class TransientError(Exception):
    """A failure worth retrying later (throttling, 5xx, timeouts, out of memory)."""

    def __init__(self, error_code: str, detail: str) -> None:
        super().__init__(f"{error_code}: {detail}")
        self.error_code = error_code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Failure:
    """The settled form of an exception: a stable short code, a detail line, and the verdict."""

    error_code: str
    detail: str
    permanent: bool


# S3 answers that no retry can change. AccessDenied is deliberately absent: it is usually a
# policy being fixed, and the redrive count still bounds how often it is retried.
_PERMANENT_S3_CODES = {
    "NoSuchKey": "not-found",
    "404": "not-found",
    "NotFound": "not-found",
    "NoSuchBucket": "not-found",
    "InvalidObjectState": "archived",
    "KeyTooLongError": "key-too-long",
}

# The longest error-detail we keep: SQS message attributes and log lines stay small.
MAX_DETAIL = 1000


def classify(exc: BaseException) -> Failure:
    """Turn any exception raised while processing an image into a :class:`Failure`."""
    if isinstance(exc, PermanentError):
        return Failure(exc.error_code, _clip(exc.detail), permanent=True)
    if isinstance(exc, TransientError):
        return Failure(exc.error_code, _clip(exc.detail), permanent=False)
    if isinstance(exc, botocore.exceptions.ClientError):
        return aws_failure(str(exc.response.get("Error", {}).get("Code", "Unknown")), str(exc))
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return Failure("aws-unavailable", _clip(str(exc)), permanent=False)
    if isinstance(exc, MemoryError):
        return Failure("out-of-memory", _clip(repr(exc)), permanent=False)
    # Anything unforeseen is retried: SQS's redrive bounds the cost, and a bug fixed in a new
    # image then finds the message still there rather than thrown away.
    return Failure("internal", _clip(f"{type(exc).__name__}: {exc}"), permanent=False)


def aws_failure(code: str, detail: str) -> Failure:
    """What an AWS error code (``NoSuchKey``, ``SlowDown``, an HTTP status) means, whichever
    client received it: boto3 and the native S3 client settle the same answer the same way."""
    if code in _PERMANENT_S3_CODES:
        return Failure(_PERMANENT_S3_CODES[code], _clip(detail), permanent=True)
    return Failure(_aws_code(code), _clip(detail), permanent=False)


def _aws_code(code: str) -> str:
    if code in {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}:
        return "throttled"
    if code in {"AccessDenied", "Forbidden", "403"}:
        return "access-denied"
    return "aws-error"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"
