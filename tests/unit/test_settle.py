"""The one place that decides delete, dead-letter, release or drop."""

from __future__ import annotations

import json
import random

import pytest

from bottleneck_contract.messages import ImageRef
from consumer.errors import Failure
from consumer.settle import RELEASE_MAX_SECONDS, Verdict, decide, release_delay
from consumer.work import ImageTask, Message

PERMANENT = Failure("not-an-image", "text file", permanent=True)
TRANSIENT = Failure("throttled", "SlowDown", permanent=False)


def message(*outcomes: object, receive_count: int = 1) -> Message:
    msg = Message("m-1", "rh", '{"bucket":"b","key":"k0"}', receive_count, 0.0, 60.0)
    for index, outcome in enumerate(outcomes):
        task = ImageTask(message=msg, ref=ImageRef("b", f"k{index}"))
        if isinstance(outcome, Failure):
            task.failure = outcome
        else:
            task.outcome = outcome  # type: ignore[assignment]
        msg.images.append(task)
    return msg


def test_all_done_deletes() -> None:
    assert decide(message("written", "exists")).verdict is Verdict.DELETE


def test_no_images_deletes() -> None:
    # GIVEN a test event or a delete notification (nothing to do)
    assert decide(message()).verdict is Verdict.DELETE


def test_permanent_failure_dead_letters_the_original_body_for_one_image() -> None:
    action = decide(message(PERMANENT))
    assert action.verdict is Verdict.DEAD_LETTER
    assert [letter.body for letter in action.dead_letters] == ['{"bucket":"b","key":"k0"}']
    assert action.dead_letters[0].failure.error_code == "not-an-image"


def test_multi_image_message_dead_letters_each_failed_image_alone() -> None:
    action = decide(message("written", PERMANENT, PERMANENT))
    assert action.verdict is Verdict.DEAD_LETTER
    keys = [json.loads(letter.body)["key"] for letter in action.dead_letters]
    assert keys == ["k1", "k2"]


def test_any_transient_failure_releases_with_backoff() -> None:
    action = decide(message("written", PERMANENT, TRANSIENT), rng=random.Random(1))
    assert action.verdict is Verdict.RELEASE
    assert action.delay > 0


def test_stopping_releases_at_once() -> None:
    assert decide(message(TRANSIENT), stopping=True).delay == 0
    assert decide(message(None), stopping=True).verdict is Verdict.RELEASE


def test_lost_message_is_dropped_whatever_its_images_did() -> None:
    msg = message("written", PERMANENT)
    msg.lost = True
    assert decide(msg).verdict is Verdict.DROP


def test_malformed_body_is_dead_lettered_as_is() -> None:
    msg = message()
    msg.body = "not json"
    msg.malformed = Failure("bad-message", "body is not JSON", permanent=True)
    action = decide(msg)
    assert action.verdict is Verdict.DEAD_LETTER
    assert action.dead_letters[0].body == "not json"


@pytest.mark.parametrize(("count", "low", "high"), [(1, 4, 6), (2, 8, 12), (4, 32, 48)])
def test_release_delay_grows_with_receive_count(count: int, low: int, high: int) -> None:
    delays = {release_delay(count, random.Random(seed)) for seed in range(20)}
    assert min(delays) >= low and max(delays) <= high


def test_release_delay_is_capped() -> None:
    assert release_delay(40, random.Random(0)) <= RELEASE_MAX_SECONDS
