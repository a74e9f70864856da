"""Throughput benchmark: is the model, or the plumbing around it, setting the pace?

``python -m benchmarks.throughput`` (``make bench``; options through ``BENCH_ARGS``) builds one
set of generated JPEGs (500x375, a fraction of them 2000x1500) and, with the same model, batch size
and precision, measures:

``model``
    model only: random uint8 batches already in memory through the consumer's ``Backbone``
    (device copy, normalisation, forward), no decoding; the ceiling for everything below.
``e2e``
    the consumer end to end: the real :class:`consumer.worker.Worker`, built by
    :func:`consumer.runtime.build_runtime`, in this process, against SQS and S3 on a moto
    ``ThreadedMotoServer`` on 127.0.0.1 (in a child process, so that its CPU is counted apart).
    Timed from the worker's start, with every message already enqueued, until every feature file
    is written and every message deleted.
``compute-threads`` / ``compute-processes``
    the compute path alone: bytes in memory, decoded by the consumer's preparer in a pool of
    threads (what the consumer does) or of spawned processes, micro-batched and run through the
    ``Backbone`` with one batch in flight behind another (as the consumer's inference stage does),
    then serialised to ``.npy`` bytes by a writer pool. No AWS, no emulator.
``naive``
    the original workflow: one message at a time, receive 1, GET, decode, a batch of 1, PUT,
    delete, nothing overlapped (against the same moto server).

Columns: images/s; each row's ratio to model-only and to naive; CPU milliseconds per image in all,
in the model and outside it (see :mod:`benchmarks.accounting` for the method: process CPU minus
the forward passes' thread time and torch's native worker threads); peak resident memory. It also
prints decode alone (one thread, a thread pool, a process pool: the issue's "threads or
processes"), S3/SQS requests per image, the moto server's CPU per image, and the issue's targets,
each met or not. ``--json PATH`` writes the same figures.

Runs unchanged on a CUDA device (``--device auto``: bf16 and batch 64 there, fp32 and batch 16 on
the CPU, unless ``--precision`` / ``--batch-size`` say otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import queue
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.accounting import CpuMeter, CpuReport, ModelClock, RssSampler
from benchmarks.feed import (
    add_feed_arguments,
    feed_targets,
    format_feed,
    measure_feed,
    settled_images,
)
from benchmarks.moto_keepalive import MotoServer

if TYPE_CHECKING:
    # Imported where used: it imports torch, and multiprocessing imports this module again in
    # every child process the consumer starts (its decode processes), which must not carry torch.
    from benchmarks.decode_pool import DecodePool

ROWS = ("model", "e2e", "compute-threads", "compute-processes", "naive", "feed")
MAIN_ROWS = ROWS[:-1]
SKIPPABLE = (*ROWS, "decode")
LABELS = {
    "model": "model only (uint8 in memory)",
    "e2e": "consumer end to end (SQS+S3 moto)",
    "compute-threads": "compute path, decode threads",
    "compute-processes": "compute path, decode processes",
    "naive": "naive: 1 message at a time",
    "feed": "feed: test_vit e2e, 500x375 (moto)",
}
SMALL = (500, 375)
LARGE = (2000, 1500)
IMAGE_BUCKET = "bench-images"
FEATURE_BUCKET = "bench-features"
MB = 1024 * 1024


# --- options --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Model-only vs consumer end to end vs compute path vs naive baseline.",
    )
    parser.add_argument("--model", default="resnet50", help="timm model (default resnet50)")
    parser.add_argument(
        "--weights", default="random", help="random (default; nothing is downloaded) or a path"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (default), fp32, bf16, fp16")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 64 on CUDA, 16 on the CPU"
    )
    parser.add_argument("--images", type=int, default=240, help="JPEGs in the set (default 240)")
    parser.add_argument(
        "--large-fraction",
        type=float,
        default=0.1,
        help="fraction of 2000x1500 JPEGs among the 500x375 ones (default 0.1)",
    )
    parser.add_argument("--decode", default="pil", help="pil (default), pil-draft or cuda")
    parser.add_argument(
        "--decode-pool",
        default="both",
        choices=("threads", "processes", "both"),
        help="decode pool(s) for the compute path (default both: the threads-or-processes row)",
    )
    parser.add_argument("--decode-workers", type=int, default=0, help="default: one per core")
    for flag in ("--receivers", "--fetch-concurrency", "--write-concurrency"):
        parser.add_argument(
            flag,
            type=int,
            default=None,
            help=f"the consumer's {flag} in the rows against moto (default: MOTO_CONCURRENCY's)",
        )
    parser.add_argument("--max-wait-ms", type=int, default=200, help="consumer --max-wait-ms")
    parser.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="ROW",
        help=f"run only these measurements (repeatable or comma-separated): {', '.join(SKIPPABLE)}"
        " (e.g. --rows feed)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="ROW",
        help=f"leave out a measurement (repeatable or comma-separated): {', '.join(SKIPPABLE)}",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="image set and weights seed")
    add_feed_arguments(parser)
    args = parser.parse_args(argv)
    for option in ("rows", "skip"):
        items = {item.strip() for value in getattr(args, option) for item in value.split(",")}
        items.discard("")
        unknown = items - set(SKIPPABLE)
        if unknown:
            parser.error(
                f"--{option}: unknown {sorted(unknown)}; choose from {', '.join(SKIPPABLE)}"
            )
        setattr(args, option, items)
    if args.rows:
        args.skip |= set(SKIPPABLE) - args.rows
    if args.decode_pool == "threads":
        args.skip.add("compute-processes")
    elif args.decode_pool == "processes":
        args.skip.add("compute-threads")
    if args.images < 1:
        parser.error("--images: must be >= 1")
    if not 0 <= args.large_fraction <= 1:
        parser.error("--large-fraction: must be between 0 and 1")
    if args.feed_images < 1 or args.feed_batch_size < 1:
        parser.error("--feed-images and --feed-batch-size: must be >= 1")
    return args


# --- the image set --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSet:
    keys: list[str]
    data: list[bytes]
    sizes: list[tuple[int, int]]

    @property
    def total_bytes(self) -> int:
        return sum(len(d) for d in self.data)

    def describe(self) -> str:
        counts = Counter(f"{w}x{h}" for w, h in self.sizes)
        parts = ", ".join(f"{n} x {size}" for size, n in sorted(counts.items()))
        return f"{len(self.data)} JPEGs ({parts}; {self.total_bytes / MB:.1f} MiB)"


def build_image_set(n: int, large_fraction: float, seed: int) -> ImageSet:
    """``n`` photo-like JPEGs (quality 90), the large ones spread evenly through the set.

    A few dozen distinct images are generated and cycled: decoding cost depends on size and
    content, not on uniqueness, and generating hundreds of 2000x1500 images would take longer
    than the benchmark.
    """
    from consumer.demo import CLASSES, synthetic_image

    n_large = round(n * large_fraction)
    large_at = {round((i + 0.5) * n / n_large) for i in range(n_large)} if n_large else set()
    large_at = {min(n - 1, i) for i in large_at}
    cache: dict[tuple[int, int, int], bytes] = {}
    keys, data, sizes = [], [], []
    for i in range(n):
        size = LARGE if i in large_at else SMALL
        variant = i % (6 if size == LARGE else 24)
        ident = (*size, variant)
        if ident not in cache:
            kind = CLASSES[variant % len(CLASSES)]
            cache[ident] = synthetic_image(kind, seed=seed * 1000 + variant, size=size)
        keys.append(f"bench/{i:06d}-{size[0]}x{size[1]}.jpg")
        data.append(cache[ident])
        sizes.append(size)
    return ImageSet(keys, data, sizes)


@contextlib.contextmanager
def fake_aws_environment(endpoint: str) -> Iterator[None]:
    """Point every AWS client at ``endpoint`` with dummy credentials; restore afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- measurement plumbing -------------------------------------------------------------------
