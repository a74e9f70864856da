"""Build the Lambda package: ``bottleneck_contract/`` and ``producer_lambda/`` (boto3 comes with
the runtime).

    python -m producer_lambda.package [build/producer_lambda.zip]

Only ``*.py`` files go in (no ``__pycache__``), each under its package folder so that the handler
is ``producer_lambda.handler.lambda_handler``. ``producer_lambda/__main__.py`` stays out: it starts
the operator's ``bottleneck-enqueue``, which is not in the zip. Entries are sorted and carry a fixed
timestamp, so the same sources give the same bytes (and the same CodeSha256: no needless
redeploys). ``producer_lambda/costs.py`` stays out too: the README's cost arithmetic, which the
function never imports.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_DEST", "LEFT_OUT", "PACKAGE_DIRS", "build", "main", "package_files"]

_ROOT = Path(__file__).resolve().parent.parent
# The contract first: the handler imports it.
PACKAGE_DIRS: tuple[Path, ...] = (_ROOT / "bottleneck_contract", _ROOT / "producer_lambda")
DEFAULT_DEST = Path("build") / "producer_lambda.zip"
# What a package folder holds that the function never runs.
LEFT_OUT = frozenset({"producer_lambda/__main__.py", "producer_lambda/costs.py"})
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def package_files(package_dirs: Sequence[Path] = PACKAGE_DIRS) -> list[tuple[str, Path]]:
    """``(zip entry name, source path)`` for every ``*.py`` of the packages, sorted by name."""
    found: list[tuple[str, Path]] = []
    for package_dir in package_dirs:
        for path in package_dir.rglob("*.py"):
            relative = path.relative_to(package_dir)
            name = (Path(package_dir.name) / relative).as_posix()
            if "__pycache__" in relative.parts or not path.is_file() or name in LEFT_OUT:
                continue
            found.append((name, path))
    return sorted(found)


def build(dest: Path = DEFAULT_DEST, package_dirs: Sequence[Path] = PACKAGE_DIRS) -> list[str]:
    """Write the zip to ``dest`` (atomically) and return its entry names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    partial = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, path in package_files(package_dirs):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # readable by the Lambda runtime's user
            archive.writestr(info, path.read_bytes())
            names.append(name)
    os.replace(partial, dest)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the zip, print its path and entries."""
    parser = argparse.ArgumentParser(prog="python -m producer_lambda.package")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    names = build(args.dest)
    print(f"{args.dest}: {len(names)} files")
    for name in names:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
