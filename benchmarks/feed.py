"""The feed row: can one consumer process feed a GPU?

The consumer end to end, in this process as in production (the real
:class:`consumer.worker.Worker` built by :func:`consumer.runtime.build_runtime`), with a model so
small (timm's ``test_vit``, random weights) that it costs next to nothing: what is left is the
cost of feeding a model. 500x375 JPEGs come through SQS and S3 on a moto server in a child
process. Every message is queued before the worker starts; the window opens once ``warm-up``
images are done (threads, pools, connections and the allocator are warm and the pipeline is
full) and closes ``images`` images later, while ``tail`` more keep the pipeline full to the end.

Over the window it reports, per image:

* images/s (**wall-clock**: on a shared 2-core machine this is mostly the moto server's speed);
* CPU ms outside the model, by stage (**CPU time**, robust to a busy machine): the process and
  its children (decode worker processes, if the consumer has any), less the forward passes and
  the moto server and the samplers (see :mod:`benchmarks.accounting`);
* GIL-held ms of this process, by thread (**wall-clock** sampling, see :mod:`benchmarks.gil`);

* the machine's speed at the time (``machine_reference_ms``): Pillow decoding, resizing (one
  call) and cropping the row's JPEGs in one thread, thread CPU time, measured just before the
  window, with code that is not the consumer's: the same development machine has read 2.0 ms one
  day and 4-5 ms another, and figures from two runs compare only against it;

and what follows from them: images/s one process can reach (``1000 / GIL ms``), images/s the
vCPUs of a GPU instance can feed (``vCPUs * 1000 / CPU ms``), next to what its GPU takes, and
images per dollar at on-demand prices.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.accounting import NATIVE_GROUP, ModelClock
from benchmarks.costs import cost_table, format_costs, unpriced
from benchmarks.gil import GilReport, PySpyGil, RunQueueClock, gil_sampler, on_cpu_seconds
from benchmarks.moto_keepalive import MotoServer
from consumer.sqs_lean import queue_client_name

FEED_MODEL = "test_vit"
FEED_BATCH = 64
# The consumer's --max-wait-ms in the feed row: long enough that every batch closes full. A fed GPU
# (thousands of images/s) fills a batch of 64 in milliseconds, so its batches are always full;
# this machine, held to about 10 images/s by the moto server, would close a batch of about two
# images on the consumer's default 200 ms, and the row would charge every image the per-batch
# costs (the forward's Python, collect, stack) of a batch thirty times smaller than a GPU's.
FEED_MAX_WAIT_MS = 60_000
# The benchmark's own threads: left out of CPU and GIL figures (the main thread only polls).
BENCH_THREADS = ("main", "bench-rss", "bench-gil-probe")


@dataclass(frozen=True)
class Instance:
    """A GPU instance: vCPUs, on-demand price, its GPU's published ResNet-50 throughput."""

    name: str
    vcpus: int
    usd_per_hour: float
    gpu: str
    gpu_images_per_s: float
    gpu_compiled_images_per_s: tuple[float, float]


# ResNet-50 at 224 px, bf16/fp16, published figures (README, "Throughput"); us-east-1 on-demand.
INSTANCES = (
    Instance("g6.xlarge", 4, 0.805, "L4", 2000, (3000, 4000)),
    Instance("g6.2xlarge", 8, 0.98, "L4", 2000, (3000, 4000)),
    Instance("g5.2xlarge", 8, 1.21, "A10G", 2000, (3000, 4000)),
)


