"""``bottleneck-demo``: the whole flow on an embedded AWS (a moto server on loopback).

Creates a bucket, a work queue and its dead-letter queue, uploads a few dozen generated images of
four classes (plus any given with ``--images DIR``, and one truncated file), enqueues them with
``bottleneck-enqueue``, runs the consumer until the queue drains, collects the features into one
dataset with ``bottleneck-collect``, trains a linear head on it (``examples/train_head.py``), shows
the ``bottleneck-status`` view, and ends with the five images nearest to one of them
(``examples/search.py``). No AWS account and no network are needed; the weights are random unless
``--weights`` says otherwise, because no pretrained weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bottleneck_contract.suffixes import IMAGE_SUFFIXES

IMAGE_BUCKET = "demo-images"
FEATURE_BUCKET = "demo-features"
CLASSES = ("circles", "squares", "stripes", "triangles")
SUFFIXES = IMAGE_SUFFIXES


def synthetic_image(kind: str, seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    """A JPEG of one of :data:`CLASSES`: random colours, positions and sizes, photo-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5))
        r = int(rng.integers(h // 10, h // 4))
        if kind == "circles":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == "squares":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == "triangles":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            step = int(rng.integers(8, 24))
            for x in range(0, w, 2 * step):
                draw.rectangle((x, 0, x + step, h), fill=colour)
            break
    noise = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).filter(ImageFilter.SMOOTH).save(out, format="JPEG", quality=90)
    return out.getvalue()


def generated_images(per_class: int) -> Iterator[tuple[str, bytes]]:
    for c, kind in enumerate(CLASSES):
        for i in range(per_class):
            yield f"demo/{kind}/{i:03d}.jpg", synthetic_image(kind, seed=1000 * c + i)


def user_images(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            yield f"user/{path.relative_to(folder).as_posix()}", path.read_bytes()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bottleneck-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="also upload every image under this folder")
    parser.add_argument("--per-class", type=int, default=12, help="generated images per class")
    parser.add_argument("--model", default="resnet50", help="timm model (default resnet50)")
    parser.add_argument("--weights", default="random", help="default random: nothing to download")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--out", default="build/demo-dataset", help="where the collected dataset goes"
    )
    args = parser.parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images: {args.images} is not a folder")
    if args.per_class < 0:
        parser.error("--per-class: must be >= 0")
    return args


def _isolate_from_real_aws(endpoint: str) -> None:
    # The demo must never reach a real account, whatever the caller's environment holds.
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
    )


