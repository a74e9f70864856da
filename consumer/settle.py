"""The one place that decides what happens to a message once all its images are resolved.

:func:`decide` is pure: given a message whose images each ended in an outcome or a
:class:`~consumer.errors.Failure`, it returns the action the acker carries out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

from bottleneck_contract.messages import encode
from consumer.errors import Failure
from consumer.work import Message

# Released messages come back after base * 2**(receives - 1) seconds (capped, with +-20%
# jitter), so a throttled dependency gets room to recover before maxReceiveCount runs out.
RELEASE_BASE_SECONDS = 5
RELEASE_MAX_SECONDS = 900


class Verdict(Enum):
    DELETE = "delete"  # every image done: the message has served its purpose
    DEAD_LETTER = "dead-letter"  # send the failures to the DLQ, then delete
    RELEASE = "release"  # a transient failure: make it visible again after a delay
    DROP = "drop"  # our receipt handle went stale: another worker owns it now


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter queue entry: the body to keep and why it failed."""

    body: str
    failure: Failure


@dataclass(frozen=True, slots=True)
class Action:
    verdict: Verdict
    message: Message
    dead_letters: tuple[DeadLetter, ...] = field(default=())
    delay: int = 0


def decide(message: Message, *, stopping: bool = False, rng: random.Random | None = None) -> Action:
    """Choose delete, dead-letter, release or drop for a fully resolved ``message``.

    A transient failure anywhere releases the whole message (its finished images are skipped on
    the next delivery, so nothing is done twice); otherwise permanent failures are dead-lettered,
    one entry per failed image, keeping the original body when it names a single image.
    ``stopping`` releases at once (visibility 0) so that another worker takes over.
    """
    if message.lost:
        return Action(Verdict.DROP, message)
    if message.malformed is not None:
        return Action(Verdict.DEAD_LETTER, message, (DeadLetter(message.body, message.malformed),))
    failures = [task for task in message.images if task.failure is not None]
    if any(task.failure is not None and not task.failure.permanent for task in failures):
        return Action(
            Verdict.RELEASE,
            message,
            delay=0 if stopping else release_delay(message.receive_count, rng),
        )
    if any(task.outcome is None and task.failure is None for task in message.images):
        # Unfinished images (a stop cut them short): hand the message to another worker.
        return Action(Verdict.RELEASE, message, delay=0)
    if not failures:
        return Action(Verdict.DELETE, message)
    single = len(message.images) == 1
    letters = tuple(
        DeadLetter(message.body if single else encode(task.ref), task.failure)
        for task in failures
        if task.failure is not None
    )
    return Action(Verdict.DEAD_LETTER, message, letters)


def release_delay(receive_count: int, rng: random.Random | None = None) -> int:
    """Seconds before a released message is visible again, growing with its receive count."""
    exponent = max(0, min(receive_count - 1, 16))
    delay = min(RELEASE_MAX_SECONDS, RELEASE_BASE_SECONDS * 2**exponent)
    jitter = (rng or random).uniform(0.8, 1.2)
    return max(1, min(RELEASE_MAX_SECONDS, round(delay * jitter)))