def ceilings(gil_ms: float | None, cpu_ms: float) -> dict[str, Any]:
    """Images/s one process (GIL) and each instance's vCPUs (CPU) allow, and images per dollar.

    ``bound`` is the least of the three (one consumer process, the instance's CPU, its GPU
    eager): what one consumer process per instance would do. ``bound_processes`` drops the GIL
    (several processes share the GPU, or decode moves to worker processes).
    """
    process = 1000 / gil_ms if gil_ms else None
    rows = []
    for inst in INSTANCES:
        cpu = inst.vcpus * 1000 / cpu_ms if cpu_ms > 0 else None
        limits = [x for x in (process, cpu, inst.gpu_images_per_s) if x is not None]
        bound = min(limits)
        unbound = min(x for x in (cpu, inst.gpu_images_per_s) if x is not None)
        rows.append(
            {
                "instance": inst.name,
                "vcpus": inst.vcpus,
                "usd_per_hour": inst.usd_per_hour,
                "gpu": inst.gpu,
                "gpu_images_per_s": inst.gpu_images_per_s,
                "gpu_compiled_images_per_s": list(inst.gpu_compiled_images_per_s),
                "cpu_ceiling_images_per_s": round(cpu, 1) if cpu else None,
                "process_ceiling_images_per_s": round(process, 1) if process else None,
                "bound_images_per_s": round(bound, 1),
                "bound_by": _bound_by(bound, process, cpu, inst.gpu_images_per_s),
                "images_per_usd": round(bound * 3600 / inst.usd_per_hour),
                "bound_processes_images_per_s": round(unbound, 1),
                "images_per_usd_processes": round(unbound * 3600 / inst.usd_per_hour),
            }
        )
    return {"process_ceiling_images_per_s": round(process, 1) if process else None, "rows": rows}


def _bound_by(bound: float, process: float | None, cpu: float | None, gpu: float) -> str:
    if process is not None and bound == process:
        return "GIL"
    if cpu is not None and bound == cpu:
        return "CPU"
    return "GPU"


def machine_reference_ms(images: list[bytes], side: int, rounds: int = 3) -> float:
    """Thread CPU ms to decode, resize (one Pillow call, bicubic) and crop one of ``images``: the
    least of ``rounds`` passes, so that a busy moment does not count."""
    import io

    from PIL import Image

    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for data in images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            w, h = image.size
            scale = int(side / 0.875) / min(w, h)
            resized = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            resized.crop((0, 0, side, side)).tobytes()
        best = min(best, (time.thread_time() - started) / len(images))
    return round(1000 * best, 3)


def feed_argv(args: argparse.Namespace, queue: str, dlq: str, output: str) -> list[str]:
    """The consumer's command line for the feed row: its defaults, the tiny model."""
    argv = [
        *("--queue-url", queue, "--dead-letter-url", dlq, "--output", output),
        *("--model", FEED_MODEL, "--weights", "random", "--device", args.device),
        *("--precision", args.precision, "--batch-size", str(args.feed_batch_size)),
        *("--max-wait-ms", str(args.feed_max_wait_ms)),
        *("--decode", args.decode, "--idle-exit", "0", "--metrics", "off"),
        *("--spot-watch", "off", "--seed", str(args.seed), "--log-level", "WARNING"),
    ]
    if args.feed_layout == "shards":
        argv += ["--layout", "shards", "--shard-rows", str(args.feed_shard_rows)]
    from benchmarks.throughput import concurrency_argv

    return argv + concurrency_argv(args)


def lower_priority(pid: int, niceness: int = 19) -> None:
    """Renice every thread of ``pid``: the moto server stands in for AWS, which runs on other
    machines; at normal priority it takes the cores from under the consumer's threads, GIL and
    all, and what is measured is then the scheduler. Threads it starts later inherit this."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


_SETTLED = ("written", "replaced", "sharded", "copied", "source_gone", "skipped", "failed")


def settled_images(summary: dict[str, Any]) -> int:
    """Images with an outcome in a worker's ``stats.summary()``: any layout, failures included."""
    return int(sum(summary[f"images_{outcome}"] for outcome in _SETTLED))


def _per_batch(opened: dict[str, Any], closed: dict[str, Any]) -> float:
    """Mean images per batch computed between two ``stats.summary()`` readings."""
    batches = closed["batches"] - opened["batches"]
    images = closed["images_computed"] - opened["images_computed"]
    return round(images / batches, 1) if batches else 0.0


def _settled(worker: Any) -> int:
    return settled_images(worker.stats.summary())


def _start_gil(method: str, rate: int) -> tuple[Any, str]:
    """The GIL sampler, started; ``auto`` falls back to the probe where py-spy cannot attach."""
    sampler = gil_sampler(method, rate)
    try:
        sampler.start()
    except RuntimeError as exc:
        if method != "auto" or not isinstance(sampler, PySpyGil):
            raise
        probe = gil_sampler("probe")
        probe.start()
        return probe, f"py-spy unavailable ({exc}); probe used"
    return sampler, ""


