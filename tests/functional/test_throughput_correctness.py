"""What the pipelined consumer must keep while it goes fast: the same numbers, and bounded memory.

* Micro-batching, several fetch/write threads and out-of-order completion change nothing: a
  batch of 8 writes byte-identical feature files to a batch of 1 (fp32 on the CPU).
* ``--decode pil-draft`` stays within its stated tolerance of the exact path on large JPEGs, and
  is exact where it must not apply (JPEGs under twice the resize target, other formats).
* A slow writer pushes back: images in flight never exceed ``--max-in-flight``.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
import numpy as np
from PIL import Image

from bottleneck_contract.messages import ImageRef, encode
from consumer.aws import Clients
from consumer.runtime import build_runtime
from consumer.worker import Worker
from tests.corpus import encode as encode_image
from tests.corpus import photo_array, photo_jpeg
from tests.functional.conftest import REGION, Stack, consumer_config

# --decode pil-draft against --decode pil on the large JPEGs below (fp32, CPU, random weights).
# Measured: relative L2 difference of the feature vectors at most 0.0029 and cosine similarity
# at least 0.999996 with test_resnet (resnet50: at most 0.0020 and at least 0.999998); the
# preprocessed pixels differ by at most 11 levels, 3.0 on average. The bounds leave more than 3x
# margin on the relative difference, and are far below what a different image gives (relative
# difference 0.25 to 0.45, cosine 0.91 to 0.97).
DRAFT_MAX_RELATIVE_L2 = 0.01
DRAFT_MIN_COSINE = 0.9999


def upload_and_send(stack: Stack, images: dict[str, bytes]) -> None:
    for key, data in images.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
    send(stack, images)


def send(stack: Stack, images: dict[str, bytes]) -> None:
    keys = list(images)
    for start in range(0, len(keys), 10):
        stack.sqs.send_message_batch(
            QueueUrl=stack.queue_url,
            Entries=[
                {"Id": str(i), "MessageBody": encode(ImageRef(stack.images, key))}
                for i, key in enumerate(keys[start : start + 10])
            ],
        )


def feature_bytes(stack: Stack, prefix: str, key: str) -> bytes:
    body = stack.s3.get_object(Bucket=stack.features, Key=f"{prefix}{key}.npy")["Body"]
    return bytes(body.read())


def features(stack: Stack, prefix: str, key: str) -> np.ndarray:
    return np.load(io.BytesIO(feature_bytes(stack, prefix, key)), allow_pickle=False)


def test_batch_of_8_writes_the_same_bytes_as_batch_of_1(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN 21 images of several sizes and orientations (21: the last batch of 8 is partial)
    images = {
        f"mix/{i:02d}.jpg": photo_jpeg(*((500, 375), (375, 500), (320, 240))[i % 3], seed=100 + i)
        for i in range(20)
    }
    images["mix/large.jpg"] = photo_jpeg(1600, 1200, seed=99)
    upload_and_send(stack, images)

    # WHEN one consumer computes them one at a time
    _, one = run_consumer("--batch-size", "1", "--output", f"s3://{stack.features}/b1/")
    # AND a pipelined one computes them again in batches of 8, with several threads per stage
    send(stack, images)
    _, eight = run_consumer(
        *("--batch-size", "8", "--max-wait-ms", "500", "--output", f"s3://{stack.features}/b8/"),
        *("--fetch-concurrency", "8", "--write-concurrency", "8", "--decode-workers", "2"),
        *("--receivers", "2"),
    )

    # THEN both wrote every file, the second really in batches
    assert one.summary()["images_written"] == eight.summary()["images_written"] == len(images)
    assert one.summary()["mean_batch"] == 1
    assert eight.summary()["mean_batch"] > 2
    # AND every feature file is byte for byte the same (.npy header and float32 data)
    for key in images:
        assert feature_bytes(stack, "b8/", key) == feature_bytes(stack, "b1/", key), key


def _large_images() -> dict[str, bytes]:
    return {
        "big/2000x1500.jpg": photo_jpeg(2000, 1500, seed=1),
        "big/1500x2000.jpg": photo_jpeg(1500, 2000, seed=2),
        "big/1600x1200-q75.jpg": photo_jpeg(1600, 1200, seed=3, quality=75),
        "big/1024x768.jpg": photo_jpeg(1024, 768, seed=4),
        "big/3000x2000.jpg": photo_jpeg(3000, 2000, seed=5),
        "big/2000x1500-progressive.jpg": encode_image(
            Image.fromarray(photo_array(2000, 1500, seed=6)), "JPEG", quality=90, progressive=True
        ),
    }


def test_pil_draft_features_stay_within_tolerance_of_the_exact_path(
    stack: Stack, run_consumer: Callable[..., Any]
) -> None:
    # GIVEN large JPEGs (draft mode applies), a JPEG under twice the resize size (168 for
    # test_resnet, so that Pillow would draft even a 500x375 one) and a large PNG (draft mode
    # must not apply to either)
    large = _large_images()
    exact_only = {
        "small/320x240.jpg": photo_jpeg(320, 240, seed=7),
        "big/2000x1500.png": encode_image(Image.fromarray(photo_array(2000, 1500, 8)), "PNG"),
    }
    upload_and_send(stack, large | exact_only)

    # WHEN the consumer computes them with the exact decoder and again with draft mode
    run_consumer("--decode", "pil", "--output", f"s3://{stack.features}/exact/")
    send(stack, large | exact_only)
    run_consumer("--decode", "pil-draft", "--output", f"s3://{stack.features}/draft/")

    # THEN large JPEGs stay within the stated tolerance, and differ (draft mode did apply)
    for key in large:
        exact, draft = features(stack, "exact/", key), features(stack, "draft/", key)
        relative = np.linalg.norm(draft - exact) / np.linalg.norm(exact)
        cosine = float(np.dot(draft, exact) / (np.linalg.norm(draft) * np.linalg.norm(exact)))
        assert relative <= DRAFT_MAX_RELATIVE_L2, (key, relative)
        assert cosine >= DRAFT_MIN_COSINE, (key, cosine)
        assert relative > 0, f"{key}: draft mode changed nothing; was it applied?"
    # AND where draft mode does not apply, the features are exactly the same
    for key in exact_only:
        assert np.array_equal(features(stack, "draft/", key), features(stack, "exact/", key)), key


def test_images_in_flight_never_exceed_the_cap_under_a_slow_writer(stack: Stack) -> None:
    # GIVEN 40 single-image messages and an S3 client whose PutObject takes 50 ms
    images = {f"slow/{i:02d}.jpg": photo_jpeg(320, 240, seed=200 + i) for i in range(40)}
    upload_and_send(stack, images)
    s3 = boto3.client("s3", region_name=REGION)
    put_object = s3.put_object

    def slow_put_object(**kwargs: Any) -> Any:
        time.sleep(0.05)
        return put_object(**kwargs)

    s3.put_object = slow_put_object  # type: ignore[method-assign]
    # AND a consumer with a cap of 6 images, fast fetches, several receivers and 2 slow writers
    config = consumer_config(
        stack,
        *("--max-in-flight", "6", "--receivers", "3", "--fetch-concurrency", "8"),
        *("--write-concurrency", "2", "--batch-size", "4", "--max-wait-ms", "20"),
    )
    assert config.in_flight_limit == 6
    worker = Worker(build_runtime(config, Clients(s3, stack.sqs)))
    samples: list[int] = []
    # Every increase of the count happens in register(): reading it right after each call
    # catches every peak; the sampling thread watches the count in between.
    register = worker.inflight.register

    def register_and_sample(message: Any) -> bool:
        accepted = register(message)  # False while stopping: the receiver must not dispatch
        samples.append(worker.inflight.images())
        return accepted

    worker.inflight.register = register_and_sample  # type: ignore[method-assign]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(worker.inflight.images())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    # WHEN the consumer runs until the queue is idle
    try:
        assert worker.run() == 0
    finally:
        done.set()
        sampler.join()

    # THEN every image was written, and the writer really was the bottleneck (the cap was hit)
    assert worker.stats.summary()["images_written"] == len(images)
    assert sorted(stack.feature_keys("v1/")) == sorted(f"v1/{key}.npy" for key in images)
    assert max(samples) >= config.in_flight_limit - 1
    # AND at no moment were more images held than the cap
    assert max(samples) <= config.in_flight_limit, f"peak {max(samples)} > cap 6"
