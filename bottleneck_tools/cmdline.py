"""What every command-line tool of the project shares: one-line usage errors, exit code 2, flags
that fall back to ``BOTTLENECK_*`` variables, and a progress bar that worker threads may update."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

from producer_lambda.settings import SettingsError

T = TypeVar("T")

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line naming the flag, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_validated(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    build: Callable[[argparse.Namespace, Mapping[str, str]], T],
) -> T:
    """Parse ``argv`` and build the tool's options; an invalid value exits 2 with one line."""
    args = parser.parse_args(argv)
    try:
        return build(args, environ)
    except SettingsError as exc:
        parser.error(str(exc))


def flag_or_env(
    args: argparse.Namespace, flag: str, var: str, environ: Mapping[str, str]
) -> tuple[str | None, str]:
    """A flag's value, else its environment variable's (blank counts as unset), with the name
    that supplied it (for the error that names it); ``(None, flag)`` when neither is set."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None:
        return value, flag
    if environ.get(var, "").strip():
        return environ[var].strip(), var
    return None, flag


class Progress:
    """A tqdm bar on ``file`` counting work done, safe to update from worker threads.

    It draws only on a terminal (tqdm's ``disable=None``), so pipes and logs stay clean, and not
    at all when ``enabled`` is false (then tqdm is not even imported).
    """

    def __init__(self, desc: str, unit: str, file: TextIO, *, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # only when a bar may be drawn

            self._bar = tqdm(desc=desc, unit=unit, file=file, disable=None, dynamic_ncols=True)

    def update(self, count: int) -> None:
        """Add ``count`` to the bar."""
        if self._bar is not None and count:
            with self._lock:
                self._bar.update(count)

    def close(self) -> None:
        """Leave the bar as it stands (before the summary is printed below it)."""
        if self._bar is not None:
            with self._lock:
                self._bar.close()
