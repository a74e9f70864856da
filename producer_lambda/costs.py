"""What the upload path costs per million uploads: requests counted per upload, times list prices.

Pure arithmetic behind the README's comparison of two designs, fed with request counts that
``tests/functional/test_upload_path.py`` measures against moto (the function never imports it,
and the Lambda package leaves it out):

* **one invocation per event**: EventBridge invokes the function once per upload, which sends one
  message and, with the scaler in the same function, reads the queue depth every time;
* **buffered**: EventBridge puts each event on an SQS buffer queue (one ``SendMessage``), the
  event source mapping's pollers receive them ten per ``ReceiveMessage`` into batches of up to
  ``BatchSize`` for one invocation, which sends ten messages per ``SendMessageBatch``, and the
  mapping deletes the batch ten per ``DeleteMessageBatch``.

Prices are us-east-1 list prices: SQS standard $0.40 per million requests (each 64 KB of a
payload is a request; every message here is far below that), Lambda $0.20 per million invocations
and $0.0000166667 per GB-second (x86; arm64, which the stack uses, is $0.0000133334), EventBridge
events from AWS services to the default bus free, and its delivery to an SQS target billed as the
queue's ``SendMessage``. Batch API calls are free. Costs that do not grow with uploads (the
scheduled scaler's 43,200 runs a month, idle long polls) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SQS_REQUESTS", "Cost", "Prices", "UploadPathUse", "cost_per_million"]

# Billed SQS API calls (GetQueueAttributes included: the scaler's depth reads are requests too).
SQS_REQUESTS = frozenset(
    {
        "SendMessage",
        "SendMessageBatch",
        "ReceiveMessage",
        "DeleteMessage",
        "DeleteMessageBatch",
        "ChangeMessageVisibility",
        "ChangeMessageVisibilityBatch",
        "GetQueueAttributes",
    }
)


@dataclass(frozen=True, slots=True)
class Prices:
    """List prices in US dollars (us-east-1)."""

    sqs_per_million_requests: float = 0.40
    lambda_per_million_invocations: float = 0.20
    lambda_per_gb_second: float = 0.0000166667


@dataclass(frozen=True, slots=True)
class UploadPathUse:
    """What one upload uses, on average: requests, invocations, and billed function time."""

    sqs_requests: float
    invocations: float
    seconds_per_invocation: float
    memory_mb: int = 256

    @classmethod
    def from_counts(
        cls,
        calls: Mapping[str, int],
        *,
        uploads: int,
        invocations: int,
        seconds_per_invocation: float,
        memory_mb: int = 256,
    ) -> UploadPathUse:
        """Per-upload use from API call counts (by operation name) over ``uploads`` uploads."""
        if uploads < 1:
            raise ValueError(f"uploads must be >= 1, got {uploads}")
        requests = sum(n for name, n in calls.items() if name in SQS_REQUESTS)
        return cls(requests / uploads, invocations / uploads, seconds_per_invocation, memory_mb)


@dataclass(frozen=True, slots=True)
class Cost:
    """Dollars per million uploads, by what is billed."""

    sqs: float
    invocations: float
    compute: float

    @property
    def total(self) -> float:
        """The three together."""
        return self.sqs + self.invocations + self.compute


def cost_per_million(use: UploadPathUse, prices: Prices | None = None) -> Cost:
    """Dollars per million uploads for ``use`` at ``prices`` (default: list prices)."""
    p = prices or Prices()
    invocations = use.invocations * 1_000_000
    gb_seconds = invocations * use.seconds_per_invocation * use.memory_mb / 1024
    return Cost(
        sqs=use.sqs_requests * p.sqs_per_million_requests,
        invocations=invocations / 1_000_000 * p.lambda_per_million_invocations,
        compute=gb_seconds * p.lambda_per_gb_second,
    )
