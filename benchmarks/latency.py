"""The latency row: the consumer against AWS and a GPU that take their real time per call.

moto answers a call in a millisecond or two and, on this machine, serves about 30 images a
second, so the feed row cannot show what caps a consumer against real AWS: its concurrency. There,
each S3 and SQS call takes tens of milliseconds (AWS's guidance for small objects: "median
latencies ... in the range of tens of milliseconds"), and a stage that has C calls in flight
moves at most C / latency items a second, whatever the CPU (Little's law).

``python -m benchmarks.latency`` runs the real :class:`consumer.worker.Worker` (receivers, fetch
pool, decode processes, inference thread, writers, acker, heartbeat), built by
:func:`consumer.runtime.build_runtime` from the consumer's own options, against in-memory
stand-ins that take ``--latency-ms`` per call (a sleep: the GIL released, as in a socket read)
and a stand-in GPU that computes one batch at a time at ``--gpu-ms-per-image`` while the host
goes on (the model is built, its forward pass is not run). It reports images/s beside each
stage's ceiling for the settings used (calls in flight x items per call / latency), and the
consumer's CPU per image. ``--ack-calls`` sets the acker's concurrent calls (the worker's
:data:`~consumer.stages.ack.ACK_CALLS`), for comparing with the single-call acker of before.
The CPU is every thread's and decode process's but the benchmark's main thread's
(:class:`benchmarks.accounting.CpuMeter`).

Small JPEGs by default (``--image-size``): decoding is the CPU's share, measured by the feed row;
here it would only hide the ceilings behind this two-core machine's CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.accounting import CpuMeter, ModelClock
from bottleneck_contract.messages import ImageRef, encode
from consumer.objects import ConditionFailed, Existing, Fetched, SizeCallback
from consumer.sqs import BATCH

IMAGE_BUCKET = "images"
FEATURE_BUCKET = "features"
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/latency-work"
DEAD_LETTER_URL = QUEUE_URL + "-dead"


class SlowObjects:
    """:class:`~consumer.objects.ObjectClient` in memory, ``latency`` seconds per call."""

    name = "in-memory"

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.objects: dict[tuple[str, str], tuple[bytes, str, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()

    def add(self, bucket: str, key: str, body: bytes, metadata: Mapping[str, str]) -> str:
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
        with self._lock:
            self.objects[(bucket, key)] = (body, etag, dict(metadata))
        return etag

    def _call(self, name: str) -> None:
        time.sleep(self.latency)
        with self._lock:
            self.calls[name] += 1

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        self._call("GetObject")
        body, etag, _ = self.objects[(bucket, key)]
        if on_size is not None:
            on_size(len(body))
        return Fetched(body, etag)

    def head(self, bucket: str, key: str) -> Existing | None:
        self._call("HeadObject")
        found = self.objects.get((bucket, key))
        return None if found is None else Existing(found[1], found[2])

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str,
        if_match: str | None = None,
    ) -> str:
        self._call("PutObject")
        with self._lock:
            found = self.objects.get((bucket, key))
            if (if_match is None) != (found is None) or (found and found[1] != if_match):
                raise ConditionFailed(f"s3://{bucket}/{key}")
        return self.add(bucket, key, body, metadata)

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        self._call("DeleteObject")
        with self._lock:
            return self.objects.pop((bucket, key), None) is not None

    def copy(
        self,
        bucket: str,
        source_key: str,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str,
    ) -> None:
        self._call("CopyObject")
        self.add(bucket, key, self.objects[(bucket, source_key)][0], metadata)


class SlowSqs:
    """The SQS calls the worker makes, boto3-shaped, in memory, ``latency`` seconds per call.

    Messages are delivered once (none is released or times out in this row); a receive on an
    empty queue waits up to its ``WaitTimeSeconds``, as a long poll does, or until
    :meth:`close`. Every receive on a non-empty queue returns up to 10 at the same latency: SQS
    may return fewer, and has a tail, so the row's receive ceiling is a best case.
    """

    def __init__(self, latency: float, bodies: list[str]) -> None:
        self.latency = latency
        self.ready = collections.deque(bodies)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.deleted = 0
        self.closed = threading.Event()

    def close(self) -> None:
        """End the long polls under way (the worker's stop waits for its receivers)."""
        self.closed.set()

    def _call(self, name: str) -> None:
        time.sleep(self.latency)
        with self._lock:
            self.calls[name] += 1

    def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"RedrivePolicy": json.dumps({"maxReceiveCount": 5})}}

    def receive_message(
        self,
        *,
        MaxNumberOfMessages: int,  # noqa: N803 (boto3's names)
        WaitTimeSeconds: int,  # noqa: N803
        **_: Any,
    ) -> dict[str, Any]:
        self._call("ReceiveMessage")
        deadline = time.monotonic() + WaitTimeSeconds
        while True:
            with self._lock:
                taken = [
                    self.ready.popleft() for _ in range(min(MaxNumberOfMessages, len(self.ready)))
                ]
            if taken or time.monotonic() >= deadline:
                break
            if self.closed.wait(0.05):  # one call: the poll waits on SQS's side
                break
        messages = []
        for body in taken:
            ident = f"m{next(self._ids)}"
            messages.append(
                {
                    "MessageId": ident,
                    "ReceiptHandle": f"handle-{ident}",
                    "Body": body,
                    "Attributes": {"ApproximateReceiveCount": "1"},
                }
            )
        return {"Messages": messages}

    def _batch(self, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        self._call(name)
        return {"Successful": [{"Id": e["Id"]} for e in entries], "Failed": []}

    def delete_message_batch(self, *, Entries: list[dict[str, Any]], **_: Any) -> Any:  # noqa: N803
        with self._lock:
            self.deleted += len(Entries)
        return self._batch("DeleteMessageBatch", Entries)

    def change_message_visibility_batch(self, *, Entries: list[dict[str, Any]], **_: Any) -> Any:  # noqa: N803
        return self._batch("ChangeMessageVisibilityBatch", Entries)

    def send_message_batch(self, *, Entries: list[dict[str, Any]], **_: Any) -> Any:  # noqa: N803
        return self._batch("SendMessageBatch", Entries)


class StandInGpu:
    """Replaces a backbone's forward pass: one batch at a time, ``seconds_per_image`` each,
    computed while the host goes on; ``result()`` waits until the batch is done."""

    def __init__(self, seconds_per_image: float, feature_shape: tuple[int, ...]) -> None:
        self.seconds_per_image = seconds_per_image
        self.feature_shape = feature_shape
        self.free_at = 0.0
        self.busy = 0.0

    def submit(self, batch: Any) -> _Pending:
        n = len(batch)
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + n * self.seconds_per_image
        self.busy += n * self.seconds_per_image
        return _Pending(self.free_at, np.zeros((n, *self.feature_shape), dtype=np.float32))


class _Pending:
    def __init__(self, done_at: float, features: np.ndarray) -> None:
        self.done_at = done_at
        self.features = features

    def result(self) -> np.ndarray:
        time.sleep(max(0.0, self.done_at - time.monotonic()))
        return self.features


def consumer_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        *("--queue-url", QUEUE_URL, "--dead-letter-url", DEAD_LETTER_URL),
        *("--output", f"s3://{FEATURE_BUCKET}/latency/"),
        *("--model", "test_vit", "--weights", "random", "--device", "cpu"),
        *("--batch-size", str(args.batch_size), "--max-wait-ms", "200"),
        *("--idle-exit", "0", "--metrics", "off", "--spot-watch", "off"),
        *("--log-level", "WARNING"),
    ]
    for name in ("receivers", "fetch_concurrency", "write_concurrency", "max_in_flight"):
        value = getattr(args, name)
        if value:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def ceilings(config: Any, latency: float, ack_calls: int, gpu_s: float) -> dict[str, float]:
    """Images/s each stage allows at ``latency`` per call (one image per message)."""
    return {
        "receive": config.receivers * BATCH / latency,
        "fetch": config.fetch_concurrency / latency,
        "write": config.write_concurrency / latency,
        "ack": ack_calls * BATCH / latency,
        "gpu": 1.0 / gpu_s if gpu_s else float("inf"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the worker against the stand-ins, time ``args.images`` images after a warm-up."""
    from benchmarks.throughput import build_image_set
    from consumer.aws import Clients
    from consumer.config import Config
    from consumer.runtime import build_runtime
    from consumer.worker import Worker

    latency = args.latency_ms / 1000
    gpu_s = args.gpu_ms_per_image / 1000
    width, height = (int(v) for v in args.image_size.split("x"))
    total = args.warmup + args.images
    images = build_image_set(min(total, 48), 0.0, args.seed)
    objects = SlowObjects(latency)
    keys = [f"img/{i:07d}.jpg" for i in range(total)]
    bodies = [_jpeg(images.data[i % len(images.data)], width, height) for i in range(48)]
    for i, key in enumerate(keys):
        objects.add(IMAGE_BUCKET, key, bodies[i % len(bodies)], {})
    sqs = SlowSqs(latency, [encode(ImageRef(IMAGE_BUCKET, key)) for key in keys])
    config = Config.from_args(consumer_argv(args), {})
    runtime = build_runtime(config, clients=Clients(s3=None, sqs=sqs), objects=objects)
    gpu = StandInGpu(gpu_s, runtime.feature_shape)
    runtime.backbone.submit = gpu.submit  # type: ignore[method-assign,assignment]
    worker = Worker(runtime)
    worker.acker.concurrency = args.ack_calls  # its helpers are started by run()
    thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
    # Every thread and decode process but this one, which only polls.
    meter = CpuMeter(ModelClock(), overhead_groups=("main",))
    thread.start()
    try:
        _wait(lambda: sqs.deleted >= args.warmup, 300)
        first, began = sqs.deleted, time.monotonic()
        meter.start()
        gpu_before = gpu.busy
        _wait(lambda: sqs.deleted >= total, 600)
        seconds = time.monotonic() - began
        cpu = meter.stop().total_s
        done = sqs.deleted - first
        gpu_busy = gpu.busy - gpu_before
    finally:
        sqs.close()
        worker.request_stop("benchmark done")
        thread.join(timeout=60)
    limits = ceilings(runtime.config, latency, args.ack_calls, gpu_s)
    return {
        "latency_ms": args.latency_ms,
        "gpu_ms_per_image": args.gpu_ms_per_image,
        "image_size": args.image_size,
        "batch_size": runtime.config.batch_size,
        "receivers": runtime.config.receivers,
        "fetch_concurrency": runtime.config.fetch_concurrency,
        "write_concurrency": runtime.config.write_concurrency,
        "ack_calls": args.ack_calls,
        "in_flight_limit": runtime.config.in_flight_limit,
        "images": done,
        "seconds": round(seconds, 2),
        "images_per_s": round(done / seconds, 1),
        "gpu_busy_share": round(gpu_busy / seconds, 3),
        "cpu_ms_per_image": round(1000 * cpu / done, 3),
        "ceilings_images_per_s": {k: round(v, 1) for k, v in limits.items()},
        "calls_per_image": {
            name: round(n / total, 3) for name, n in sorted((sqs.calls + objects.calls).items())
        },
    }


def _jpeg(data: bytes, width: int, height: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height))
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _wait(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("latency row: the images were not done in time")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per S3/SQS call (20)")
    parser.add_argument(
        "--gpu-ms-per-image",
        type=float,
        default=0.5,
        help="the stand-in GPU's time per image (0.5: an L4's 2,000 ResNet-50 images/s)",
    )
    parser.add_argument("--images", type=int, default=4000, help="images timed (4000)")
    parser.add_argument("--warmup", type=int, default=600, help="images before timing (600)")
    parser.add_argument("--image-size", default="160x120", help="JPEG size (160x120)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--receivers", type=int, default=0, help="(default: the consumer's)")
    parser.add_argument("--fetch-concurrency", type=int, default=0)
    parser.add_argument("--write-concurrency", type=int, default=0)
    parser.add_argument("--max-in-flight", type=int, default=0)
    parser.add_argument("--ack-calls", type=int, default=None, help="(default: the worker's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.ack_calls is None:
        from consumer.stages.ack import ACK_CALLS

        args.ack_calls = ACK_CALLS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    row = run(args)
    print(format_row(row))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(row, out, indent=2)
    return 0


def format_row(row: dict[str, Any]) -> str:
    limits = row["ceilings_images_per_s"]
    bound = min(limits, key=lambda stage: limits[stage])
    return "\n".join(
        [
            f"latency: {row['latency_ms']} ms per S3/SQS call, stand-in GPU "
            f"{row['gpu_ms_per_image']} ms/image, {row['image_size']} JPEGs, batch "
            f"{row['batch_size']}; receivers {row['receivers']}, fetch "
            f"{row['fetch_concurrency']}, write {row['write_concurrency']}, ack calls "
            f"{row['ack_calls']}, in flight {row['in_flight_limit']}",
            f"latency: {row['images_per_s']} images/s over {row['images']} images "
            f"({row['seconds']} s); the GPU busy {100 * row['gpu_busy_share']:.0f} % of the time; "
            f"CPU {row['cpu_ms_per_image']} ms/image (every thread and decode process)",
            "latency: ceilings, images/s: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in limits.items())
            + f" (lowest: {bound})",
            "latency: calls per image: "
            + ", ".join(f"{k} {v}" for k, v in row["calls_per_image"].items()),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