@dataclass
class Row:
    key: str
    images: int
    seconds: float
    cpu: CpuReport
    peak_rss: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def per_image_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.images


class Probe:
    """Starts CPU accounting and RSS sampling together; :meth:`stop` ends both."""

    def __init__(
        self,
        clock: ModelClock,
        exclude_pids: Sequence[int],
        *,
        children: bool = False,
        overhead: Sequence[str] = ("bench-rss",),
    ) -> None:
        self.meter = CpuMeter(clock, exclude_pids, overhead)
        self.sampler = RssSampler(exclude_pids, children=children)
        self.started = 0.0

    def start(self) -> None:
        self.sampler.start()
        self.meter.start()
        self.started = time.perf_counter()

    def stop(self) -> tuple[float, CpuReport]:
        elapsed = time.perf_counter() - self.started
        report = self.meter.stop()
        self.sampler.stop()
        return elapsed, report


def _random_batches(backbone: Any, batch_size: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    shape = (batch_size, backbone.spec.height, backbone.spec.width, 3)
    return [backbone.stack(list(rng.integers(0, 256, shape, dtype=np.uint8))) for _ in range(2)]


def measure_model_only(
    backbone: Any, clock: ModelClock, n: int, batch_size: int, seed: int, exclude: Sequence[int]
) -> Row:
    """Random uint8 batches already stacked (pinned on CUDA), one in flight behind another."""
    batches = _random_batches(backbone, batch_size, seed)
    backbone(batches[0])  # warm-up (allocator, oneDNN/cuDNN choices)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    probe = Probe(clock, exclude)
    probe.start()
    previous = None
    for i, size in enumerate(sizes):
        batch = batches[i % 2][:size]
        pending = backbone.submit(batch)
        if previous is not None:
            previous.result()
        previous = pending
    if previous is not None:
        previous.result()
    seconds, report = probe.stop()
    return Row("model", n, seconds, report, probe.sampler.peak)


def _collect(source: queue.Queue[Any], max_items: int, max_wait: float) -> list[Any]:
    """Up to ``max_items``: wait briefly for the first, then at most ``max_wait`` for the rest."""
    try:
        batch = [source.get(timeout=0.05)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + max_wait
    while len(batch) < max_items:
        remaining = deadline - time.monotonic()
        try:
            batch.append(source.get(timeout=remaining) if remaining > 0 else source.get_nowait())
        except queue.Empty:
            break
    return batch


def run_compute_path(
    backbone: Any,
    pool: DecodePool,
    images: Sequence[bytes],
    *,
    batch_size: int,
    max_wait: float,
    write_threads: int,
    dtype: str = "float32",
    on_start: Callable[[], None] = lambda: None,
    on_finish: Callable[[], None] = lambda: None,
) -> int:
    """Bytes -> decode pool -> micro-batches -> Backbone -> ``.npy`` bytes; returns bytes written.

    Pipelined like the consumer: images in flight are capped (3 batches plus two per decode
    worker), decodes run in the pool, one thread owns the model and submits the next batch
    before it reads the previous one's result, a writer pool serialises each row.
    """
    from consumer.features import serialise

    n = len(images)
    slots = threading.Semaphore(3 * batch_size + 2 * pool.workers)
    decoded: queue.Queue[Any] = queue.Queue()
    written: list[int] = []
    lock = threading.Lock()
    finished = threading.Event()
    measured = threading.Event()
    errors: list[BaseException] = []

    def feed() -> None:
        for data in images:
            slots.acquire()
            if errors:
                return
            pool.submit(data).add_done_callback(lambda f: decoded.put(f.exception() or f.result()))

    def write(row: np.ndarray) -> None:
        size = len(serialise(row, dtype))
        slots.release()
        with lock:
            written.append(size)
            if len(written) == n:
                finished.set()

    writer = ThreadPoolExecutor(write_threads, thread_name_prefix="write")

    def finish(pending: Any) -> None:
        for row in pending.result():
            writer.submit(write, row)

    def infer() -> None:
        try:
            got, previous = 0, None
            while got < n:
                batch = _collect(decoded, batch_size, max_wait)
                if not batch:
                    if previous is not None:
                        finish(previous)
                        previous = None
                    continue
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                got += len(batch)
                pending = backbone.submit(backbone.stack(batch))
                if previous is not None:
                    finish(previous)
                previous = pending
            if previous is not None:
                finish(previous)
        except BaseException as exc:
            errors.append(exc)
            finished.set()
            for _ in range(n):
                slots.release()
        # Stay alive until the CPU is read: torch's worker threads go when this thread exits.
        measured.wait()

    threads = [
        threading.Thread(target=feed, name="feed", daemon=True),
        threading.Thread(target=infer, name="infer", daemon=True),
    ]
    on_start()
    for thread in threads:
        thread.start()
    finished.wait()
    # Before the inference thread exits, or its torch worker threads would leave the per-thread
    # accounting with it.
    try:
        on_finish()
    finally:
        measured.set()
    for thread in threads:
        thread.join()
    writer.shutdown(wait=True)
    if errors:
        raise errors[0]
    return sum(written)


def measure_compute_path(
    kind: str,
    backbone: Any,
    preparer: Any,
    clock: ModelClock,
    images: ImageSet,
    args: argparse.Namespace,
    batch_size: int,
    workers: int,
    exclude: Sequence[int],
) -> Row:
    from benchmarks.decode_pool import DecodePool

    pool = DecodePool(kind, workers, preparer)
    try:
        pool.warm_up(images.data[0])
        probe = Probe(clock, exclude, children=kind == "processes")
        stopped: list[tuple[float, CpuReport]] = []
        size = run_compute_path(
            backbone,
            pool,
            images.data,
            batch_size=batch_size,
            max_wait=args.max_wait_ms / 1000,
            write_threads=4,
            on_start=probe.start,
            on_finish=lambda: stopped.append(probe.stop()),
        )
        seconds, report = stopped[0]
    finally:
        pool.shutdown()
    extra = {"decode_pool": kind, "decode_workers": workers, "npy_bytes": size}
    return Row(f"compute-{kind}", len(images.data), seconds, report, probe.sampler.peak, extra)


def measure_decode_only(
    preparer: Any, images: ImageSet, workers: int, kinds: Sequence[str]
) -> dict[str, Any]:
    """Decode alone: ms per image by size on one thread, and images/s of each pool."""
    out: dict[str, Any] = {"ms_per_image_one_thread": {}, "pools": []}
    for size in sorted(set(images.sizes)):
        sample = next(d for d, s in zip(images.data, images.sizes, strict=True) if s == size)
        preparer(sample)
        repeats = 20 if size == SMALL else 5
        started = time.perf_counter()
        for _ in range(repeats):
            preparer(sample)
        out["ms_per_image_one_thread"][f"{size[0]}x{size[1]}"] = round(
            1000 * (time.perf_counter() - started) / repeats, 2
        )
    from benchmarks.decode_pool import DecodePool

    for kind, count in (("threads", 1), *((k, workers) for k in kinds)):
        pool = DecodePool(kind, count, preparer)
        try:
            pool.warm_up(images.data[0])
            meter = CpuMeter(ModelClock())
            meter.start()
            started = time.perf_counter()
            for future in [pool.submit(d) for d in images.data]:
                future.result()
            seconds = time.perf_counter() - started
            report = meter.stop()
        finally:
            pool.shutdown()
        out["pools"].append(
            {
                "pool": kind,
                "workers": count,
                "images_per_s": round(len(images.data) / seconds, 1),
                "cpu_ms_per_image": round(1000 * report.total_s / len(images.data), 2),
            }
        )
    return out


# --- against moto ---------------------------------------------------------------------------
def upload(s3: Any, images: ImageSet) -> None:
    """Every image of the set into the image bucket (eight PUTs at a time)."""
    with ThreadPoolExecutor(8) as uploads:
        list(
            uploads.map(
                lambda kv: s3.put_object(Bucket=IMAGE_BUCKET, Key=kv[0], Body=kv[1]),
                zip(images.keys, images.data, strict=True),
            )
        )


def _create_queue(sqs: Any, name: str) -> tuple[str, str]:
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})
    url = sqs.create_queue(
        QueueName=name, Attributes={"VisibilityTimeout": "120", "RedrivePolicy": redrive}
    )["QueueUrl"]
    return url, dlq


