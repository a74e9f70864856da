"""Device-path options: torch.compile, one worker per GPU, and EMF metrics from the stats."""

from __future__ import annotations

import io
import json
import signal
from typing import Any

import numpy as np
import pytest
import timm
import torch

from consumer import cli
from consumer.metrics import MetricsEmitter
from consumer.model import Backbone
from consumer.preprocess import InputSpec
from consumer.stats import Stats


def _backbone(**options: Any) -> Backbone:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    spec = InputSpec.from_model(model)
    return Backbone(
        model, spec, device=torch.device("cpu"), precision="fp32", pool="avg", **options
    )


@pytest.mark.slow
def test_compiled_model_gives_the_eager_features() -> None:
    # GIVEN the same weights, eager and compiled (warmed up like the consumer does)
    eager, compiled = _backbone(), _backbone(compile=True)
    compiled.warm_up(4)
    batch = torch.randint(0, 256, (3, eager.spec.height, eager.spec.width, 3), dtype=torch.uint8)

    # THEN a batch size it was not warmed up with gives the same numbers
    np.testing.assert_allclose(compiled(batch), eager(batch), rtol=1e-4, atol=1e-5)


def test_devices_all_starts_one_worker_per_gpu_and_reports_the_worst_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[list[str]] = []

    class FakeChild:
        def __init__(self, command: list[str]) -> None:
            started.append(command)
            self.code = [0, -9][len(started) - 1]

        def wait(self) -> int:
            return self.code

        def poll(self) -> int | None:
            return None

        def send_signal(self, signum: int) -> None:
            pass

    monkeypatch.setattr(cli.subprocess, "Popen", FakeChild)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)

    code = cli.run_per_device(["--queue-url", "Q", "--devices", "all"], 2)

    assert [c[-4:] for c in started] == [
        ["--devices", "one", "--device", "cuda:0"],
        ["--devices", "one", "--device", "cuda:1"],
    ]
    assert code == 128 + signal.SIGKILL  # the killed worker, as a shell reports it


def test_stats_feed_batches_and_failures_to_the_metrics() -> None:
    stream = io.StringIO()
    emitter = MetricsEmitter(stream, clock=lambda: 100.0, dimensions={"Queue": "work"})
    stats = Stats(emitter)

    stats.batch(8, 0.25)
    stats.image_failed("truncated", permanent=True)
    emitter.flush()

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    images = next(line for line in lines if "Images" in line)
    failures = next(line for line in lines if "Failures" in line)
    assert images["Images"] == 8 and images["Queue"] == "work"
    assert failures["ErrorCode"] == "truncated" and failures["Failures"] == 1
