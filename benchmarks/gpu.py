"""``make bench-gpu``: the GPU measurements in one run, each row on its own, within a time budget.

``python -m benchmarks.gpu`` runs a fixed set of rows, each in a child process of its own (a row
that crashes, hangs or runs out of device memory records its error and the next row starts on a
clean device), and stops starting rows when the budget is spent:

on a CUDA device (``--set gpu``; under 8 minutes on one GPU with 16 cores)
    model only, resnet50, fp32, bf16 and bf16 + ``torch.compile`` at batch 64 and 256; the
    compute path (bytes in memory -> decode -> batch -> model -> ``.npy``) with Pillow decoding in
    threads and with ``--decode cuda``; and the feed row (:mod:`benchmarks.feed`). The compiled
    rows come last: their compilation is the slowest part and the least needed.
on the CPU (``--set cpu``; what ``make test`` runs once so that this cannot rot)
    the same shape, small: ``test_resnet``, batch 4, fp32 and bf16, the compute path with
    Pillow, a short feed row; the rows that need CUDA or compile are listed as skipped.

It writes ``bench-gpu.json`` and ``bench-gpu.txt`` (the table) to ``$OUT`` if set, else
``build/``, and prints the table. The exit code is 0 when every row that ran succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

GPU_BUDGET_S = 450.0
CPU_BUDGET_S = 300.0
# A row is not started with less than this left: it could not finish, and a row killed at the
# deadline says less than one skipped.
MIN_ROW_S = 15.0
UNUSED_QUEUE = "http://127.0.0.1:1/000000000000/unused"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RowSpec:
    """One measurement: its kind (``model``, ``compute``, ``feed``) and the settings it takes."""

    name: str
    kind: str
    model: str = "resnet50"
    device: str = "cuda"
    precision: str = "bf16"
    batch_size: int = 64
    compile: bool = False
    decode: str = "pil"
    images: int = 1024
    feed_warmup: int | None = None
    skip: str = ""  # why this row is listed but not run (e.g. it needs CUDA)


def gpu_plan() -> list[RowSpec]:
    """The GPU set: model only in three precisions and two batches, compute path, feed."""
    rows = [
        RowSpec(f"model-{p}-b{b}", "model", precision=p, batch_size=b, images=b * 40)
        for p in ("fp32", "bf16")
        for b in (64, 256)
    ]
    rows += [
        RowSpec("compute-pil", "compute", decode="pil", images=1024),
        RowSpec("compute-cuda", "compute", decode="cuda", images=1024),
        RowSpec("feed", "feed", model="test_vit", device="auto", precision="auto", images=2000),
    ]
    rows += [
        RowSpec(f"model-bf16-compile-b{b}", "model", batch_size=b, compile=True, images=b * 40)
        for b in (64, 256)
    ]
    return rows


def cpu_plan() -> list[RowSpec]:
    """The same shape on the CPU, small enough for ``make test``."""
    needs_cuda = "needs a CUDA device"
    compile_off = "compile is off on the CPU (minutes of compilation for a tiny model)"
    return [
        _tiny("model-fp32-b4", "model", precision="fp32", images=32),
        _tiny("model-bf16-b4", "model", precision="bf16", images=32),
        _tiny("model-bf16-compile-b4", "model", compile=True, skip=compile_off),
        _tiny("compute-pil", "compute", precision="fp32", images=16),
        _tiny("compute-cuda", "compute", decode="cuda", skip=needs_cuda),
        # The window is kept longer than the in-flight cap (3 batches + 16 fetches): shorter,
        # it would count images fetched before it opened.
        _tiny("feed", "feed", model="test_vit", images=60),
    ]


def _tiny(name: str, kind: str, **changes: Any) -> RowSpec:
    base = RowSpec(name, kind, model="test_resnet", device="cpu", precision="fp32", batch_size=4)
    return replace(base, **changes)


# --- one row, in a child process ------------------------------------------------------------
def _model_row(spec: RowSpec) -> dict[str, Any]:
    from benchmarks import throughput as tp
    from benchmarks.accounting import ModelClock
    from consumer.config import Config
    from consumer.runtime import build_backbone

    argv = [
        *("--queue-url", UNUSED_QUEUE, "--dead-letter-url", UNUSED_QUEUE),
        *("--output", "s3://unused/bench/", "--model", spec.model, "--weights", "random"),
        *("--device", spec.device, "--precision", spec.precision),
        *("--batch-size", str(spec.batch_size), "--metrics", "off", "--spot-watch", "off"),
        *(["--compile"] if spec.compile else []),
    ]
    config = Config.from_args(argv, {})
    started = time.perf_counter()
    backbone, _ = build_backbone(config)
    backbone.warm_up(spec.batch_size)
    warm_up_s = time.perf_counter() - started
    clock = ModelClock()
    clock.attach(backbone)
    row = tp.measure_model_only(backbone, clock, spec.images, spec.batch_size, 0, [])
    result = tp.row_dict(row, None, None)
    result.update(
        {
            "device": str(backbone.device),
            "precision": backbone.precision,
            "compile": spec.compile,
            "warm_up_s": round(warm_up_s, 1),
        }
    )
    return result


def _throughput_row(spec: RowSpec, argv: list[str]) -> dict[str, Any]:
    from benchmarks import throughput as tp

    args = tp.parse_args(
        [
            *argv,
            *("--model", spec.model, "--device", spec.device, "--precision", spec.precision),
            *("--batch-size", str(spec.batch_size), "--decode", spec.decode),
        ]
    )
    result = tp.run(args, lambda line: print(line, flush=True))
    (row,) = result["rows"]
    row["setup"] = result["setup"]
    return dict(row)


def run_row(spec: RowSpec) -> dict[str, Any]:
    """Measure one row in this process; returns its figures."""
    if spec.kind == "model":
        return _model_row(spec)
    if spec.kind == "compute":
        argv = ["--rows", "compute-threads", "--images", str(spec.images), "--large-fraction", "0"]
        return _throughput_row(spec, argv)
    if spec.kind == "feed":
        argv = ["--rows", "feed", "--feed-images", str(spec.images)]
        argv += ["--feed-batch-size", str(spec.batch_size)]
        if spec.feed_warmup is not None:
            argv += ["--feed-warmup", str(spec.feed_warmup)]
        return _throughput_row(spec, argv)
    raise ValueError(f"unknown row kind {spec.kind!r}")


def child_main(spec_json: str, out_path: str) -> int:
    spec = RowSpec(**json.loads(spec_json))
    result = run_row(spec)
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


# --- the run --------------------------------------------------------------------------------
def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_spec(spec: RowSpec, timeout: float) -> dict[str, Any]:
    """One row in a child process, killed at ``timeout``; its figures, or its error."""
    started = time.monotonic()
    record: dict[str, Any] = {"row": spec.name, "kind": spec.kind, "spec": asdict(spec)}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "benchmarks.gpu", "--child", json.dumps(asdict(spec))]
        try:
            done = subprocess.run(
                [*command, "--child-out", str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=ROOT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            said = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            record.update(status="error", error=f"timed out after {timeout:.0f} s")
            record["output_tail"] = _tail(said)
        else:
            if done.returncode == 0 and out.exists():
                record.update(status="ok", result=json.loads(out.read_text()))
            else:
                lines = _tail(done.stderr or done.stdout, 1) or f"exit code {done.returncode}"
                record.update(status="error", error=lines)
                record["output_tail"] = _tail((done.stdout or "") + (done.stderr or ""))
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def run_plan(
    plan: Sequence[RowSpec],
    budget_s: float,
    out: Callable[[str], None] = print,
    runner: Callable[[RowSpec, float], dict[str, Any]] = run_spec,
) -> list[dict[str, Any]]:
    """Every row in order while the budget lasts; a failing row is recorded and the rest go on."""
    deadline = time.monotonic() + budget_s
    records = []
    for spec in plan:
        left = deadline - time.monotonic()
        if spec.skip:
            records.append({"row": spec.name, "kind": spec.kind, "status": "skipped"})
            records[-1]["reason"] = spec.skip
        elif left < MIN_ROW_S:
            records.append({"row": spec.name, "kind": spec.kind, "status": "skipped"})
            records[-1]["reason"] = f"time budget spent ({budget_s:.0f} s)"
        else:
            out(f"bench-gpu: {spec.name} ({left:.0f} s of the budget left) ...")
            records.append(runner(spec, left))
            if records[-1]["status"] != "ok":
                out(f"bench-gpu: {spec.name} failed: {records[-1]['error']}")
    return records


def _cell(record: dict[str, Any], key: str) -> str:
    value = record.get("result", {}).get(key)
    return "-" if value is None else str(value)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'row':<24} {'status':<7} {'images/s':>9} {'CPU ms/img':>10} {'outside ms':>10} "
        f"{'GIL ms':>7} {'warm-up s':>9} {'seconds':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        note = r.get("error") or r.get("reason") or ""
        result = r.get("result", {})
        if "gil_on_cpu_ms_per_image" in result:
            note = (
                f"GIL {result['gil_method']}, on a CPU {result['gil_on_cpu_ms_per_image']} ms;"
                f" process ceiling {result['ceilings']['process_ceiling_images_per_s']} img/s"
            )
        lines.append(
            f"{r['row']:<24} {r['status']:<7} {_cell(r, 'images_per_s'):>9} "
            f"{_cell(r, 'cpu_ms_per_image'):>10} {_cell(r, 'outside_model_cpu_ms_per_image'):>10} "
            f"{_cell(r, 'gil_ms_per_image'):>7} {_cell(r, 'warm_up_s'):>9} "
            f"{r.get('seconds', '-')!s:>7}  {note[:100]}"
        )
    return "\n".join(lines)


def output_dir(explicit: str | None) -> Path:
    """``--out``, else ``$OUT`` (the device machine's result folder), else ``build/``."""
    return Path(explicit or os.environ.get("OUT") or "build")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description="Model only, compute path and feed rows on a GPU (or a small set on the CPU).",
    )
    parser.add_argument(
        "--set", default="auto", choices=("auto", "gpu", "cpu"), help="auto: gpu if CUDA is there"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="total time for every row")
    parser.add_argument("--out", default=None, help="folder for the JSON (default $OUT or build/)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(
    plan: Sequence[RowSpec], budget_s: float, out_dir: Path, out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run ``plan``, write ``bench-gpu.json`` and ``bench-gpu.txt`` to ``out_dir``."""
    started = time.monotonic()
    records = run_plan(plan, budget_s, out)
    import torch

    doc = {
        "budget_s": budget_s,
        "seconds": round(time.monotonic() - started, 1),
        "setup": {
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "rows": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(records)
    (out_dir / "bench-gpu.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out_dir / "bench-gpu.txt").write_text(table + "\n", encoding="utf-8")
    out("")
    out(table)
    out(f"\nwrote {out_dir / 'bench-gpu.json'} and bench-gpu.txt ({doc['seconds']} s)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child, args.child_out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    which = args.set
    if which == "auto":
        import torch

        which = "gpu" if torch.cuda.is_available() else "cpu"
    plan = gpu_plan() if which == "gpu" else cpu_plan()
    budget = args.budget_s or (GPU_BUDGET_S if which == "gpu" else CPU_BUDGET_S)
    doc = run(plan, budget, output_dir(args.out), lambda line: print(line, flush=True))
    return 0 if all(r["status"] != "error" for r in doc["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