def measure_feed(args: argparse.Namespace, out: Callable[[str], None]) -> dict[str, Any]:
    """Run the feed row; returns its row (table columns plus the GIL and ceiling figures)."""
    import boto3

    from benchmarks import throughput as tp
    from consumer.config import Config
    from consumer.runtime import build_runtime

    n = args.feed_images
    server = MotoServer(args.moto_keep_alive)
    if args.feed_nice_moto:
        lower_priority(server.pid)
    try:
        with tp.fake_aws_environment(server.url):
            s3, sqs = boto3.client("s3"), boto3.client("sqs")
            s3.create_bucket(Bucket=tp.IMAGE_BUCKET)
            s3.create_bucket(Bucket=tp.FEATURE_BUCKET)
            queue_url, dlq_url = tp._create_queue(sqs, "bench-feed")
            config = Config.from_args(
                feed_argv(args, queue_url, dlq_url, f"s3://{tp.FEATURE_BUCKET}/feed/"), {}
            )
            warm = args.feed_warmup if args.feed_warmup is not None else config.in_flight_limit
            total = warm + n + config.in_flight_limit
            out(f"feed: uploading {total} JPEGs (500x375) ...")
            images = tp.build_image_set(total, 0.0, args.seed)
            tp.upload(s3, images)
            runtime = build_runtime(config)
            runtime.backbone.warm_up(config.batch_size)
            reference = machine_reference_ms(images.data[:48], runtime.backbone.spec.height)
            clock = ModelClock()
            clock.attach(runtime.backbone)
            tp._enqueue(sqs, queue_url, images.keys)
            result = _run_window(runtime, clock, server, n, warm, total, args, out)
            result["machine_reference_ms"] = reference
            return result
    finally:
        server.stop()


