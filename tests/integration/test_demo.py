"""`bottleneck-demo` end to end on its embedded moto server, with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumer import demo


def test_demo_runs_the_whole_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # WHEN the demo runs with 3 images per class and a tiny model
    code = demo.main(
        ["--model", "test_resnet", "--per-class", "3", "--batch-size", "4", "--out", str(tmp_path)]
    )

    # THEN every good image has features, the broken one is dead-lettered, and it says so
    out = capsys.readouterr().out
    assert code == 0
    assert "failed (dead-lettered)  1 {'truncated': 1}" in out
    assert "dead letters  1: truncated 1" in out  # the closing status view
    assert "bottleneck-collect s3://" in out  # the command to run next
    # AND it ends with the five images nearest to the first, that one first
    nearest = out.split("examples/search.py")[1].split("\nnext,")[0].strip().splitlines()
    assert nearest[0].endswith(" demo/circles/000.jpg --k 5")
    assert nearest[1] == "1  1.0000  demo/circles/000.jpg"
    assert [line.split()[0] for line in nearest[1:]] == ["1", "2", "3", "4", "5"]
    # AND the collected dataset holds one row per good image
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 12
    assert np.load(tmp_path / "features.npy", mmap_mode="r").shape[0] == 12
