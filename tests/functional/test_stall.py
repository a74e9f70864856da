"""A consumer whose held work makes no progress (a hung GPU, say) lets it go and exits 3, and a
message that stalls it while running alone is dead-lettered as ``crashed`` like one that kills
it (``--stall-timeout``, :mod:`consumer.stall`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from consumer.aws import Clients
from consumer.quarantine import MARKERS
from consumer.runtime import Runtime, build_runtime
from consumer.stall import EXIT_STALLED
from consumer.worker import Worker
from tests.corpus import photo_jpeg
from tests.functional.conftest import Stack, consumer_config
from tests.functional.test_faults import upload_and_send

# A consumer that does not notice its stall would wait forever: fail instead.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hung() -> Iterator[threading.Event]:
    """Set at the end of the test: lets the forward passes that hung return."""
    event = threading.Event()
    yield event
    event.set()


def hanging_worker(stack: Stack, hung: threading.Event) -> Worker:
    """A consumer whose device never finishes a forward pass, with a 1 s stall timeout."""
    config = consumer_config(stack, "--stall-timeout", "1", "--stop-grace", "0")
    runtime: Runtime = build_runtime(config, Clients(stack.s3, stack.sqs))

    def hang(batch: torch.Tensor) -> Any:
        hung.wait()
        raise RuntimeError("the device hung")

    runtime.backbone.submit = hang  # type: ignore[method-assign]
    return Worker(runtime)


def counts(stack: Stack) -> tuple[int, int]:
    attrs = stack.sqs.get_queue_attributes(
        QueueUrl=stack.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def test_a_consumer_whose_work_makes_no_progress_releases_it_and_exits_3(
    stack: Stack, hung: threading.Event
) -> None:
    # GIVEN three images, and a device that hangs on the first forward pass
    upload_and_send(stack, {f"stall/{i}.jpg": photo_jpeg(64, 48, seed=i) for i in range(3)})
    worker = hanging_worker(stack, hung)

    # WHEN the consumer runs
    code = worker.run()

    # THEN after the stall timeout it exits 3 with every message back on the queue at once
    # (visible, not waiting out its visibility timeout), nothing written, nothing dead-lettered
    assert code == EXIT_STALLED
    assert worker.stop_reason == "stalled"
    assert counts(stack) == (3, 0)
    assert stack.feature_keys() == []
    assert stack.dead_letters() == []


def test_a_message_that_stalls_the_consumer_alone_is_dead_lettered_as_crashed(
    stack: Stack, hung: threading.Event
) -> None:
    # GIVEN one image whose forward pass hangs, on a queue with maxReceiveCount 3
    upload_and_send(stack, {"stall/poison.jpg": photo_jpeg(64, 48, seed=7)})

    # WHEN consumers run one after another: the first stalls on it fresh, the second stalls on
    # it running alone (a suspect, behind a quarantine marker)
    assert hanging_worker(stack, hung).run() == EXIT_STALLED
    assert stack.feature_keys(f"v1/{MARKERS}") == []
    assert hanging_worker(stack, hung).run() == EXIT_STALLED
    assert len(stack.feature_keys(f"v1/{MARKERS}")) == 1

    # THEN the third finds the marker at the message's last receive: it is dead-lettered as
    # crashed without running again, and the marker is gone
    assert hanging_worker(stack, hung).run() == 0
    letters = stack.dead_letters()
    assert [letter["error-code"] for letter in letters] == ["crashed"]
    assert "stalled" in letters[0]["error-detail"]
    assert stack.feature_keys() == []
    assert counts(stack) == (0, 0)


def test_slow_work_that_progresses_is_no_stall(stack: Stack) -> None:
    # GIVEN 40 images, batches of 4, and a device that takes 0.5 s a batch: the work lasts
    # longer than the 4 s stall timeout, but a batch finishes every second or so
    images = {f"slow/{i:02d}.jpg": photo_jpeg(64, 48, seed=i) for i in range(40)}
    upload_and_send(stack, images)
    config = consumer_config(stack, "--stall-timeout", "4")
    runtime = build_runtime(config, Clients(stack.s3, stack.sqs))
    real_submit = runtime.backbone.submit

    def slow(batch: torch.Tensor) -> Any:
        time.sleep(0.5)
        return real_submit(batch)

    runtime.backbone.submit = slow  # type: ignore[method-assign]
    worker = Worker(runtime)

    # WHEN the consumer runs
    started = time.monotonic()
    code = worker.run()

    # THEN it worked for longer than the stall timeout, finished everything and exited 0 when
    # idle
    assert time.monotonic() - started > 4
    assert (code, worker.stop_reason) == (0, "idle")
    assert worker.stats.summary()["images_written"] == len(images)


def test_images_that_wait_only_for_their_shards_age_are_no_stall(stack: Stack) -> None:
    # GIVEN 30 images (past the first 20 the receivers are no longer careful, so the last
    # shard waits for its age instead of being written as soon as nothing else comes), shards
    # written at 30 s of age, a 1 s stall timeout and a 3 s idle exit
    upload_and_send(stack, {f"shard/{i:02d}.jpg": photo_jpeg(64, 48, seed=i) for i in range(30)})
    config = consumer_config(
        stack,
        *("--layout", "shards", "--shard-rows", "100", "--shard-max-seconds", "30"),
        *("--stall-timeout", "1", "--idle-exit", "3"),
    )
    worker = Worker(build_runtime(config, Clients(stack.s3, stack.sqs)))

    # WHEN the consumer runs
    code = worker.run()

    # THEN the computed images waited for their shard longer than the stall timeout without
    # being taken for a stall, and the idle exit wrote the shard
    assert (code, worker.stop_reason) == (0, "idle")
    assert worker.stats.summary()["images_sharded"] == 30
