"""``bottleneck-consumer``: configuration, logging, signals, and the exit summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from consumer import logs
from consumer.config import Config
from consumer.errors import ConfigError

log = logging.getLogger("consumer")

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the consumer until stopped or idle; exit 0, or 2 for invalid configuration."""
    try:
        config = Config.from_args(argv)
    except ConfigError as exc:
        print(f"bottleneck-consumer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log_level)
    # Heavy imports (torch, timm) only after the command line is known to be valid.
    from consumer.runtime import build_runtime
    from consumer.worker import Worker

    try:
        runtime = build_runtime(config)
    except ConfigError as exc:
        print(f"bottleneck-consumer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    worker = Worker(runtime)
    _install_signal_handlers(worker.request_stop)
    code = worker.run()
    print(json.dumps({"summary": worker.stats.summary()}), file=sys.stdout, flush=True)
    return code


def _install_signal_handlers(request_stop: object) -> None:
    received: list[int] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        if received:
            # A second signal: the operator wants out now. SQS makes held messages visible
            # again when their visibility runs out, so nothing is lost, only delayed.
            os._exit(128 + signum)
        received.append(signum)
        log.info("stop requested", extra={"fields": {"signal": signal.Signals(signum).name}})
        request_stop(signal.Signals(signum).name)  # type: ignore[operator]

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
