"""The worker: the stages joined by bounded queues, with an explicit lifecycle.

``start()`` launches the threads; ``request_stop()`` (SIGTERM, SIGINT, Spot notice, idle exit)
stops receiving; ``run()`` blocks until then and performs the graceful stop: finish what is in
hand within the grace period, write and delete what finished, release the rest at once
(visibility 0) so that another worker takes it, and return the exit code.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time

from consumer.inflight import InFlight
from consumer.metrics import MetricsEmitter
from consumer.runtime import Runtime
from consumer.spot import SpotWatch
from consumer.stages.ack import Acker
from consumer.stages.heartbeat import Heartbeat
from consumer.stages.infer import Inference
from consumer.stages.load import Loader
from consumer.stages.receive import LONG_POLL_SECONDS, Receiver
from consumer.stages.write import Writer
from consumer.stats import Stats
from consumer.work import ImageTask

log = logging.getLogger(__name__)


class Worker:
    """One consumer process's pipeline on one device."""

    def __init__(self, runtime: Runtime, stats: Stats | None = None) -> None:
        cfg = runtime.config
        self.runtime = runtime
        self.config = cfg
        self.metrics = (
            MetricsEmitter(sys.stdout, dimensions={"Queue": cfg.queue_name})
            if cfg.metrics == "emf"
            else None
        )
        self.stats = stats or Stats(self.metrics)
        self.spot_watch = (
            SpotWatch(cfg.metadata_endpoint, self.request_stop) if cfg.spot_watch == "on" else None
        )
        self.stop_receiving = threading.Event()
        self.halt = threading.Event()
        # Settled messages go to the acker; the lambda defers the lookup until it exists.
        self.inflight = InFlight(cfg.in_flight_limit, lambda action: self.acker.put(action))
        self.acker = Acker(work_queue=runtime.work_queue, inflight=self.inflight, stats=self.stats)
        self.decoded: queue.Queue[ImageTask] = queue.Queue(maxsize=2 * cfg.batch_size)
        self.writer = Writer(
            s3=runtime.clients.s3,
            inflight=self.inflight,
            stats=self.stats,
            stop=self.halt,
            settings=runtime.settings,
            fingerprint=runtime.fingerprint,
            output_bucket=cfg.output.bucket,
            overwrite=cfg.overwrite,
            concurrency=cfg.write_concurrency,
        )
        self.loader = Loader(
            s3=runtime.clients.s3,
            inflight=self.inflight,
            out=self.decoded,
            stats=self.stats,
            stop=self.halt,
            prepare=runtime.prepare,
            fetch_concurrency=cfg.fetch_concurrency,
            decode_threads=cfg.decode_threads,
            output_bucket=cfg.output.bucket,
            fingerprint=runtime.fingerprint,
            head_first=cfg.existing_check == "head" and not cfg.overwrite,
        )
        self.inference = Inference(
            backbone=runtime.backbone,
            source=self.decoded,
            sink=self.writer.submit,
            inflight=self.inflight,
            stats=self.stats,
            batch_size=cfg.batch_size,
            max_wait=cfg.max_wait_ms / 1000,
            stop=self.halt,
            flush=self.stop_receiving,
        )
        self.heartbeat = Heartbeat(
            work_queue=runtime.work_queue,
            inflight=self.inflight,
            visibility=cfg.visibility_timeout,
        )
        wait = LONG_POLL_SECONDS
        if cfg.idle_exit:
            # An idle worker must notice the empty queue within about --idle-exit seconds.
            wait = max(1, min(LONG_POLL_SECONDS, int(cfg.idle_exit)))
        self.receivers = [
            Receiver(
                f"receive-{i}",
                work_queue=runtime.work_queue,
                inflight=self.inflight,
                dispatch=self.loader.submit,
                output_prefix=cfg.output.prefix,
                visibility=cfg.visibility_timeout,
                wait_seconds=wait,
                stats=self.stats,
                stop=self.stop_receiving,
            )
            for i in range(cfg.receivers)
        ]
        self.stop_reason: str | None = None

    def start(self) -> None:
        for thread in (self.acker, self.heartbeat, self.inference, *self.receivers):
            thread.start()
        if self.spot_watch is not None:
            self.spot_watch.start()
        log.info(
            "consumer started",
            extra={
                "fields": {
                    "queue_url": self.config.queue_url,
                    "output": str(self.config.output),
                    "batch_size": self.config.batch_size,
                    "in_flight_limit": self.config.in_flight_limit,
                }
            },
        )

    def request_stop(self, reason: str) -> None:
        """Stop receiving; :meth:`run` then finishes the graceful stop. Safe from any thread."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_receiving.set()

    def idle_for(self) -> float:
        """Seconds since any receiver last got a message, when nothing is held; else 0."""
        if not self.inflight.empty() or not self.acker.idle():
            return 0.0
        if time.monotonic() < self.acker.redelivery_due:
            return 0.0  # a message this worker released with a delay is coming back
        last = max(receiver.last_message_at for receiver in self.receivers)
        return time.monotonic() - last

    def run(self) -> int:
        """Start, wait for a stop (signal, idle exit), stop gracefully; return the exit code."""
        self.start()
        idle_exit = self.config.idle_exit
        while not self.stop_receiving.wait(0.2):
            if idle_exit and self.idle_for() >= idle_exit:
                self.request_stop("idle")
        self.shutdown(self.config.stop_grace if self.stop_reason != "idle" else 0.0)
        return 0

    def shutdown(self, grace: float) -> None:
        """Finish in-hand work within ``grace`` seconds, release the rest, stop every thread."""
        self.stop_receiving.set()
        deadline = time.monotonic() + grace
        finished = self.inflight.wait_empty(grace)
        # A receive already under way when the stop came returns its messages within its poll
        # (at most 20 s): wait for it while the grace period lasts, so that they are handed back
        # now rather than hidden until their visibility timeout.
        for receiver in self.receivers:
            receiver.join(timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            log.warning(
                "grace period over; releasing unfinished messages",
                extra={"fields": {"held": len(self.inflight.held()), "grace_s": grace}},
            )
        self.halt.set()
        self.inflight.release_unfinished()
        self.inflight.wait_empty(5.0)
        self.loader.shutdown()
        self.writer.shutdown(wait=False)
        self.heartbeat.stop()
        if self.spot_watch is not None:
            self.spot_watch.stop()
        self.acker.stop()
        self.acker.join(timeout=10)
        if self.stats.metrics is not None:
            self.stats.metrics.flush()
        log.info(
            "consumer stopped",
            extra={"fields": {"reason": self.stop_reason or "stopped", **self.stats.summary()}},
        )