def _create_queues(sqs: Any) -> tuple[str, str]:
    dlq = sqs.create_queue(QueueName="bottleneck-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
    queue = sqs.create_queue(
        QueueName="bottleneck-work",
        Attributes={"VisibilityTimeout": "60", "RedrivePolicy": redrive},
    )["QueueUrl"]
    return queue, dlq


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every image got a feature file."""
    args = parse_args(argv)
    from moto.server import ThreadedMotoServer

    from consumer.embedded_moto import receive_each_message_once

    receive_each_message_once()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = dict(os.environ)
    try:
        host, port = server.get_host_and_port()
        return _run(args, f"http://{host}:{port}")
    finally:
        server.stop()
        # Called in-process (tests, notebooks), the demo must not leave AWS_* pointing at a
        # server that is gone.
        os.environ.clear()
        os.environ.update(saved)


def _run(args: argparse.Namespace, endpoint: str) -> int:
    _isolate_from_real_aws(endpoint)
    import boto3

    from bottleneck_contract import logs
    from bottleneck_tools import collect, status
    from bottleneck_tools import enqueue as enqueue_cli
    from consumer.config import Config
    from consumer.errors import ConfigError
    from consumer.runtime import build_runtime
    from consumer.worker import Worker

    logs.configure("WARNING")
    s3 = boto3.client("s3")
    sqs = boto3.client("sqs")
    s3.create_bucket(Bucket=IMAGE_BUCKET)
    s3.create_bucket(Bucket=FEATURE_BUCKET)
    queue_url, dlq_url = _create_queues(sqs)
    output = f"s3://{FEATURE_BUCKET}/{args.model}/"
    print(f"embedded AWS (moto) at {endpoint}: s3://{IMAGE_BUCKET}, s3://{FEATURE_BUCKET}, SQS")

    # 1. Images land in the bucket (one of them broken, to show where failures go).
    images = list(generated_images(args.per_class))
    if args.images is not None:
        images += list(user_images(args.images))
    broken = images[0][1][: len(images[0][1]) // 2] if images else b""
    uploads = [*images, (BROKEN_KEY, broken)] if images else images
    for key, data in uploads:
        s3.put_object(Bucket=IMAGE_BUCKET, Key=key, Body=data)
    print(
        f"uploaded {len(uploads)} images ({len(images)} good, 1 truncated) to s3://{IMAGE_BUCKET}/"
    )

    # 2. The backfill path: the same tool a user runs on an existing bucket.
    _step(f"bottleneck-enqueue s3://{IMAGE_BUCKET}/ --queue-url {queue_url} --output {output}")
    code = enqueue_cli.main(
        [f"s3://{IMAGE_BUCKET}/", "--queue-url", queue_url, "--output", output, "--no-progress"]
    )
    if code != 0:
        return code

    # 3. The consumer, in this process, until the queue has been idle for 2 s.
    if args.weights == "random":
        print(
            "NOTE: --weights random: no pretrained weights can be downloaded here, so these are "
            "features of a randomly initialised network (the pipeline is the same)."
        )
    consumer_argv = [
        *("--queue-url", queue_url, "--dead-letter-url", dlq_url, "--output", output),
        *("--model", args.model, "--weights", args.weights, "--device", args.device),
        *("--batch-size", str(args.batch_size), "--idle-exit", "2", "--max-wait-ms", "100"),
    ]
    _step("bottleneck-consumer " + " ".join(consumer_argv))
    try:
        config = Config.from_args(consumer_argv, {})
        runtime = build_runtime(config)
    except ConfigError as exc:
        print(f"bottleneck-demo: error: {exc}", file=sys.stderr)
        return 2
    settings = runtime.settings
    print(f"consumer: {settings.model} on {runtime.backbone.device} ({settings.precision})")
    started = time.monotonic()
    worker = Worker(runtime)
    worker.run()
    summary = worker.stats.summary()
    elapsed = time.monotonic() - started
    written = summary["images_written"] + summary["images_replaced"] + summary["images_skipped"]
    _table(
        [
            ("images enqueued", str(len(uploads))),
            ("feature files written", str(written)),
            ("failed (dead-lettered)", f"{summary['images_failed']} {summary['failed_by_code']}"),
            ("feature shape", " x ".join(map(str, runtime.feature_shape)) + f" ({settings.dtype})"),
            ("images/s (end to end)", f"{written / max(elapsed, 1e-9):.1f}"),
            ("model images/s", f"{summary['model_images_per_second']:.1f}"),
            ("mean batch", f"{summary['mean_batch']}"),
            ("fingerprint", runtime.fingerprint),
            ("features at", output),
        ]
    )

    # 4. One training-ready dataset, and the transfer-learning step it exists for.
    dataset = Path(args.out)
    _step(f"bottleneck-collect {output} -o {dataset}")
    if collect.main([output, "-o", str(dataset), "--no-progress"]) != 0:
        return 1
    trained = _train_head(dataset)

    # 5. Where things stand, as an operator sees it, and what to run next.
    _step(f"bottleneck-status --queue-url {queue_url} --output {output}")
    status.main(["--queue-url", queue_url, "--output", output, "--interval", "0"])

    # 6. What else the features are for: the images most like the first one.
    found = _similar(dataset, images[0][0]) if images else True
    print(
        "\nnext, against your own bucket:\n"
        f"  bottleneck-collect s3://YOUR-FEATURES/{args.model}/ -o features/\n"
        "  python examples/train_head.py features/\n"
        "  python examples/search.py features/ SOME/IMAGE.jpg --k 5\n"
    )
    ok = written == len(images) and summary["failed_by_code"] == {"truncated": 1}
    return 0 if ok and trained and found else 1


BROKEN_KEY = "demo/broken/truncated.jpg"


def _step(command: str) -> None:
    print(f"\n$ {command}")


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _train_head(dataset: Path) -> bool:
    """Run ``examples/train_head.py`` on the collected set (a repository file, not installed)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "train_head.py"
    if not script.is_file():
        print(f"(examples/train_head.py not found next to the package: skipped; {script})")
        return True
    _step(f"python examples/train_head.py {dataset}")
    import runpy

    namespace = runpy.run_path(str(script), run_name="train_head")
    return bool(namespace["main"]([str(dataset)]) == 0)


def _similar(dataset: Path, query: str, k: int = 5) -> bool:
    """The ``k`` images nearest to ``query``, as ``examples/search.py`` prints them (its core is
    :mod:`bottleneck_tools.similar`, installed with the package, unlike the examples)."""
    from bottleneck_tools import similar

    _step(f"python examples/search.py {dataset} {query} --k {k}")
    try:
        found = similar.search(similar.load(dataset), query, k)
    except similar.SearchError as exc:
        print(f"bottleneck-demo: error: {exc}", file=sys.stderr)
        return False
    print(similar.format_text(found), end="")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
