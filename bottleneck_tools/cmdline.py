"""What every command-line tool of the project shares: one-line usage errors, exit code 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

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