def _run_window(
    runtime: Any,
    clock: ModelClock,
    server: Any,
    n: int,
    warm: int,
    total: int,
    args: argparse.Namespace,
    out: Callable[[str], None],
) -> dict[str, Any]:
    from benchmarks import throughput as tp
    from consumer.runtime import resolve_decode
    from consumer.worker import Worker

    counter = tp.RequestCounter(runtime.clients.s3, runtime.clients.sqs)
    runtime = counter.counting(runtime)  # a few µs per image: one Python call per S3 request
    worker = Worker(runtime)
    thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
    timeout = max(300.0, 2.0 * total)
    deadline = time.monotonic() + timeout

    def wait_for(count: int, what: str) -> int:
        while time.monotonic() < deadline:
            settled = _settled(worker)
            if settled >= count:
                return settled
            if worker.stats.summary()["images_failed"]:
                raise RuntimeError(f"feed: images failed: {worker.stats.summary()}")
            time.sleep(0.02)
        raise RuntimeError(f"feed: {what} not reached in {timeout:.0f} s: {worker.stats.summary()}")

    thread.start()
    try:
        out(f"feed: warming up on {warm} images ...")
        wait_for(warm, "warm-up")
        gil, gil_note = _start_gil(args.gil_method, args.gil_rate)
        exclude = [server.pid, *([gil.pid] if gil.pid else [])]
        probe = tp.Probe(clock, exclude, children=True, overhead=BENCH_THREADS)
        # psutil's walk over every process for the children's memory is not cheap on 2 cores.
        probe.sampler.interval = 0.5
        run_queue = RunQueueClock()
        moto_before = server.cpu_seconds()
        run_queue.start()
        probe.start()
        # Requests are counted between the two snapshots of settled images and nowhere else: a
        # PUT is counted as it ends and its image settles right after, so PUTs per image is 1
        # whatever the window's size (the samplers' start and stop take tenths of a second).
        counter.on = True
        opened = worker.stats.summary()
        first = settled_images(opened)
        out(f"feed: measuring {n} images ...")
        wait_for(first + n, "the window's end")
        closed = worker.stats.summary()
        counter.on = False
        last = settled_images(closed)
        seconds, report = probe.stop()
        ran_share = run_queue.stop()
        gil_report: GilReport = gil.stop()
        moto_cpu = server.cpu_seconds() - moto_before
    finally:
        worker.request_stop("benchmark done")
        thread.join(timeout=60)
    images = last - first
    row = tp.Row("feed", images, seconds, report, probe.sampler.peak)
    result = tp.row_dict(row, None, None)
    by_thread = dict(result["cpu_ms_per_image_by_thread"])
    # The inference thread also launches the forward passes: what it spends outside them is the
    # batching (collect, stack, hand-off), the model's own share is in the model column.
    forward_s = report.model_s - report.by_group.get(NATIVE_GROUP, 0.0)
    infer_outside = report.by_group.get("infer", 0.0) - forward_s
    for group in ("infer", NATIVE_GROUP, *BENCH_THREADS):
        by_thread.pop(group, None)
    by_thread["infer (outside the forward)"] = round(row.per_image_ms(max(0.0, infer_outside)), 2)
    gil_groups = {
        group: round(1000 * s / images, 3)
        for group, s in sorted(gil_report.by_group.items())
        if group not in BENCH_THREADS and s > 0
    }
    gil_ms = round(1000 * gil_report.held_s(set(BENCH_THREADS)) / images, 3)
    on_cpu = on_cpu_seconds(
        gil_report.by_group,
        ran_share,
        {**report.by_group, "total": report.total_s},
    )
    gil_cpu_ms = round(
        1000 * sum(s for g, s in on_cpu.items() if g not in BENCH_THREADS) / images, 3
    )
    cpu_ms = result["outside_model_cpu_ms_per_image"]
    decode_ms = decode_cpu_ms(by_thread)
    result.update(
        {
            "model": FEED_MODEL,
            "device": str(runtime.backbone.device),
            "precision": runtime.backbone.precision,
            "batch_size": runtime.config.batch_size,
            "max_wait_ms": runtime.config.max_wait_ms,
            "images_per_batch": _per_batch(opened, closed),
            # What became of the window's images: redeliveries show up as skipped.
            "outcomes_in_window": {
                key: closed[key] - opened[key]
                for key in (f"images_{outcome}" for outcome in _SETTLED)
                if closed[key] != opened[key]
            },
            "messages_in_window": closed["messages"] - opened["messages"],
            "decode": resolve_decode(runtime.config.decode, runtime.backbone.device),
            "layout": runtime.config.layout,
            "s3_client": runtime.objects.name,
            "sqs_client": queue_client_name(runtime.work_queue.sqs),
            "warm_up_images": warm,
            "outside_model_cpu_ms_per_image_by_stage": dict(sorted(by_thread.items())),
            "decode_cpu_ms_per_image": decode_ms,
            "outside_model_not_decode_cpu_ms_per_image": round(max(0.0, cpu_ms - decode_ms), 2),
            "gil_ms_per_image": gil_ms,
            "gil_ms_per_image_by_thread": gil_groups,
            "gil_on_cpu_ms_per_image": gil_cpu_ms,
            "ran_share_by_thread": {g: round(v, 3) for g, v in sorted(ran_share.items())},
            "gil_method": gil_report.method,
            "gil_samples": gil_report.samples,
            "gil_note": "; ".join(x for x in (gil_note, gil_report.note) if x),
            "requests_per_image": counter.per_image(images),
            "moto_cpu_ms_per_image": round(1000 * moto_cpu / images, 2),
            # The machine's speed in the window: the moto server does the same work per image,
            # so its CPU per image moves with the machine (25 to 33 ms on one day, same code),
            # and this ratio compares runs where the reference, taken before, does not.
            "outside_model_cpu_per_moto_cpu": relative_cpu(cpu_ms, 1000 * moto_cpu / images),
            "ceilings": ceilings(gil_cpu_ms, cpu_ms),
            "unpriced_requests": unpriced(counter.per_image(images)),
            "wall_clock": ["seconds", "images_per_s", "gil_ms_per_image"],
        }
    )
    result["costs_per_million_images"] = cost_table(
        result["requests_per_image"], result["ceilings"]["rows"]
    )
    return result


