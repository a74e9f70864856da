"""Build the Lambda package: a zip of ``producer_lambda/`` alone (the runtime provides boto3).

    python -m producer_lambda.package [build/producer_lambda.zip]

Only ``*.py`` files go in (no ``__pycache__``), under ``producer_lambda/`` so that the handler is
``producer_lambda.handler.lambda_handler``. Entries are sorted and carry a fixed timestamp, so the
same sources give the same bytes (and the same CodeSha256: no needless redeploys).
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_DEST", "PACKAGE_DIR", "build", "main", "package_files"]

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_DEST = Path("build") / "producer_lambda.zip"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def package_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The package's source files, sorted: ``*.py`` at any depth, never under ``__pycache__``."""
    return sorted(
        path
        for path in package_dir.rglob("*.py")
        if "__pycache__" not in path.relative_to(package_dir).parts and path.is_file()
    )


def build(dest: Path = DEFAULT_DEST, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Write the zip to ``dest`` (atomically) and return its entry names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    partial = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in package_files(package_dir):
            name = (Path(package_dir.name) / path.relative_to(package_dir)).as_posix()
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
