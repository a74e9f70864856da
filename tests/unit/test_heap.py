"""Which processes keep what an image frees (consumer.heap): the ones that decode."""

from __future__ import annotations

import pytest

from consumer import cli, heap
from consumer.errors import ConfigError

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/work"


def _main(monkeypatch: pytest.MonkeyPatch, *extra: str) -> list[str]:
    """Run the command line up to building the runtime; the calls to keep_freed_memory."""
    calls: list[str] = []

    def keep() -> bool:
        calls.append("kept")
        return True

    monkeypatch.setattr(heap, "keep_freed_memory", keep)
    monkeypatch.setattr(cli.StopSignals, "install", lambda self: None)

    def no_runtime(config: object) -> None:
        raise ConfigError("stop here: the model is not what this test is about")

    import consumer.runtime

    monkeypatch.setattr(consumer.runtime, "build_runtime", no_runtime)
    argv = ["--queue-url", QUEUE, "--output", "s3://feats/v1/", *extra]
    assert cli.main(argv) == cli.EXIT_CONFIG
    return calls


def test_a_consumer_that_decodes_in_its_own_threads_keeps_freed_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _main(monkeypatch, "--decode-isolation", "threads") == ["kept"]


def test_a_consumer_with_decode_processes_leaves_its_own_heap_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its decode processes keep theirs (tests/functional/test_decode_pool.py); the model's
    # process does not decode, and glibc's defaults stay its allocator's.
    assert _main(monkeypatch) == []
