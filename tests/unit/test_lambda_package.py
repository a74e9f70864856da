"""The Lambda package: bottleneck_contract/ and producer_lambda/, importable without torch, timm,
numpy or Pillow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from producer_lambda import package

# Run in a fresh interpreter: a meta-path finder makes the heavy libraries (and tqdm, which the
# Lambda runtime lacks too) unimportable, the zip goes first on sys.path, then every module of the
# package is imported and the handler runs on a test event.
_PROBE = r"""
import importlib, json, sys

BLOCKED = {"torch", "timm", "numpy", "PIL", "tqdm", "torchvision", "safetensors"}

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

import producer_lambda
from producer_lambda.handler import lambda_handler

event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "images"}
summary = lambda_handler(event, None)
print(json.dumps({
    "file": producer_lambda.__file__,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "summary": summary,
}))
"""


def test_zip_holds_the_package_sources_only(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "producer_lambda.zip"
    names = package.build(dest)
    with zipfile.ZipFile(dest) as archive:
        listed = archive.namelist()
    assert listed == names
    assert "producer_lambda/handler.py" in listed
    assert "producer_lambda/__init__.py" in listed
    assert "bottleneck_contract/messages.py" in listed
    assert all(
        n.startswith(("bottleneck_contract/", "producer_lambda/")) and n.endswith(".py")
        for n in listed
    )
    assert not any("__pycache__" in n for n in listed)
    # The same sources give the same bytes (no needless redeploys).
    again = package.build(tmp_path / "again.zip")
    assert again == names
    assert (tmp_path / "again.zip").read_bytes() == dest.read_bytes()


def test_handler_imports_from_the_zip_without_heavy_libraries(tmp_path: Path) -> None:
    # GIVEN the zip, built by the module `make lambda-zip` runs
    dest = tmp_path / "producer_lambda.zip"
    done = subprocess.run(
        [sys.executable, "-m", "producer_lambda.package", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(dest) in done.stdout
    with zipfile.ZipFile(dest) as archive:
        modules = [
            n[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            for n in archive.namelist()
            if not n.endswith("__main__.py")
        ]
    # WHEN a fresh interpreter that cannot import torch/timm/numpy/PIL imports it and runs it
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
        [sys.executable, "-I", "-c", _PROBE, str(dest), json.dumps(modules)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    # THEN every module imports, from the zip, and the handler answers the test event
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(dest))
    assert result["heavy"] == []
    assert result["summary"]["skipped"] == {"test-event": 1}
    assert result["summary"]["enqueued"] == 0
    assert len(modules) >= 10
