"""S3 faults under the native (obstore) client lose and double nothing: the consumer end to end.

The consumer runs in this process against a moto server over HTTP, its image and feature-file
requests made by obstore through :class:`tests.faults.FaultyEndpoint`, which injects on the wire
what S3 sends when it throttles, fails with a 500, resets or closes a connection, loses the
response of a PUT that was carried out, or answers 409 to concurrent conditional writes. After
each run every image has exactly one feature-file version (the feature bucket is versioned), the
work queue is empty, visible or in flight, and nothing went to the dead-letter queue. Which
faults obstore's own retries absorb, and which reach the consumer's settlement (the message is
released and done on its next delivery), is part of the expectation.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import boto3
import pytest

from bottleneck_contract.messages import ImageRef, encode
from consumer.aws import Clients
from consumer.objects.boto import BotoObjects
from consumer.objects.native import NativeObjects
from consumer.runtime import build_runtime
from consumer.worker import Worker
from tests.corpus import photo_jpeg
from tests.faults import Fault, FaultyEndpoint
from tests.functional.conftest import Stack, consumer_config, make_stack

IMAGES = {f"photos/{i:02d}.jpg": photo_jpeg(120, 90, seed=200 + i) for i in range(12)}


@pytest.fixture
def stack(moto_server: str) -> Stack:
    kwargs: dict[str, Any] = {
        "endpoint_url": moto_server,
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    stack = make_stack(boto3.client("s3", **kwargs), boto3.client("sqs", **kwargs))
    stack.s3.put_bucket_versioning(
        Bucket=stack.features, VersioningConfiguration={"Status": "Enabled"}
    )
    for key, data in IMAGES.items():
        stack.s3.put_object(Bucket=stack.images, Key=key, Body=data)
        stack.send(encode(ImageRef(stack.images, key)))
    return stack


def feature_versions(stack: Stack) -> Counter[str]:
    pages = stack.s3.get_paginator("list_object_versions").paginate(Bucket=stack.features)
    return Counter(
        v["Key"]
        for page in pages
        for v in page.get("Versions", [])
        if v["Key"].endswith(".jpg.npy")
    )


# plan, extra consumer flags, whether obstore's retries absorb every fault (else some images
# are released and done on a later delivery). Where they must absorb them, ``limit`` keeps the
# injections below what one request could meet in a row (5 attempts; 4 write rounds for 409s),
# whatever order the concurrent requests take.
PLANS: dict[str, tuple[dict[str, Fault], tuple[str, ...], bool]] = {
    "throttle": (
        {
            "get_object": Fault("throttle", every=3, limit=4),
            "put_object": Fault("throttle", every=3, limit=4),
        },
        (),
        True,
    ),
    "500": (
        {
            "get_object": Fault("server", every=2, limit=4),
            "put_object": Fault("server", every=2, limit=4),
        },
        (),
        True,
    ),
    "get-reset": ({"get_object": Fault("reset", every=3, limit=4)}, (), True),
    # A reset PUT is not sent again by obstore (not idempotent): the message is released.
    "put-reset": ({"put_object": Fault("reset", every=4, limit=3)}, (), False),
    # The create landed but its response was lost, the connection closed: obstore sends it
    # again, S3 answers 412, and the HEAD + fingerprint check counts the file as done.
    "put-response-lost-closed": (
        {"put_object": Fault("closed", every=2, limit=4, after=True)},
        (),
        True,
    ),
    # The same with a reset: obstore gives up, the redelivery finds the file written.
    "put-response-lost-reset": (
        {"put_object": Fault("reset", calls={1, 2}, after=True)},
        (),
        False,
    ),
    "put-409": ({"put_object": Fault("conflict", every=2, limit=3)}, (), True),
    # Five failures in a row outlast obstore's retries: transient, done on the next delivery.
    "put-retries-exhausted": (
        {"put_object": Fault("server", calls={1, 2, 3, 4, 5}, key="v1/photos/05.jpg.npy")},
        (),
        False,
    ),
    "head-throttle": (
        {"head_object": Fault("throttle", every=2, limit=4)},
        ("--existing-check", "head"),
        True,
    ),
}


@pytest.mark.parametrize(("plan", "extra", "absorbed"), PLANS.values(), ids=list(PLANS))
def test_native_client_faults_lose_and_double_nothing(
    moto_server: str, stack: Stack, plan: dict[str, Fault], extra: tuple[str, ...], absorbed: bool
) -> None:
    # GIVEN twelve images, and S3 answering the native client's requests as planned
    with FaultyEndpoint(moto_server, plan) as proxy:
        objects = NativeObjects(BotoObjects(stack.s3), endpoint=proxy.url, region="us-east-1")
        config = consumer_config(stack, "--s3-client", "obstore", *extra)
        runtime = build_runtime(config, Clients(stack.s3, stack.sqs), objects)

        # WHEN the consumer runs through the faults until the queue is idle
        worker = Worker(runtime)
        assert worker.run() == 0

    # THEN the faults happened, and still every image was written exactly once, queue empty
    summary = worker.stats.summary()
    assert runtime.objects.name == "obstore"
    assert set(proxy.injected) == set(plan)
    assert feature_versions(stack) == Counter({f"v1/{key}.npy": 1 for key in IMAGES})
    assert stack.depth() == 0
    assert stack.depth(stack.dlq_url) == 0
    assert worker.inflight.images() == 0
    assert summary["images_failed"] == 0
    # ...and obstore's retries absorbed the faults, or the consumer's settlement took over
    assert (summary["retried_by_code"] == {}) == absorbed, summary["retried_by_code"]
    if any(fault.after for fault in plan.values()):
        assert summary["images_skipped"] >= 1  # a lost response's file counted as done
