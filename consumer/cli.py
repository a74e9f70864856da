"""``bottleneck-consumer``: configuration, logging, signals, and the exit summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from bottleneck_contract import logs
from consumer import heap
from consumer.config import Config
from consumer.errors import ConfigError
from consumer.stall import EXIT_STALLED

log = logging.getLogger("consumer")

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the consumer until stopped or idle; exit 0, 2 for invalid configuration, or 3 when
    held work made no progress for ``--stall-timeout`` (see :mod:`consumer.stall`)."""
    # Signals are handled from the first moment: a SIGTERM while the model loads (seconds) is a
    # clean exit 0 before any message is received, not a kill.
    stop = StopSignals()
    stop.install()
    try:
        config = Config.from_args(argv)
    except ConfigError as exc:
        print(f"bottleneck-consumer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log_level)
    if config.devices == "all":
        import torch

        gpus = torch.cuda.device_count()
        if gpus > 1:
            return run_per_device(list(sys.argv[1:] if argv is None else argv), gpus)
        log.info("--devices all: %d GPU(s) visible; running one worker", gpus)
    # Heavy imports (torch, timm) only after the command line is known to be valid.
    from consumer.runtime import build_runtime
    from consumer.worker import Worker

    try:
        runtime = build_runtime(config)
    except ConfigError as exc:
        print(f"bottleneck-consumer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if stop.received:
        log.info("stopped before receiving anything", extra={"fields": {"signal": stop.received}})
        return 0
    # A consumer that decodes in its threads: its heap keeps what an image frees for the next,
    # as a decode process's does (consumer.heap). Only now: the model's weights were built on
    # the CPU, and the copies freed once they moved to the GPU must go back to the kernel first.
    if config.decode_isolation == "threads" and not heap.keep_freed_memory():
        log.debug("this C library's malloc cannot be told to keep freed memory")
    worker = Worker(runtime)
    stop.target = worker.request_stop
    if stop.received:  # arrived between the check above and the hand-over
        worker.request_stop(stop.received)
    code = worker.run()
    print(json.dumps({"summary": worker.stats.summary()}), file=sys.stdout, flush=True)
    if worker.inference.is_alive() or code == EXIT_STALLED:
        # The grace period ran out mid-forward: its messages are already released. Letting the
        # interpreter finalize under a running torch kernel can abort the process (SIGABRT,
        # "terminate called without an active exception"), which Batch would report as a
        # failure; leave at once with the real exit code instead. After a stall, whatever hung
        # may be a pool thread, which the interpreter's exit would wait for forever.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_per_device(argv: list[str], gpus: int) -> int:
    """``--devices all``: one worker process per GPU, each a plain single-device consumer.

    Processes, not threads: each worker then has its own GIL for its decode and I/O threads, its
    own CUDA context, and a crash or OOM on one GPU leaves the others working. Signals are passed
    on, so the Batch job's SIGTERM gives every worker its graceful stop; the exit code is the
    worst of theirs.
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "consumer", *argv, "--devices", "one", "--device", f"cuda:{i}"]
        )
        for i in range(gpus)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("started one worker per GPU", extra={"fields": {"gpus": gpus}})
    # A child killed by a signal reports -N; as a shell would, count it as 128 + N.
    return max(code if code >= 0 else 128 - code for code in (c.wait() for c in children))


class StopSignals:
    """SIGTERM and SIGINT, handled in one place: the first asks for the graceful stop, a second
    exits at once (SQS makes held messages visible again when their visibility runs out, so
    nothing is lost, only delayed)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.target: Callable[[str], None] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name
        log.info("stop requested", extra={"fields": {"signal": self.received}})
        if self.target is not None:
            self.target(self.received)