def _enqueue(sqs: Any, queue_url: str, keys: Sequence[str]) -> None:
    from bottleneck_contract.messages import ImageRef, encode

    for start in range(0, len(keys), 10):
        entries = [
            {"Id": str(i), "MessageBody": encode(ImageRef(IMAGE_BUCKET, key))}
            for i, key in enumerate(keys[start : start + 10])
        ]
        response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if response.get("Failed"):
            raise RuntimeError(f"enqueue failed: {response['Failed']}")


class RequestCounter:
    """Counts API operations (not HTTP retries) made through some boto3 clients."""

    def __init__(self, *clients: Any) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.on = False
        for client in clients:
            client.meta.events.register("before-call", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.tally(model.name)

    def per_image(self, n: int) -> dict[str, float]:
        return {name: round(count / n, 3) for name, count in sorted(self.counts.items())}

    def tally(self, name: str) -> None:
        if self.on:
            with self._lock:
                self.counts[name] += 1

    def counting(self, runtime: Any) -> Any:
        """``runtime`` with its object client counted too: the hot path's GET, HEAD and PUT go
        through obstore (native code, no botocore events) under ``--s3-client auto``."""
        return dataclasses.replace(runtime, objects=CountedObjects(runtime.objects, self))


class CountedObjects:
    """An object client whose calls are tallied under S3's operation names."""

    def __init__(self, inner: Any, counter: RequestCounter) -> None:
        self.inner = inner
        self.counter = counter
        self.name = inner.name

    def get(self, bucket: str, key: str, *, max_bytes: int, on_size: Any = None) -> Any:
        self.counter.tally("GetObject")
        return self.inner.get(bucket, key, max_bytes=max_bytes, on_size=on_size)

    def head(self, bucket: str, key: str) -> Any:
        self.counter.tally("HeadObject")
        return self.inner.head(bucket, key)

    def put(self, bucket: str, key: str, body: bytes, **options: Any) -> str:
        try:
            return str(self.inner.put(bucket, key, body, **options))
        finally:
            # Counted when it ends, as its image settles right after: counted as it began, the
            # PUTs under way as a window opened were missed while their images were counted
            # (52 PUTs for 60 images in a 60-image window with 16 writes in flight).
            self.counter.tally("PutObject")

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        self.counter.tally("DeleteObject")
        return bool(self.inner.delete(bucket, key, if_match=if_match))

    def copy(self, bucket: str, source_key: str, key: str, **options: Any) -> None:
        self.counter.tally("CopyObject")
        self.inner.copy(bucket, source_key, key, **options)


# The consumer's calls in flight in the rows against moto, unless the command line sets them.
# The consumer's defaults are sized for AWS: tens of milliseconds a call at a GPU's thousands of
# images/s (benchmarks.latency). A moto server answers in a few milliseconds and serves tens of
# images/s here, so one or two calls in flight keep it busy; the defaults would queue some 130
# requests inside it, whose threads then take the two cores from the consumer being measured
# (the feed row read 4.1-4.3 ms of CPU an image so, 3.3-3.9 with these, and half the images/s).
MOTO_CONCURRENCY = {"receivers": 2, "fetch_concurrency": 16, "write_concurrency": 16}


def concurrency_argv(args: argparse.Namespace) -> list[str]:
    """``--receivers``, ``--fetch-concurrency``, ``--write-concurrency`` and
    ``--decode-workers`` for a consumer against moto: as given, else :data:`MOTO_CONCURRENCY`."""
    argv: list[str] = []
    for name in ("receivers", "fetch_concurrency", "write_concurrency", "decode_workers"):
        value = getattr(args, name, None) or MOTO_CONCURRENCY.get(name)
        if value:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def consumer_argv(args: argparse.Namespace, batch_size: int, queue: str, dlq: str) -> list[str]:
    argv = [
        *("--queue-url", queue, "--dead-letter-url", dlq),
        *("--output", f"s3://{FEATURE_BUCKET}/e2e/", "--model", args.model),
        *("--weights", args.weights, "--device", args.device, "--precision", args.precision),
        *("--batch-size", str(batch_size), "--max-wait-ms", str(args.max_wait_ms)),
        *("--decode", args.decode, "--idle-exit", "0", "--metrics", "off"),
        *("--spot-watch", "off", "--seed", str(args.seed), "--log-level", "WARNING"),
    ]
    return argv + concurrency_argv(args)


def measure_end_to_end(
    runtime: Any,
    clock: ModelClock,
    images: ImageSet,
    server: MotoServer,
    sqs: Any,
    exclude: Sequence[int],
    timeout: float,
) -> Row:
    """The real Worker, from its start (messages already queued) to all written and deleted."""
    from consumer.worker import Worker

    n = len(images.keys)
    _enqueue(sqs, runtime.config.queue_url, images.keys)
    counter = RequestCounter(runtime.clients.s3, runtime.clients.sqs)
    runtime = counter.counting(runtime)
    runtime.backbone.warm_up(runtime.config.batch_size)
    worker = Worker(runtime)
    thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
    moto_before = server.cpu_seconds()
    # The main thread only polls for completion below: benchmark overhead, not consumer work.
    probe = Probe(clock, exclude, overhead=("bench-rss", "main"))
    counter.on = True
    probe.start()
    thread.start()
    deadline = time.monotonic() + timeout
    summary: dict[str, Any] = {}
    while time.monotonic() < deadline:
        summary = worker.stats.summary()
        if settled_images(summary) >= n and worker.inflight.empty() and worker.acker.idle():
            break
        time.sleep(0.05)
    else:
        worker.request_stop("benchmark timeout")
        raise RuntimeError(f"end to end: not finished after {timeout:.0f} s: {summary}")
    seconds, report = probe.stop()
    counter.on = False
    moto_cpu = server.cpu_seconds() - moto_before
    worker.request_stop("benchmark done")
    thread.join(timeout=60)
    if summary["images_failed"] or summary["images_written"] != n:
        raise RuntimeError(f"end to end: not every image was written: {summary}")
    early, late = probe.sampler.halves()
    extra = {
        "requests_per_image": counter.per_image(n),
        "moto_cpu_ms_per_image": round(1000 * moto_cpu / n, 2),
        "mean_batch": summary["mean_batch"],
        "peak_rss_first_half_mib": round(early / MB, 1),
        "peak_rss_second_half_mib": round(late / MB, 1),
        "in_flight_limit": runtime.config.in_flight_limit,
    }
    return Row("e2e", n, seconds, report, probe.sampler.peak, extra)


def measure_naive(
    backbone: Any,
    preparer: Any,
    clock: ModelClock,
    images: ImageSet,
    server: MotoServer,
    s3: Any,
    sqs: Any,
    exclude: Sequence[int],
) -> Row:
    """One message at a time: receive 1, GET, decode, batch of 1, PUT, delete; no overlap."""
    from bottleneck_contract.messages import parse_body
    from consumer.features import serialise

    n = len(images.keys)
    queue_url, _ = _create_queue(sqs, "bench-naive")
    _enqueue(sqs, queue_url, images.keys)
    counter = RequestCounter(s3, sqs)
    backbone(backbone.stack([preparer(images.data[0])]))  # warm-up at batch size 1
    moto_before = server.cpu_seconds()
    probe = Probe(clock, exclude)
    counter.on = True
    probe.start()
    done = 0
    while done < n:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1)
        for message in got.get("Messages", []):
            ref = parse_body(message["Body"])[0]
            data = s3.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
            features = backbone(backbone.stack([preparer(data)]))
            s3.put_object(
                Bucket=FEATURE_BUCKET,
                Key=f"naive/{ref.key}.npy",
                Body=serialise(features[0], "float32"),
                ContentType="application/x-npy",
            )
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            done += 1
    seconds, report = probe.stop()
    counter.on = False
    extra = {
        "requests_per_image": counter.per_image(n),
        "moto_cpu_ms_per_image": round(1000 * (server.cpu_seconds() - moto_before) / n, 2),
    }
    return Row("naive", n, seconds, report, probe.sampler.peak, extra)


