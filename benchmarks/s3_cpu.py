"""CPU and GIL per S3 call: the consumer's boto3 client against its native (obstore) client.

``python -m benchmarks.s3_cpu`` starts a moto server (kept-alive connections, as AWS keeps them:
:mod:`benchmarks.moto_keepalive`) in a separate process (its CPU is not
counted), then for each client and each of the hot path's calls (GET of a 100 KB image into
memory, the create-only PUT of an 8 KB feature file with the contract's metadata, the HEAD that
returns it) makes ``--warmup`` calls, then ``--calls`` measured ones, one at a time:

* **CPU ms per call**: this process's CPU time (``time.process_time``: every thread, obstore's
  Rust runtime threads included) over the measured calls, divided by their number;
* **GIL ms per call**: the calls are made again under py-spy (``--gil``: it samples only the
  thread holding the GIL), as :mod:`benchmarks.gil` measures the consumer: the calling thread's
  GIL-held samples over the pass, corrected for the time it held the GIL while preempted (its
  share of runnable time it actually ran, from the kernel's run-queue clocks), never more than
  the CPU the thread used. Without py-spy, no GIL figure.

The calls go through :class:`consumer.objects.boto.BotoObjects` and
:class:`consumer.objects.native.NativeObjects` exactly as the consumer makes them, retries layer
and all. Each figure is the lowest of ``--repeat`` rounds. Prints one table and, with
``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import boto3

from benchmarks.gil import PySpyGil, RunQueueClock, on_cpu_seconds, py_spy_path
from benchmarks.moto_keepalive import MotoServer
from consumer.objects import ObjectClient
from consumer.objects.boto import BotoObjects
from consumer.objects.native import NativeObjects

BUCKET = "bench"
META = {
    "source-bucket": "images",
    "source-key": "photos/cat%201.jpg",
    "source-etag": "9b2cf535f27731c974343645a3985328",
    "model": "resnet50.a1_in1k",
    "weights": "pretrained",
    "pool": "avg",
    "shape": "2048",
    "dtype": "float32",
    "fingerprint": "3f9a1c07d2e4b815",
}


def measure(call: Callable[[int], object], calls: int, warmup: int) -> dict[str, Any]:
    """CPU and GIL milliseconds per call of ``call(i)``, made from this (the main) thread."""
    for i in range(warmup):
        call(i)
    began_cpu, began = time.process_time(), time.perf_counter()
    for i in range(warmup, warmup + calls):
        call(i)
    cpu = time.process_time() - began_cpu
    wall = time.perf_counter() - began
    numbers = {"cpu_ms": round(1000 * cpu / calls, 3), "wall_ms": round(1000 * wall / calls, 3)}
    py_spy = py_spy_path()
    if py_spy is None:
        return numbers
    sampler, clock = PySpyGil(py_spy, rate=250), RunQueueClock()
    sampler.start()
    clock.start()
    thread_cpu = time.thread_time()
    for i in range(warmup + calls, warmup + 2 * calls):
        call(i)
    thread_cpu = time.thread_time() - thread_cpu
    ran_share = clock.stop()
    report = sampler.stop()
    held = on_cpu_seconds(report.by_group, ran_share, {"main": thread_cpu}).get("main", 0.0)
    numbers["gil_ms"] = round(1000 * held / calls, 3)
    numbers["gil_ms_sampled"] = round(1000 * report.by_group.get("main", 0.0) / calls, 3)
    numbers["calling_thread_cpu_ms"] = round(1000 * thread_cpu / calls, 3)
    return numbers


def operations(objects: ObjectClient, name: str, image: bytes, feature: bytes) -> dict[str, Any]:
    """The three calls; every PUT creates a new key (create-only, as the consumer writes)."""
    serial = itertools.count()
    return {
        "GET 100 KB": lambda i: objects.get(BUCKET, "photos/cat.jpg", max_bytes=len(image)),
        "conditional PUT 8 KB": lambda i: objects.put(
            BUCKET,
            f"v1/{name}/{next(serial)}.npy",
            feature,
            metadata=META,
            content_type="application/x-npy",
        ),
        "HEAD": lambda i: objects.head(BUCKET, "v1/feature.npy"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3_cpu", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="measured calls (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="calls before (default 50)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measure each figure this many times and keep the lowest (a shared machine's "
        "noise only ever adds; default 3)",
    )
    parser.add_argument("--image-bytes", type=int, default=100_000)
    parser.add_argument("--feature-bytes", type=int, default=8_192)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument(
        "--moto-keep-alive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve moto over kept-alive connections, as AWS does (default); without, every "
        "call also connects and the figures carry the handshake",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    image = os.urandom(args.image_bytes)
    feature = os.urandom(args.feature_bytes)
    results: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()
    with MotoServer(keep_alive=args.moto_keep_alive) as server:
        url = server.url
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="photos/cat.jpg", Body=image)
        s3.put_object(Bucket=BUCKET, Key="v1/feature.npy", Body=feature, Metadata=META)
        clients: dict[str, ObjectClient] = {
            "boto3": BotoObjects(s3),
            "obstore": NativeObjects.like(s3, fallback=BotoObjects(s3)),
        }
        for name, objects in clients.items():
            for operation, call in operations(objects, name, image, feature).items():
                rounds = [measure(call, args.calls, args.warmup) for _ in range(args.repeat)]
                results.setdefault(operation, {})[name] = {
                    figure: min(r[figure] for r in rounds) for figure in rounds[0]
                }
    if args.json:
        report = {"calls": args.calls, "load_average": load[0], "results": results}
        print(json.dumps(report, indent=2))
        return 0
    print(f"load average before: {load[0]:.2f}; {args.calls} calls per round, {args.repeat} rounds")
    print(f"{'call':<22} {'client':<8} {'CPU ms':>8} {'GIL ms':>8} {'wall ms':>8}")
    for operation, by_client in results.items():
        for name, numbers in by_client.items():
            print(
                f"{operation:<22} {name:<8} {numbers['cpu_ms']:>8.3f} "
                f"{numbers.get('gil_ms', float('nan')):>8.3f} "
                f"{numbers['wall_ms']:>8.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
