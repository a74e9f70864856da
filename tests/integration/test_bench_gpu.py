"""``make bench-gpu``'s CPU set, run once here so that it cannot rot; its failure handling.

Nothing asserts a speed: only that every row ran, what it reports, and where it wrote it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu
from benchmarks.feed import INSTANCES


def test_cpu_set_runs_every_row_and_writes_json_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the CPU set runs (tiny models, small batches, compile off)
    code = gpu.main(["--set", "cpu", "--out", str(tmp_path)])

    # THEN every row of the plan is in the JSON, in order: run, or skipped with its reason
    assert code == 0
    doc = json.loads((tmp_path / "bench-gpu.json").read_text())
    plan = gpu.cpu_plan()
    assert [r["row"] for r in doc["rows"]] == [spec.name for spec in plan]
    for spec, record in zip(plan, doc["rows"], strict=True):
        if spec.skip:
            assert record == {"row": spec.name, "kind": spec.kind, "status": "skipped",
                              "reason": spec.skip}  # fmt: skip
            continue
        assert record["status"] == "ok", record
        result = record["result"]
        assert math.isfinite(result["images_per_s"]) and result["images_per_s"] > 0
        assert result["outside_model_cpu_ms_per_image"] >= 0
    rows = {r["row"]: r for r in doc["rows"]}
    assert rows["model-bf16-b4"]["result"]["precision"] == "bf16"
    assert rows["compute-pil"]["result"]["row"] == "compute-threads"
    assert doc["setup"]["cuda"] is False

    # AND the feed row has its stages, its GIL figures and a ceiling per instance
    feed = rows["feed"]["result"]
    assert feed["model"] == "test_vit" and feed["images"] >= 60
    # (decode runs in the decode processes, handed over by the fetch threads that fetched the
    # images; the S3 work in the fetch and write threads and obstore's native threads;
    # per-thread CPU is read in nanoseconds)
    stages_ms = feed["outside_model_cpu_ms_per_image_by_stage"]
    stages = set(stages_ms)
    assert {"child-processes", "fetch", "write", "receive"} <= stages
    assert "decode" not in stages
    # (the decode's share is its processes', and the rest is everything else outside the model)
    assert feed["decode_cpu_ms_per_image"] == stages_ms["child-processes"] > 0
    assert feed["outside_model_not_decode_cpu_ms_per_image"] == pytest.approx(
        feed["outside_model_cpu_ms_per_image"] - feed["decode_cpu_ms_per_image"], abs=0.011
    )
    assert feed["layout"] == "files" and feed["machine_reference_ms"] > 0
    assert feed["outside_model_cpu_per_moto_cpu"] > 0
    assert feed["s3_client"] in {"obstore", "boto3"}
    # The consumer's own clients, as in production: the native S3 client and the lean SQS one
    assert feed["sqs_client"] == "lean"
    costs = {(r["layout"], r["instance"]): r["fed"] for r in feed["costs_per_million_images"]}
    assert set(costs) == {(lay, i.name) for lay in ("files", "shards") for i in INSTANCES}
    # per-image files pay a PUT per image ($5 per million); shards nearly none
    assert costs[("files", "g6.2xlarge")]["s3"] > 5.0 > 1.0 > costs[("shards", "g6.2xlarge")]["s3"]
    assert feed["gil_method"] in {"py-spy", "probe"}
    # Sixty images are about a second of feed: py-spy sees the GIL held a few times, and on a
    # loaded machine (the suite's three workers) at times never (one run: 1 sample, in a
    # benchmark thread, so 0.0 ms), so only the order of the two figures is certain here.
    assert 0 <= feed["gil_on_cpu_ms_per_image"] <= feed["gil_ms_per_image"]
    assert [r["instance"] for r in feed["ceilings"]["rows"]] == [i.name for i in INSTANCES]
    assert 0.8 <= feed["requests_per_image"]["PutObject"] < 1.3

    # AND the table, printed and written, has one line per row
    table = (tmp_path / "bench-gpu.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["row", "status", "images/s"]
    assert [line.split()[0] for line in table[2:]] == [spec.name for spec in plan]
    printed = capsys.readouterr().out
    assert "\n".join(table) in printed


def test_a_failing_row_records_its_error_and_the_rest_go_on() -> None:
    # GIVEN a row whose child process fails (no such model) between two that work
    broken = gpu.RowSpec("broken", "model", model="no_such_model", device="cpu")
    plan = [gpu.RowSpec("first", "model"), broken, gpu.RowSpec("last", "model")]
    ran: list[str] = []

    def runner(spec: gpu.RowSpec, timeout: float) -> dict[str, Any]:
        if spec is broken:
            return gpu.run_spec(spec, timeout)
        ran.append(spec.name)
        return {"row": spec.name, "kind": spec.kind, "status": "ok", "result": {}}

    # WHEN the plan runs
    records = gpu.run_plan(plan, budget_s=300, out=lambda _: None, runner=runner)

    # THEN the broken row says why, with its output, and the next row still ran
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert ran == ["first", "last"]
    assert "no_such_model" in records[1]["error"] + records[1]["output_tail"]
    # AND the table shows it
    assert "error" in gpu.format_table(records).splitlines()[3]


def test_a_row_is_killed_at_the_budget_and_none_starts_without_one() -> None:
    # GIVEN a row that cannot finish in half a second (it imports torch and builds a model)
    spec = gpu.RowSpec("slow", "model", model="test_resnet", device="cpu", precision="fp32")

    # WHEN it runs with half a second left
    record = gpu.run_spec(spec, timeout=0.5)

    # THEN it is recorded as timed out
    assert record["status"] == "error"
    assert record["error"].startswith("timed out")

    # AND with no budget left no row starts
    def never(spec: gpu.RowSpec, timeout: float) -> dict[str, Any]:
        raise AssertionError("no row may start")

    records = gpu.run_plan([spec, spec], budget_s=0, out=lambda _: None, runner=never)
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert records[0]["reason"].startswith("time budget spent")


def test_output_goes_to_out_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gpu.output_dir(None) == Path("/tmp/device-out")
    assert gpu.output_dir("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("OUT")
    assert gpu.output_dir(None) == Path("build")
