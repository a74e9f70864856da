"""Who may import whom: the contract imports none of the others, the consumer never imports the
producer, and the producer's Lambda code never imports the operator's tools."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the packages its modules must never import (with the files allowed to, and why)
FORBIDDEN = {
    "bottleneck_contract": {"consumer", "producer_lambda", "bottleneck_tools"},
    "consumer": {"producer_lambda"},
    "producer_lambda": {"bottleneck_tools", "consumer"},
}
# `python -m producer_lambda` is `bottleneck-enqueue` by contract; it stays out of the zip.
ALLOWED = {("producer_lambda/__main__.py", "bottleneck_tools")}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, at any depth of its code (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_crosses_its_package_boundary(package: str) -> None:
    # GIVEN every module of the package WHEN its imports are read
    crossings = sorted(
        (path.relative_to(ROOT).as_posix(), name)
        for path in (ROOT / package).rglob("*.py")
        for name in imported_packages(path) & FORBIDDEN[package]
    )
    # THEN none imports a package it must not
    assert [c for c in crossings if c not in ALLOWED] == []


def test_the_scan_sees_lazy_imports() -> None:
    # GIVEN the demo, which imports the tools inside a function THEN the scan finds them
    assert "bottleneck_tools" in imported_packages(ROOT / "consumer" / "demo.py")


@pytest.mark.parametrize("module", ["consumer.cli", "benchmarks.throughput", "benchmarks.gpu"])
def test_a_main_module_that_starts_decode_processes_does_not_import_torch(module: str) -> None:
    # GIVEN what a main module that starts the consumer imports (bottleneck-consumer's script
    # imports consumer.cli; make bench and bench-gpu run these): multiprocessing imports the
    # main module again in every decode process (all but a package's __main__, which it skips)
    code = f"import sys, {module}; print('torch' in sys.modules)"
    # WHEN it is imported alone
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    # THEN torch stays out (a decode process with torch holds about 500 MB more, mostly shared)
    assert done.stdout.strip() == "False"
