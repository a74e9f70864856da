"""The project's one retry policy: how long to wait between tries, and which layer retries a call.

The wait. Every delay between two tries of anything, on every side, is :func:`backoff`: capped
exponential with full jitter, ``uniform(0, min(cap, base * 2**attempt))``. Full jitter spreads
the retries of many callers that failed together (eight fetch threads throttled by one S3 prefix,
every receiver seeing the same SQS outage) over the whole window instead of bunching them at its
end, and on average waits least for the same spread (AWS Architecture Blog, "Exponential Backoff
And Jitter"; botocore's standard mode uses the same formula).

One layer per call. Each AWS call is retried by exactly one layer, so attempts never multiply
(botocore's attempts times ours times a caller's loop):

* The consumer's S3 and SQS clients have botocore's retries off (:func:`no_botocore_retries`);
  our code is the one layer, because botocore's retries would sleep inside the call, in the
  caller's thread (up to 20 s a try), and the consumer needs a say that botocore cannot have:

  - ``consumer.aws.call`` retries a single call on throttling, 5xx, connection errors and S3's
    409 ``ConditionalRequestConflict`` (which botocore does not retry), a few quick tries: what
    outlives them releases the message, and SQS's redelivery (``consumer.settle.release_delay``,
    seconds to minutes) is the slower, second chance;
  - ``consumer.sqs.WorkQueue.change_visibility`` spends one budget on a batch call that fails as
    a whole and on its entries that come back in ``Failed`` (which botocore never sees as
    failures), so that a visibility extension settles well inside the visibility timeout;
  - the acker never waits in its thread: a failed delete, release or dead-letter send is given
    a due time and carried out then, one call per try, while everything else goes on;
  - the receivers' poll loop waits :func:`backoff` after a failed receive and never gives up.

  The fault-injection tests reach exactly this layer: their proxy stands where botocore's
  retries would be, so every injected fault meets the code that runs in production.
* The producer's Batch client has botocore's retries off too, and every Batch call goes through
  :func:`call_with_backoff`: ``SubmitJob`` is retried only when throttled (a throttled request
  was not carried out; a 5xx or a reset one may have been, and a retry would submit a second
  job), the reads and ``CancelJob`` on any transient error.
* Every other client (the producer's SQS and S3, the operator tools) keeps botocore's standard
  mode, whose retry quota also stops retry storms, and our code retries none of its raised calls.
  ``SendMessageBatch``'s ``Failed`` entries, which botocore does not see, are sent again by
  ``producer_lambda.enqueue``; a call that raises has already had botocore's tries and ends there.

Not a call retry: a released message's visibility delay (``consumer.settle.release_delay``) is
SQS's redelivery schedule, counted in receives that SQS keeps, in whole seconds, and with a floor
(it must leave a throttled dependency room before ``maxReceiveCount`` runs out); full jitter,
which may wait nearly nothing, would defeat it.

This module is the standard library only: both the GPU consumer and the Lambda zip import it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict, TypeVar

__all__ = [
    "Backoff",
    "BotocoreRetries",
    "Rand",
    "backoff",
    "call_with_backoff",
    "no_botocore_retries",
]

T = TypeVar("T")

Rand = Callable[[], float]
"""A source of numbers in [0, 1): ``random.random``, or a test's fixed value."""


# 2**64 times any sensible base is past every cap: larger exponents only risk float overflow.
_MAX_EXPONENT = 64


class BotocoreRetries(TypedDict, total=False):
    """The shape of botocore's ``Config(retries=...)``."""

    total_max_attempts: int
    max_attempts: int
    mode: Literal["legacy", "standard", "adaptive"]


def no_botocore_retries() -> BotocoreRetries:
    """botocore's ``Config(retries=...)`` for a client whose calls our code retries: one try.

    ``total_max_attempts`` also wins over ``AWS_MAX_ATTEMPTS`` and the shared config file.
    """
    return {"mode": "standard", "total_max_attempts": 1}


def backoff(attempt: int, *, base: float, cap: float, rand: Rand = random.random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Capped exponential with full jitter: ``rand() * min(cap, base * 2**attempt)``, so uniform in
    ``[0, min(cap, base * 2**attempt))``. The one delay formula of the project.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError(f"backoff needs attempt, base and cap >= 0, got {attempt}, {base}, {cap}")
    return rand() * min(cap, base * 2 ** min(attempt, _MAX_EXPONENT))


@dataclass(frozen=True, slots=True)
class Backoff:
    """A retry budget: ``attempts`` tries in all, and :func:`backoff` with ``base`` and ``cap``."""

    attempts: int = 3
    base: float = 0.2
    cap: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < 0:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, retry: int, rand: Rand = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        return backoff(retry, base=self.base, cap=self.cap, rand=rand)

    def worst_case(self) -> float:
        """The longest total wait the budget can add (for timeout budgets)."""
        return sum(self.delay(n, rand=lambda: 1.0) for n in range(self.attempts - 1))


def call_with_backoff(
    call: Callable[[], T],
    *,
    backoff: Backoff,
    retry_if: Callable[[BaseException], bool],
    sleep: Callable[[float], None] = time.sleep,
    rand: Rand = random.random,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``call()``; while it raises an error that ``retry_if`` accepts, wait and try again.

    After ``backoff.attempts`` tries the last error is raised; other errors are raised at once.
    ``on_retry(error, seconds)`` hears of each retry before its wait (for the log).
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
