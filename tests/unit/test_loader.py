"""The load stage: which thread decodes, and what a fetched image holds on its way."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bottleneck_contract.messages import ImageRef
from consumer.batch_queue import BatchQueue
from consumer.decode import DecodeLimits
from consumer.errors import TransientError
from consumer.inflight import InFlight
from consumer.objects import Fetched
from consumer.stages.load import Loader
from consumer.stats import Stats
from consumer.work import ImageTask, Message


class Objects:
    name = "fake"

    def get(self, bucket: str, key: str, *, max_bytes: int) -> Fetched:
        return Fetched(data=key.encode(), etag="e")


class RecordingPreparer:
    """Records the thread each decode ran on and the encoded bytes held at that moment."""

    limits = DecodeLimits()

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return np.full((2, 2, 3), len(data), np.uint8)


def loader(prepare: RecordingPreparer, out: BatchQueue[ImageTask], *, inline: bool) -> Loader:
    return Loader(
        s3=Objects(),  # type: ignore[arg-type]
        inflight=InFlight(64, on_settle=lambda action: None),
        out=out,
        stats=Stats(),
        halted=threading.Event(),
        prepare=prepare,
        fetch_concurrency=4,
        decode_threads=2,
        output_bucket="features",
        fingerprint="f",
        head_first=False,
        decode_inline=inline,
    )


def task(key: str) -> ImageTask:
    message = Message("m-" + key, "r", "{}", 1, time.monotonic(), time.monotonic() + 60)
    return ImageTask(message=message, ref=ImageRef("images", key), output_key=key + ".npy")


@pytest.mark.parametrize(("inline", "thread"), [(True, "fetch"), (False, "decode")])
def test_decode_runs_on_the_fetching_thread_only_when_inline(inline: bool, thread: str) -> None:
    # GIVEN a loader whose preparer is (inline) or is not (a thread pool's) a process pool
    prepare = RecordingPreparer()
    out: BatchQueue[ImageTask] = BatchQueue(16)
    load = loader(prepare, out, inline=inline)

    # WHEN eight images are loaded
    for i in range(8):
        load.submit(task(f"k{i}"))
    got = out.take(8, max_wait=10.0, first_wait=10.0)
    load.shutdown()

    # THEN each reaches the batch queue decoded, its encoded bytes let go, and every decode ran
    # on a fetch thread when inline (no second hand-off), on a decode thread otherwise
    assert sorted(t.ref.key for t in got) == [f"k{i}" for i in range(8)]
    assert all(t.pixels is not None and t.data is None for t in got)
    assert {name.split("_")[0] for name in prepare.threads} == {thread}


def test_an_image_whose_decoders_stopped_with_the_worker_is_left_for_the_release() -> None:
    # GIVEN decode processes that the stopping worker closes while an image waits for one
    halted = threading.Event()

    class Stopped(RecordingPreparer):
        def __call__(self, data: bytes) -> np.ndarray:
            halted.set()
            raise TransientError("stopping", "decoding stopped with the worker")

    out: BatchQueue[ImageTask] = BatchQueue(16)
    load = loader(Stopped(), out, inline=True)
    load.halted = halted
    image = task("k")
    image.data = b"encoded"

    # WHEN the fetch thread's decode fails that way
    load._decode(image)

    # THEN it is not counted as a failed image nor resolved: the release owns its message
    assert load.stats.summary()["images_failed"] == 0
    assert image.failure is None and image.outcome is None
    assert out.take(1, max_wait=0.0, first_wait=0.0) == []
