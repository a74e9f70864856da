"""cfn-lint and checkov over the template and the Dockerfile: no findings but justified ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import DOCKERFILE_PATH, ROOT, TEMPLATE_PATH, load_template


def _cfn_lint(path: Path) -> list[str]:
    from cfnlint.api import lint_file

    # Default configuration: errors (E) and warnings (W); informational (I) rules are opt-in.
    return [
        f"{m.rule.id} {m.linenumber}:{m.columnnumber} {m.message}"
        for m in lint_file(path)
        if m.rule.id[0] in "EW"
    ]


def test_cfn_lint_reports_no_errors_or_warnings() -> None:
    assert _cfn_lint(TEMPLATE_PATH) == []


def test_cfn_lint_does_find_a_broken_template(tmp_path: Path) -> None:
    # Guards against a linter that silently checks nothing (wrong path, rules not loaded).
    broken = TEMPLATE_PATH.read_text().replace("Runtime: python3.12", "Runtime: python2.7", 1)
    assert broken != TEMPLATE_PATH.read_text()
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    findings = _cfn_lint(path)
    assert any("python2.7" in finding for finding in findings), findings


def test_every_checkov_suppression_is_justified() -> None:
    skips: list[tuple[str, dict[str, Any]]] = []
    for logical, resource in load_template()["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            skips.append((logical, skip))
    assert skips, "expected the documented suppressions"
    for logical, skip in skips:
        assert skip["id"].startswith("CKV_"), (logical, skip)
        assert len(skip.get("comment", "").split()) >= 8, f"{logical}: {skip['id']} needs a reason"


def _checkov() -> str | None:
    """checkov pins its own boto3, so it lives in a venv of its own (see the Makefile)."""
    candidates = [
        os.environ.get("CHECKOV", ""),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _run_checkov(target: Path, framework: str) -> dict[str, Any]:
    checkov = _checkov()
    if checkov is None:
        pytest.skip(
            "checkov not installed: it pins boto3==1.35.49 and cannot share .venv; "
            "run `make scan-setup` (a separate .venv-checkov) or set CHECKOV=/path/to/checkov"
        )
    completed = subprocess.run(
        [
            checkov,
            "--file",
            str(target),
            "--framework",
            framework,
            "--output",
            "json",
            "--skip-download",  # offline: no Prisma Cloud guidelines or policies
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert completed.returncode in (0, 1), completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    reports = report if isinstance(report, list) else [report]
    (found,) = [r for r in reports if r.get("check_type") == framework]
    result: dict[str, Any] = found
    return result


def test_checkov_passes_the_template() -> None:
    report = _run_checkov(TEMPLATE_PATH, "cloudformation")
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report["results"].get("failed_checks", [])
    ]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 20


def test_checkov_passes_the_dockerfile() -> None:
    report = _run_checkov(DOCKERFILE_PATH, "dockerfile")
    failed = [
        f"{c['check_id']}: {c['check_name']}" for c in report["results"].get("failed_checks", [])
    ]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 10