# Where the consumer decodes on the host: its decode processes (the default) or, with
# --decode-isolation threads, its decode threads (and with --decode cuda, the threads that take
# the JPEGs the device refuses and the other formats).
DECODE_STAGES = ("child-processes", "decode", "host-decode")
# The host decodes: the exact path and its DCT-scaled draft.
HOST_DECODES = ("pil", "pil-draft")


def decode_cpu_ms(by_stage: dict[str, float]) -> float:
    """The decode's share of the CPU per image outside the model (its processes or threads)."""
    return round(sum(by_stage.get(stage, 0.0) for stage in DECODE_STAGES), 2)


def feed_targets(row: dict[str, Any]) -> list[tuple[str, str, float, bool]]:
    """Issue 11's targets for the feed row: (what, the row's key, at most, whether it applies).

    The CPU target is for the exact CPU decode (``pil``; ``pil-draft`` decodes less); the one
    for everything but decode, for either host decode (with ``cuda`` the GPU decodes and the
    inference thread parses the headers). The GIL target is for py-spy's count (the probe reads
    1.5 to 1.9 times higher, README, "The feed row").
    """
    host_decode = row.get("decode") in HOST_DECODES
    return [
        (
            "feed: GIL held by the model's process, ms per image (py-spy, wall-clock)",
            "gil_ms_per_image",
            0.5,
            row.get("gil_method") == "py-spy",
        ),
        (
            "feed: CPU outside the model, ms per 500x375 JPEG (CPU decode)",
            "outside_model_cpu_ms_per_image",
            3.0,
            row.get("decode") == "pil",
        ),
        (
            "feed: CPU outside the model and the decode, ms per image",
            "outside_model_not_decode_cpu_ms_per_image",
            1.0,
            host_decode,
        ),
    ]


def relative_cpu(cpu_ms: float, moto_ms: float) -> float | None:
    """The consumer's CPU outside the model per image over the moto server's, or None."""
    return round(cpu_ms / moto_ms, 4) if moto_ms > 0 else None


def sampling_error(row: dict[str, Any]) -> str:
    """py-spy's GIL figure counts samples: with n of them, one standard error is 1/sqrt(n) of
    the figure from sampling alone (a 10 s window at 100 Hz holds only tens; ``--gil-rate`` or
    ``--feed-images`` buys more). Empty for the probe, whose error is of another kind."""
    samples = row.get("gil_samples") or 0
    if row.get("gil_method") != "py-spy" or samples <= 0:
        return ""
    return f"; {samples} samples, +-{100 / math.sqrt(samples):.0f} % from sampling alone"