# --- report ---------------------------------------------------------------------------------
COLUMNS = (
    ("row", 34),
    ("images", 6),
    ("seconds", 7),
    ("images/s", 8),
    ("vs model", 8),
    ("vs naive", 8),
    ("CPU ms/img", 10),
    ("model ms/img", 12),
    ("outside ms/img", 14),
    ("peak RSS MiB", 12),
)


def row_dict(row: Row, model_ips: float | None, naive_ips: float | None) -> dict[str, Any]:
    ips = row.images_per_s
    return {
        "row": row.key,
        "label": LABELS[row.key],
        "images": row.images,
        "seconds": round(row.seconds, 3),
        "images_per_s": round(ips, 2),
        "vs_model_only": round(ips / model_ips, 3) if model_ips else None,
        "vs_naive": round(ips / naive_ips, 3) if naive_ips else None,
        "cpu_ms_per_image": round(row.per_image_ms(row.cpu.total_s), 2),
        "model_cpu_ms_per_image": round(row.per_image_ms(row.cpu.model_s), 2),
        "outside_model_cpu_ms_per_image": round(row.per_image_ms(row.cpu.outside_model_s), 2),
        "cpu_ms_per_image_by_thread": {
            group: round(row.per_image_ms(seconds), 2)
            for group, seconds in sorted(row.cpu.by_group.items())
            if seconds > 0.0005
        },
        "peak_rss_mib": round(row.peak_rss / MB, 1),
        "other_processes_cpu_share": round(row.cpu.foreign_share, 3),
        **row.extra,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    lines = [
        "  ".join(
            f"{name:<{width}}" if i == 0 else f"{name:>{width}}"
            for i, (name, width) in enumerate(COLUMNS)
        )
    ]
    lines.append("  ".join("-" * width for _, width in COLUMNS))
    for row in rows:
        values = (
            row["label"],
            row["images"],
            row["seconds"],
            row["images_per_s"],
            row["vs_model_only"],
            row["vs_naive"],
            row["cpu_ms_per_image"],
            row["model_cpu_ms_per_image"],
            row["outside_model_cpu_ms_per_image"],
            row["peak_rss_mib"],
        )
        lines.append(
            "  ".join(
                f"{cell(v):<{w}}" if i == 0 else f"{cell(v):>{w}}"
                for i, (v, (_, w)) in enumerate(zip(values, COLUMNS, strict=True))
            )
        )
    return "\n".join(lines)


def evaluate_targets(
    rows: dict[str, dict[str, Any]], setup: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issues' targets, each with the value measured here, whether it applies and the issue
    that set it: issue 7's for the main model's rows (when they ran), issue 11's for the feed
    row (when it ran)."""
    targets: list[dict[str, Any]] = []

    def add(
        name: str, row: str, key: str, op: str, threshold: float, applies: bool, issue: int = 7
    ) -> None:
        value = rows.get(row, {}).get(key)
        met = None
        if value is not None:
            met = value >= threshold if op == ">=" else value <= threshold
        targets.append(
            {
                "target": name,
                "issue": issue,
                "value": value,
                "threshold": f"{op} {threshold}",
                "met": met,
                "applies": applies,
            }
        )

    if "feed" in rows:
        for name, key, at_most, applies in feed_targets(rows["feed"]):
            add(name, "feed", key, "<=", at_most, applies, issue=11)
    if "model" not in setup:  # the main model's rows did not run
        return targets
    cpu_fp32 = setup["device"] == "cpu" and setup["precision"] == "fp32"

    resnet = setup["model"].startswith("resnet50") and cpu_fp32
    add("end to end / model only (resnet50 fp32, CPU)", "e2e", "vs_model_only", ">=", 0.85, resnet)
    add("end to end / naive (resnet50 fp32, CPU)", "e2e", "vs_naive", ">=", 1.5, resnet)
    add(
        "compute path / model only (mobilenetv3_large_100, CPU)",
        "compute-threads",
        "vs_model_only",
        ">=",
        0.60,
        setup["model"].startswith("mobilenetv3_large_100") and setup["device"] == "cpu",
    )
    add(
        "compute path / model only (resnet50 bf16, CUDA)",
        "compute-threads",
        "vs_model_only",
        ">=",
        0.80,
        setup["model"].startswith("resnet50")
        and setup["device"].startswith("cuda")
        and setup["precision"] == "bf16",
    )
    add(
        "consumer CPU outside the model, ms per image (3 ms per 500x375 JPEG)",
        "e2e",
        "outside_model_cpu_ms_per_image",
        "<=",
        3.0,
        setup["large_fraction"] == 0,
    )
    return targets


def format_details(result: dict[str, Any]) -> str:
    lines: list[str] = []
    decode = result.get("decode_only")
    if decode:
        per = ", ".join(f"{k} {v} ms" for k, v in decode["ms_per_image_one_thread"].items())
        lines.append(f"decode alone, one thread: {per} per image")
        for pool in decode["pools"]:
            lines.append(
                f"decode alone, {pool['workers']} {pool['pool']}: {pool['images_per_s']} images/s,"
                f" {pool['cpu_ms_per_image']} CPU ms per image"
            )
    for row in result["rows"]:
        if "requests_per_image" in row:
            reqs = ", ".join(f"{k} {v}" for k, v in row["requests_per_image"].items())
            lines.append(f"{row['row']}: requests per image: {reqs}")
            lines.append(f"{row['row']}: moto server CPU {row['moto_cpu_ms_per_image']} ms/image")
        threads = ", ".join(f"{k} {v}" for k, v in row["cpu_ms_per_image_by_thread"].items())
        lines.append(f"{row['row']}: CPU ms/image by thread: {threads}")
        if row["other_processes_cpu_share"] > 0.05:
            lines.append(
                f"{row['row']}: WARNING: other processes on this machine used "
                f"{100 * row['other_processes_cpu_share']:.0f}% of its CPU during this "
                "measurement; its figures are not reliable"
            )
        if "peak_rss_first_half_mib" in row:
            lines.append(
                f"{row['row']}: peak RSS first half {row['peak_rss_first_half_mib']} MiB, "
                f"second half {row['peak_rss_second_half_mib']} MiB (mean batch "
                f"{row['mean_batch']}, in-flight cap {row['in_flight_limit']})"
            )
    if result["targets"]:
        lines.append("targets:")
    for target in result["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[target["met"]]
        scope = "" if target["applies"] else "  [target is for another setup; shown for reference]"
        lines.append(
            f"  {target['target']} (issue {target['issue']}): {target['value']} (target "
            f"{target['threshold']}): {verdict}{scope}"
        )
    for row in result["rows"]:
        if row["row"] == "feed":
            lines.append(format_feed(row))
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------
def platform_setup() -> dict[str, Any]:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run(args: argparse.Namespace, out: Callable[[str], None]) -> dict[str, Any]:
    """Every wanted measurement: the main model's rows, then the feed row."""
    wanted = [row for row in ROWS if row not in args.skip]
    main_rows = [row for row in wanted if row in MAIN_ROWS]
    setup: dict[str, Any] = {}
    rows: dict[str, Row] = {}
    decode_only: dict[str, Any] | None = None
    if main_rows or "decode" not in args.skip:
        setup, rows, decode_only = run_main(args, main_rows, out)
    else:
        setup = platform_setup()
    model_ips = rows["model"].images_per_s if "model" in rows else None
    naive_ips = rows["naive"].images_per_s if "naive" in rows else None
    row_dicts = [row_dict(rows[key], model_ips, naive_ips) for key in ROWS if key in rows]
    if "feed" in wanted:
        out(f"measuring {LABELS['feed']} ...")
        row_dicts.append(measure_feed(args, out))
    by_key = {row["row"]: row for row in row_dicts}
    return {
        "setup": setup,
        "rows": row_dicts,
        "decode_only": decode_only,
        "targets": evaluate_targets(by_key, setup),
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_main(
    args: argparse.Namespace, wanted: list[str], out: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Row], dict[str, Any] | None]:
    """The rows that share ``--model``: model only, end to end, compute path, naive."""
    import boto3
    import torch

    from consumer.config import Config
    from consumer.runtime import build_backbone, build_preparer, build_runtime

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    batch_size = args.batch_size or (64 if device.startswith("cuda") else 16)
    workers = args.decode_workers or max(1, os.cpu_count() or 1)
    if args.decode == "cuda":
        # nvJPEG decodes on the device, not in a pool
        wanted = [row for row in wanted if row != "compute-processes"]
    out(f"generating {args.images} JPEGs ...")
    images = build_image_set(args.images, args.large_fraction, args.seed)
    needs_moto = "e2e" in wanted or "naive" in wanted
    server = MotoServer(args.moto_keep_alive) if needs_moto else None
    exclude = [server.pid] if server is not None else []
    clock = ModelClock()
    rows: dict[str, Row] = {}
    try:
        with contextlib.ExitStack() as stack:
            if server is not None:
                stack.enter_context(fake_aws_environment(server.url))
            s3 = sqs = runtime = None
            queue_url, dlq_url = "http://127.0.0.1:1/000000000000/unused", None
            if server is not None:
                s3, sqs = boto3.client("s3"), boto3.client("sqs")
                s3.create_bucket(Bucket=IMAGE_BUCKET)
                s3.create_bucket(Bucket=FEATURE_BUCKET)
                upload(s3, images)
                queue_url, dlq_url = _create_queue(sqs, "bench-work")
            argv = consumer_argv(args, batch_size, queue_url, dlq_url or queue_url)
            config = Config.from_args(argv, {})
            if server is not None and "e2e" in wanted:
                runtime = build_runtime(config)
                backbone = runtime.backbone
            else:
                backbone, _ = build_backbone(config)
            # The compute rows compare their own decode pools (threads, spawned processes)
            # around the plain Pillow preparer; the consumer's crash-isolated decode processes
            # are measured end to end (the e2e and feed rows).
            preparer = build_preparer(
                dataclasses.replace(config, decode_isolation="threads"), backbone
            )
            clock.attach(backbone)
            setup = {
                "model": args.model,
                "weights": args.weights,
                "device": str(backbone.device),
                "precision": backbone.precision,
                "batch_size": batch_size,
                "decode": args.decode,
                "decode_workers": workers,
                "images": len(images.data),
                "large_fraction": args.large_fraction,
                "image_set": images.describe(),
                "in_flight_limit": config.in_flight_limit,
                "receivers": config.receivers,
                "fetch_concurrency": config.fetch_concurrency,
                "write_concurrency": config.write_concurrency,
                "max_wait_ms": config.max_wait_ms,
                **platform_setup(),
            }
            out(
                f"{args.model} ({args.weights} weights) on {backbone.device}, "
                f"{backbone.precision}, batch {batch_size}, decode {args.decode}, "
                f"{workers} decode workers; {images.describe()}"
            )
            timeout = max(600.0, 50.0 * len(images.data))
            decode_only: dict[str, Any] | None = None
            if "decode" not in args.skip and args.decode != "cuda":
                out("measuring decode alone ...")
                kinds = [k for k in ("threads", "processes") if f"compute-{k}" in wanted]
                decode_only = measure_decode_only(preparer, images, workers, kinds or ["threads"])
            for key in wanted:
                out(f"measuring {LABELS[key]} ...")
                if key == "model":
                    rows[key] = measure_model_only(
                        backbone, clock, len(images.data), batch_size, args.seed, exclude
                    )
                elif key.startswith("compute-"):
                    rows[key] = measure_compute_path(
                        key.removeprefix("compute-"),
                        backbone,
                        preparer,
                        clock,
                        images,
                        args,
                        batch_size,
                        workers,
                        exclude,
                    )
                elif key == "e2e":
                    assert runtime is not None and server is not None
                    rows[key] = measure_end_to_end(
                        runtime, clock, images, server, sqs, exclude, timeout
                    )
                else:
                    assert server is not None
                    rows[key] = measure_naive(
                        backbone, preparer, clock, images, server, s3, sqs, exclude
                    )
    finally:
        if server is not None:
            server.stop()
    return setup, rows, decode_only


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``--json``; 0 unless a measurement failed."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    consumer_log = logging.getLogger("consumer")
    saved_level = consumer_log.level
    consumer_log.setLevel(logging.WARNING)
    try:
        result = run(args, lambda line: print(line, flush=True))
    finally:
        consumer_log.setLevel(saved_level)
    print()
    print(format_table(result["rows"]))
    print()
    print(format_details(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
