"""The Lambda package: bottleneck_contract/ and producer_lambda/, importable without torch, timm,
numpy or Pillow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from producer_lambda import package

# Run in a fresh interpreter, in the unpacked zip as Lambda runs it (/var/task first on sys.path):
# a meta-path finder makes the heavy libraries, tqdm (which the Lambda runtime lacks too) and the
# project's packages that are not in the zip unimportable, then every module of the zip is
# imported and the handler runs on a test event.
_PROBE = r"""
import importlib, json, sys

BLOCKED = {"torch", "timm", "numpy", "PIL", "tqdm", "torchvision", "safetensors",
           "bottleneck_tools", "consumer"}
OURS = {"bottleneck_contract", "producer_lambda"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked in the Lambda package test: {name}")
        return None

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[1])
modules = json.loads(sys.argv[2])
for name in modules:
    importlib.import_module(name)

from producer_lambda.handler import lambda_handler

event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "images"}
summary = lambda_handler(event, None)
print(json.dumps({
    "files": {m: getattr(sys.modules[m], "__file__", None)
              for m in sorted(sys.modules) if m.split(".")[0] in OURS},
    "blocked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "summary": summary,
}))
"""
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bottleneck_contract", "producer_lambda")
# The operator's tools and their old homes in producer_lambda/: none may ship in the function.
TOOL_MODULES = {"cli", "backfill", "redrive", "status", "reconcile", "cmdline", "collect"}


def _scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["project"]["scripts"])


def test_zip_lists_the_contract_and_the_function_and_no_tool(tmp_path: Path) -> None:
    # GIVEN the zip
    dest = tmp_path / "out" / "producer_lambda.zip"
    names = package.build(dest)
    with zipfile.ZipFile(dest) as archive:
        listed = archive.namelist()
    assert listed == names
    # THEN it holds every source file of the two packages, nothing else, and no __main__ (nor
    # the README's cost arithmetic, which the function never imports)
    assert {"producer_lambda/__main__.py", "producer_lambda/costs.py"} == package.LEFT_OUT
    expected = sorted(
        path.relative_to(ROOT).as_posix()
        for name in PACKAGES
        for path in (ROOT / name).rglob("*.py")
        if "__pycache__" not in path.parts
        and path.relative_to(ROOT).as_posix() not in package.LEFT_OUT
    )
    assert listed == expected
    assert {"producer_lambda/records.py", "producer_lambda/removals.py"} <= set(listed)
    assert {"producer_lambda/handler.py", "bottleneck_contract/messages.py"} <= set(listed)
    # AND no operator tool: no module that a console script starts, and no
    # tool module under its old name
    modules = {n.removesuffix(".py").replace("/", ".") for n in listed}
    tools = {target.split(":")[0] for target in _scripts().values()}
    assert tools & modules == set()
    assert {n.split("/")[-1].removesuffix(".py") for n in listed}.isdisjoint(TOOL_MODULES)
    assert not any(n.startswith(("bottleneck_tools/", "consumer/")) for n in listed)
    # AND the same sources give the same bytes (no needless redeploys)
    again = package.build(tmp_path / "again.zip")
    assert again == names
    assert (tmp_path / "again.zip").read_bytes() == dest.read_bytes()


def test_handler_imports_from_the_unpacked_zip_alone(tmp_path: Path) -> None:
    # GIVEN the zip, built by the module `make lambda-zip` runs, unpacked as Lambda does
    dest = tmp_path / "producer_lambda.zip"
    done = subprocess.run(
        [sys.executable, "-m", "producer_lambda.package", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(dest) in done.stdout
    task = tmp_path / "task"
    with zipfile.ZipFile(dest) as archive:
        archive.extractall(task)
        modules = [
            n[: -len(".py")].replace("/", ".").removesuffix(".__init__") for n in archive.namelist()
        ]
    # WHEN a fresh interpreter that cannot import torch/timm/numpy/PIL/tqdm, the tools or the
    # consumer imports every module of it and runs the handler
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BOTTLENECK_", "PYTHON", "AWS_ENDPOINT_URL"))
    }
    env.update(
        BOTTLENECK_QUEUE_URL="https://sqs.us-east-1.amazonaws.com/123456789012/work",
        BOTTLENECK_OUTPUT="s3://feats/resnet50/",
        AWS_DEFAULT_REGION="us-east-1",
    )
    probe = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, str(task), json.dumps(modules)],
        capture_output=True,
        text=True,
        cwd=task,
        env=env,
        timeout=60,
    )
    # THEN every module imports, each from the unpacked zip, and the handler answers the event
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(result["files"])
    outside = {m: f for m, f in result["files"].items() if not str(f).startswith(str(task))}
    assert outside == {}
    assert result["blocked"] == []
    assert result["summary"]["skipped"] == {"test-event": 1}
    assert result["summary"]["enqueued"] == 0
    assert len(modules) >= 10
