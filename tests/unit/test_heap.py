"""Which processes keep what an image frees (consumer.heap): the ones that decode."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

import consumer.runtime
import consumer.worker
from consumer import cli, heap

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"


class _BuiltTheWorker(Exception):
    """Where these tests stop: the command line has built everything up to the worker."""


@pytest.fixture
def command_line(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """cli.main with no model, no signals, no BOTTLENECK_* settings; the calls it makes to
    keep_freed_memory, in order, with what happened before each."""
    events: list[str] = []
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for name in [name for name in os.environ if name.startswith("BOTTLENECK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli.StopSignals, "install", lambda self: None)

    def keep() -> bool:
        events.append("kept")
        return True

    def build_runtime(config: object) -> object:
        events.append("runtime built")
        return object()

    def worker(runtime: object) -> None:
        raise _BuiltTheWorker

    monkeypatch.setattr(heap, "keep_freed_memory", keep)
    monkeypatch.setattr(consumer.runtime, "build_runtime", build_runtime)
    monkeypatch.setattr(consumer.worker, "Worker", worker)
    yield events
    root.handlers[:], root.level = handlers, level


def _run(*extra: str) -> None:
    with pytest.raises(_BuiltTheWorker):
        cli.main(["--queue-url", QUEUE, "--output", "s3://feats/v1/", *extra])


def test_a_consumer_that_decodes_in_its_own_threads_keeps_freed_memory(
    command_line: list[str],
) -> None:
    # WHEN the consumer decodes in its threads THEN its heap keeps what images free, set once
    # the model is built (the weights' CPU copies, freed once on the GPU, go back first)
    _run("--decode-isolation", "threads")
    assert command_line == ["runtime built", "kept"]


def test_a_consumer_with_decode_processes_leaves_its_own_heap_alone(
    command_line: list[str],
) -> None:
    # Its decode processes keep theirs (tests/functional/test_decode_pool.py); the model's
    # process does not decode, and glibc's defaults stay its allocator's.
    _run()
    assert command_line == ["runtime built"]
