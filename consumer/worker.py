"""The worker: the stages joined by bounded queues, with an explicit lifecycle.

``start()`` launches the threads; ``request_stop()`` (SIGTERM, SIGINT, Spot notice, idle exit)
stops receiving; ``run()`` blocks until then and performs the graceful stop, and returns the exit
code.

The shutdown protocol, in order (every exit takes it: idle, SIGTERM, SIGINT, Spot notice; only a
second signal skips it, see ``consumer.cli``):

1. ``receiving_stopped`` is set. No receiver starts another receive; a partial micro-batch is
   computed at once instead of waiting ``--max-wait-ms`` for images that will not come.
2. The work in hand gets the grace period (``--stop-grace``; 0 for the idle exit, which holds
   nothing) to be written and its messages deleted.
3. Every receive already under way is awaited, however short the grace: SQS has made its messages
   invisible, and the receiver hands them back at once (visibility 0). A long poll ends within
   its wait time (at most 20 s, ``--idle-exit`` seconds when that is shorter), so this is bounded.
   With ``--layout shards`` the shard being filled is then written, and the shards being
   written awaited, before anything is released: its images are done only once it is.
4. ``halted`` is set. Fetch, decode, model and write drop what they hold; every message not yet
   settled is released at once, so that another worker takes it now rather than after its
   visibility timeout.
5. The acker carries out the last deletes, dead-letters and releases; then the heartbeat, the
   Spot watch and the pools stop. After an exit 0 the queue holds no message this worker received
   that is still invisible because of it.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time

from consumer.batch_queue import BatchQueue
from consumer.byte_budget import ByteBudget
from consumer.decode_pool import DecodeProcesses
from consumer.dedupe import ContentIndex
from consumer.inflight import InFlight
from consumer.metrics import MetricsEmitter
from consumer.quarantine import Quarantine, max_receive_count
from consumer.runtime import Runtime
from consumer.spot import SpotWatch
from consumer.stages.ack import ACK_CALLS, Acker
from consumer.stages.heartbeat import Heartbeat
from consumer.stages.infer import Inference
from consumer.stages.load import Loader
from consumer.stages.receive import LONG_POLL_SECONDS, Receiver
from consumer.stages.shards import ShardWriter, writer_name
from consumer.stages.write import Writer
from consumer.stall import EXIT_STALLED, STALL_TIMEOUT_FLOOR, StallWatch, thread_stacks
from consumer.stats import Stats
from consumer.work import ImageTask

log = logging.getLogger(__name__)

# On a stop, the longest the last shards may take to be written before the rest is released
# (inside Batch's 30 s between SIGTERM and SIGKILL with the default --stop-grace, usually: what
# was drained during the grace has been written already).
SHARD_CLOSE_SECONDS = 15.0


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
        self.receiving_stopped = threading.Event()
        self.halted = threading.Event()
        # Settled messages go to the acker; the lambda defers the lookup until it exists.
        self.inflight = InFlight(cfg.in_flight_limit, lambda action: self.acker.put(action))
        self.acker = Acker(
            work_queue=runtime.work_queue,
            inflight=self.inflight,
            stats=self.stats,
            concurrency=ACK_CALLS,
            nothing_coming=lambda: self.quarantine.nothing_coming,
        )
        self.decoded: BatchQueue[ImageTask] = BatchQueue(maxsize=2 * cfg.batch_size)
        content_index = (
            ContentIndex(runtime.objects, cfg.output.bucket, cfg.output.prefix, runtime.fingerprint)
            if cfg.dedupe == "content"
            else None
        )
        # --layout shards: many images per object, each image done once its shard is written.
        self.shards = (
            ShardWriter(
                objects=runtime.objects,
                inflight=self.inflight,
                stats=self.stats,
                settings=runtime.settings,
                fingerprint=runtime.fingerprint,
                feature_shape=runtime.feature_shape,
                output_bucket=cfg.output.bucket,
                output_prefix=cfg.output.prefix,
                shard_rows=cfg.shard_rows,
                max_seconds=cfg.shard_max_seconds,
                writer=writer_name(),
                # A partial shard is written once nothing else is on its way when nothing more
                # will come (a stop), or when the quarantine waits for held messages to settle
                # (careful receives after a start or a redelivery; a suspect running alone).
                flush_partial=lambda: self.receiving_stopped.is_set() or self.quarantine.careful,
            )
            if cfg.layout == "shards"
            else None
        )
        self.writer = Writer(
            s3=runtime.objects,
            inflight=self.inflight,
            stats=self.stats,
            halted=self.halted,
            settings=runtime.settings,
            fingerprint=runtime.fingerprint,
            output_bucket=cfg.output.bucket,
            overwrite=cfg.overwrite,
            orphan_check=cfg.orphan_check == "head",
            concurrency=cfg.write_concurrency,
            content_index=content_index,
        )
        self.loader = Loader(
            s3=runtime.objects,
            inflight=self.inflight,
            out=self.decoded,
            stats=self.stats,
            halted=self.halted,
            prepare=runtime.prepare,
            fetch_concurrency=cfg.fetch_concurrency,
            decode_threads=cfg.decode_threads,
            output_bucket=cfg.output.bucket,
            fingerprint=runtime.fingerprint,
            head_first=cfg.existing_check == "head" and not cfg.overwrite,
            # --overwrite recomputes everything: copies of existing features would defeat it.
            content_index=None if cfg.overwrite else content_index,
            decode_on_device=runtime.batch_decoder is not None,
            decode_inline=isinstance(runtime.prepare, DecodeProcesses),
            budget=ByteBudget(cfg.max_encoded_bytes),
        )
        self.inference = Inference(
            backbone=runtime.backbone,
            source=self.decoded,
            sink=self.writer.submit if self.shards is None else self.shards.submit,
            inflight=self.inflight,
            stats=self.stats,
            batch_size=cfg.batch_size,
            max_wait=cfg.max_wait_ms / 1000,
            halted=self.halted,
            receiving_stopped=self.receiving_stopped,
            nothing_coming=lambda: self.quarantine.nothing_coming,
            batch_decoder=runtime.batch_decoder,
        )
        self.heartbeat = Heartbeat(
            work_queue=runtime.work_queue,
            inflight=self.inflight,
            visibility=cfg.visibility_timeout,
        )
        self.quarantine = Quarantine(
            s3=runtime.clients.s3,
            bucket=cfg.output.bucket,
            prefix=cfg.output.prefix,
            max_receives=_max_receives(runtime),
            on_pause=self.decoded.wake,
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
                dispatch=self.loader.submit if self.shards is None else self._dispatch,
                output_prefix=cfg.output.prefix,
                visibility=cfg.visibility_timeout,
                wait_seconds=wait,
                stats=self.stats,
                receiving_stopped=self.receiving_stopped,
                quarantine=self.quarantine,
            )
            for i in range(cfg.receivers)
        ]
        self.stop_reason: str | None = None
        self.stalled = False  # set by the stall watch (consumer.stall), whatever stopped first

    def _dispatch(self, task: ImageTask) -> None:
        """Down the pipeline, the shard writer told (it writes a partial shard only once
        nothing else is on its way)."""
        assert self.shards is not None
        self.shards.track(task)
        self.loader.submit(task)

    def start(self) -> None:
        if 0 < self.config.stall_timeout < STALL_TIMEOUT_FLOOR:
            log.warning(
                "--stall-timeout is shorter than legitimate waits (S3 retries, a decode's time "
                "limit): a healthy consumer may be taken for stalled",
                extra={"fields": {"stall_timeout_s": self.config.stall_timeout}},
            )
        for thread in (self.acker, self.heartbeat, self.inference, *self.receivers):
            thread.start()
        if self.shards is not None:
            self.shards.start()
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
                    "layout": self.config.layout,
                    **(
                        {"shard_writer": self.shards.writer, "shard_rows": self.shards.capacity}
                        if self.shards is not None
                        else {}
                    ),
                }
            },
        )

    def request_stop(self, reason: str) -> None:
        """Stop receiving; :meth:`run` then finishes the graceful stop. Safe from any thread."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.receiving_stopped.set()
        self.decoded.wake()  # a partial batch is computed now, not after --max-wait-ms

    def idle_for(self) -> float:
        """Seconds in which every receive came back empty and nothing was held; else 0.

        Images in a shard not yet written count as nothing held when nothing else is: they wait
        only for the flush that the idle exit's stop makes (else an idle worker would wait for
        the shard's age, up to --shard-max-seconds, before it could exit)."""
        waiting_for_shard = self.shards is not None and self.shards.holds_all()
        if (not self.inflight.empty() and not waiting_for_shard) or not self.acker.idle():
            return 0.0
        now = time.monotonic()
        if now < self.acker.redelivery_due:
            return 0.0  # a message this worker released with a delay is coming back
        idle = min(receiver.idle_for(now) for receiver in self.receivers)
        # All standing by: a receiver is between its reservation and its poll; not idle yet.
        return 0.0 if math.isinf(idle) else idle

    def run(self) -> int:
        """Start, wait for a stop (signal, idle exit, stall), stop gracefully; return the exit
        code: 0, or :data:`~consumer.stall.EXIT_STALLED`."""
        self.start()
        idle_exit = self.config.idle_exit
        watch = StallWatch(self.config.stall_timeout) if self.config.stall_timeout else None
        while not self.receiving_stopped.wait(0.2):
            if idle_exit and self.idle_for() >= idle_exit:
                self.request_stop("idle")
            if watch is not None and watch.stalled(
                busy=self._busy(), progress=self.stats.progress, now=time.monotonic()
            ):
                self._stalled()
        # No grace for work known to be stuck, nor for an idle worker, which holds nothing.
        quick = self.stalled or self.stop_reason == "idle"
        self.shutdown(0.0 if quick else self.config.stop_grace)
        return EXIT_STALLED if self.stalled else 0

    def _busy(self) -> bool:
        """Unsettled work is held, other than images that wait only for their shard's flush
        (which comes with the shard's age, up to --shard-max-seconds, not with progress)."""
        if self.shards is not None and self.shards.waits_for_age():
            return False
        return any(not message.settled for message in self.inflight.held())

    def _stalled(self) -> None:
        """Held work made no progress for --stall-timeout: say where every thread is, keep the
        marker of a suspect running alone (the stall is held against it, as a death would be),
        and stop as on SIGTERM, so that the messages go back to the queue at once."""
        self.stalled = True
        self.quarantine.keep_markers = True
        self.request_stop("stalled")
        log.error(
            "no progress with work in flight; releasing it and exiting",
            extra={
                "fields": {
                    "stall_timeout_s": self.config.stall_timeout,
                    "held": len(self.inflight.held()),
                    "exit_code": EXIT_STALLED,
                    # Where each thread is: what tells a hung GPU call from a hung request.
                    "stacks": thread_stacks(),
                }
            },
        )

    def shutdown(self, grace: float) -> None:
        """The shutdown protocol of the module docstring, steps 1 to 5."""
        self.receiving_stopped.set()  # 1
        self.decoded.wake()
        finished = self.inflight.wait_empty(grace)  # 2
        for receiver in self.receivers:  # 3
            # A long poll ends within its wait; the margin covers a slow answer (SQS's read
            # timeout is longer still, but a receive that slow has failed anyway).
            receiver.join(timeout=receiver.wait_seconds + 10)
            if receiver.is_alive():
                log.warning("a receive did not return in time", extra={"fields": {}})
        if self.shards is not None:
            # Before anything is released: the rows computed so far are written, and their
            # messages deleted; a flush that fails releases its own.
            self.shards.close(SHARD_CLOSE_SECONDS)
            finished = all(message.settled for message in self.inflight.held())
        if not finished:
            log.warning(
                "grace period over; releasing unfinished messages",
                extra={"fields": {"held": len(self.inflight.held()), "grace_s": grace}},
            )
        self.halted.set()  # 4
        self.decoded.wake()
        self.inflight.release_unfinished()
        self.inflight.wait_empty(5.0)  # 5
        self.loader.shutdown()
        close_decoders = getattr(self.runtime.prepare, "close", None)
        if close_decoders is not None:
            close_decoders()  # decode processes: their sockets close and they exit
        self.writer.shutdown(wait=False)  # files; with shards it never had work
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


def _max_receives(runtime: Runtime) -> int | None:
    """The work queue's ``maxReceiveCount``; a crash is named only with 3 or more."""
    try:
        limit = max_receive_count(runtime.clients.sqs, runtime.config.queue_url)
    except Exception as exc:
        log.warning("cannot read the work queue's redrive policy", exc_info=exc)
        return None
    if limit is not None and limit < 3:
        log.warning(
            "maxReceiveCount below 3: a message that kills the consumer reaches the dead-letter "
            "queue without the reason 'crashed'",
            extra={"fields": {"max_receive_count": limit}},
        )
    return limit
