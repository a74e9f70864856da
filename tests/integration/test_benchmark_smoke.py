"""`python -m benchmarks.throughput` end to end on a tiny set: the table's and the JSON's shape.

Nothing here asserts a speed: a loaded CI machine must not fail it. What it does assert are
counts: one GetObject and one PutObject per image and no HEAD before fetching, the minimum the
contract allows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import throughput

ROW_KEYS = {
    "row",
    "label",
    "images",
    "seconds",
    "images_per_s",
    "vs_model_only",
    "vs_naive",
    "cpu_ms_per_image",
    "model_cpu_ms_per_image",
    "outside_model_cpu_ms_per_image",
    "cpu_ms_per_image_by_thread",
    "peak_rss_mib",
}


def test_benchmark_prints_its_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the benchmark runs every measurement but the feed row (tests/integration/
    # test_bench_gpu.py runs that one) on 12 JPEGs (3 of them 2000x1500), tiny model
    report = tmp_path / "bench.json"
    code = throughput.main(
        [
            *("--model", "test_resnet", "--device", "cpu", "--images", "12"),
            *("--batch-size", "4", "--large-fraction", "0.25", "--json", str(report)),
            *("--skip", "feed"),
        ]
    )

    # THEN it succeeds and prints one table: header, rule, one line per measurement, in order
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))
    header = lines[start].split()
    assert header[:3] == ["row", "images", "seconds"]
    assert "images/s" in header and header[-3:] == ["peak", "RSS", "MiB"]
    table = lines[start + 2 : start + 2 + len(throughput.MAIN_ROWS)]
    for line, key in zip(table, throughput.MAIN_ROWS, strict=True):
        assert line.startswith(throughput.LABELS[key])
        cells = line[len(throughput.LABELS[key]) :].split()
        assert len(cells) == len(throughput.COLUMNS) - 1
        assert cells[0] == "12"
    assert lines[start + 2 + len(throughput.MAIN_ROWS)] == ""
    assert "targets:" in lines

    # AND the JSON holds the same rows with every figure
    doc = json.loads(report.read_text())
    assert set(doc) == {"setup", "rows", "decode_only", "targets", "process_peak_rss_mib"}
    assert doc["setup"]["model"] == "test_resnet"
    assert doc["setup"]["device"] == "cpu" and doc["setup"]["precision"] == "fp32"
    assert doc["setup"]["batch_size"] == 4 and doc["setup"]["images"] == 12
    rows = {row["row"]: row for row in doc["rows"]}
    assert list(rows) == list(throughput.MAIN_ROWS)
    for row in rows.values():
        assert set(row) >= ROW_KEYS
        assert row["images"] == 12
        for name in ("seconds", "images_per_s", "cpu_ms_per_image", "peak_rss_mib"):
            assert math.isfinite(row[name]) and row[name] > 0, (row["row"], name)
        assert row["model_cpu_ms_per_image"] > 0
        assert row["outside_model_cpu_ms_per_image"] >= 0
    assert rows["model"]["vs_model_only"] == 1.0
    assert rows["naive"]["vs_naive"] == 1.0
    assert rows["compute-processes"]["decode_pool"] == "processes"

    # AND the consumer made one GET and one PUT per image (an application-level retry on a
    # loaded machine may add one), and a HEAD only after a conditional-put conflict
    requests = rows["e2e"]["requests_per_image"]
    assert 1.0 <= requests["GetObject"] < 1.2
    assert 1.0 <= requests["PutObject"] < 1.2
    assert requests.get("HeadObject", 0) <= requests["PutObject"] - 1.0
    assert 0 < requests["DeleteMessageBatch"] <= 1.0
    assert rows["naive"]["requests_per_image"] == {
        "DeleteMessage": 1.0,
        "GetObject": 1.0,
        "PutObject": 1.0,
        "ReceiveMessage": 1.0,
    }
    assert rows["e2e"]["peak_rss_first_half_mib"] > 0

    # AND decode alone was measured on one thread, a thread pool and a process pool
    decode = doc["decode_only"]
    assert set(decode["ms_per_image_one_thread"]) == {"500x375", "2000x1500"}
    assert [pool["pool"] for pool in decode["pools"]] == ["threads", "threads", "processes"]
    assert {t["target"] for t in doc["targets"]} >= {
        "end to end / model only (resnet50 fp32, CPU)",
        "end to end / naive (resnet50 fp32, CPU)",
    }
    for target in doc["targets"]:
        assert set(target) == {"target", "issue", "value", "threshold", "met", "applies"}
        assert target["issue"] == 7  # the feed row, and its targets (issue 11), did not run
        assert target["applies"] is False  # tiny model: no target is judged on this run