def format_feed(row: dict[str, Any]) -> str:
    """The feed row's details and its ceiling table, as printed by ``make bench``."""
    by_stage = row["outside_model_cpu_ms_per_image_by_stage"]
    stages = ", ".join(f"{k} {v}" for k, v in by_stage.items())
    gil = ", ".join(f"{k} {v}" for k, v in row["gil_ms_per_image_by_thread"].items())
    lines = [
        f"feed: {row['model']} on {row['device']} ({row['precision']}, batch {row['batch_size']}"
        f" (mean {row['images_per_batch']}, --max-wait-ms {row['max_wait_ms']}),"
        f" decode {row['decode']}, layout {row['layout']}, S3 client"
        f" {row['s3_client']}, SQS client {row['sqs_client']}),"
        f" {row['images']} 500x375 JPEGs"
        f" after {row['warm_up_images']} warm-up, SQS+S3 on moto",
        f"feed: {row['images_per_s']} images/s (wall-clock); CPU outside the model "
        f"{row['outside_model_cpu_ms_per_image']} ms/image (CPU time): {stages}",
        f"feed: GIL held {row['gil_ms_per_image']} ms/image by this process ({row['gil_method']},"
        f" wall-clock{sampling_error(row)}){': ' + gil if gil else ''}",
        f"feed: GIL held while running on a CPU {row['gil_on_cpu_ms_per_image']} ms/image "
        "(less the time its holders waited for a CPU, from schedstat)",
    ]
    if row["decode"] in HOST_DECODES:  # with cuda the decode is the GPU's and the infer thread's
        lines.insert(
            2,
            f"feed: of which decode {row['decode_cpu_ms_per_image']} ms/image, everything else "
            f"{row['outside_model_not_decode_cpu_ms_per_image']}",
        )
    lines.append(
        f"feed: this machine now: {row['machine_reference_ms']} ms to decode, resize and crop"
        " one of these JPEGs in one thread (Pillow, not the consumer's code): compare runs"
        " against it"
    )
    if row["gil_note"]:
        lines.append(f"feed: GIL note: {row['gil_note']}")
    reqs = ", ".join(f"{k} {v}" for k, v in row["requests_per_image"].items())
    moto = row["moto_cpu_ms_per_image"]
    lines.append(f"feed: requests per image: {reqs}; moto server CPU {moto} ms/image")
    if row.get("outside_model_cpu_per_moto_cpu") is not None:
        lines.append(
            "feed: CPU outside the model over the moto server's CPU, per image: "
            f"{row['outside_model_cpu_per_moto_cpu']} (the moto server's work per image is"
            " fixed, so this compares runs on a machine whose speed drifts)"
        )
    ceiling = row["ceilings"]
    lines.append(
        f"feed: one process's ceiling (1000 / GIL ms on a CPU): "
        f"{ceiling['process_ceiling_images_per_s'] or '-'} images/s"
    )
    header = (
        f"{'instance':<11} {'vCPU':>4} {'$/h':>6} {'GPU':>5} {'GPU img/s':>10} "
        f"{'CPU ceiling':>11} {'1 process':>9} {'bound':>7} {'by':>4} {'images/$':>9} "
        f"{'img/$ no GIL':>12}"
    )
    lines += [header, "-" * len(header)]
    for r in ceiling["rows"]:
        lines.append(
            f"{r['instance']:<11} {r['vcpus']:>4} {r['usd_per_hour']:>6.3f} {r['gpu']:>5} "
            f"{r['gpu_images_per_s']:>10.0f} {r['cpu_ceiling_images_per_s'] or '-':>11} "
            f"{r['process_ceiling_images_per_s'] or '-':>9} {r['bound_images_per_s']:>7} "
            f"{r['bound_by']:>4} {r['images_per_usd']:>9} {r['images_per_usd_processes']:>12}"
        )
    lines.append(format_costs(row["costs_per_million_images"]))
    if row.get("unpriced_requests"):
        lines.append(f"(not priced: {', '.join(row['unpriced_requests'])})")
    return "\n".join(lines)


def add_feed_arguments(parser: argparse.ArgumentParser) -> None:
    """The feed row's options (shared by ``benchmarks.throughput`` and ``benchmarks.gpu``)."""
    parser.add_argument(
        "--feed-images", type=int, default=1500, help="feed row: images in the window (1500)"
    )
    parser.add_argument(
        "--feed-warmup",
        type=int,
        default=None,
        help="feed row: images done before the window opens (default: the in-flight cap)",
    )
    parser.add_argument("--feed-batch-size", type=int, default=FEED_BATCH)
    parser.add_argument(
        "--feed-max-wait-ms",
        type=int,
        default=FEED_MAX_WAIT_MS,
        help="feed row: the consumer's --max-wait-ms (default %(default)s: batches close full, "
        "as a fed GPU's do; the consumer's own default, 200, closes batches of about two "
        "images at this machine's rate)",
    )
    parser.add_argument(
        "--gil-method",
        default="auto",
        choices=("auto", "py-spy", "probe"),
        help="how the feed row measures the GIL (auto: py-spy when it can attach, else probe)",
    )
    parser.add_argument("--gil-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--feed-layout",
        choices=("files", "shards"),
        default="files",
        help="feed row: the consumer's --layout (default files, one PUT per image)",
    )
    parser.add_argument(
        "--feed-shard-rows",
        type=int,
        default=100,
        help="feed row with --feed-layout shards: rows per shard (default 100, so that shards "
        "are written inside the window; production's default is 10000)",
    )
    parser.add_argument(
        "--moto-keep-alive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve moto over kept-alive connections, as AWS's endpoints are (default on): "
        "moto's own server closes every connection, and every request would also connect",
    )
    parser.add_argument(
        "--feed-nice-moto",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="feed row: run the moto server at the lowest CPU priority (default on)",
    )
