"""What several test modules put into moto the same way: images, feature files, queues.

Feature files are written by the contract's own rules (:mod:`bottleneck_contract.features`): the
key ``<prefix><source key>.npy`` and the metadata the consumer writes, so that a tool under test
reads exactly what the consumer would have left.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from bottleneck_contract.features import feature_key, feature_metadata

FINGERPRINT = "a" * 16


def npy(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``array``."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def put_image(s3: Any, key: str, body: bytes = b"jpeg bytes", bucket: str = "images") -> str:
    """Upload an "image" (any bytes: the tools never decode one); returns its ETag."""
    return str(s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]).strip('"')


def put_feature(
    s3: Any,
    prefix: str,
    source_key: str,
    *,
    etag: str,
    fingerprint: str = FINGERPRINT,
    array: np.ndarray | None = None,
    bucket: str = "feats",
    source_bucket: str = "images",
) -> str:
    """Write the feature file of ``source_key`` under ``prefix`` as the consumer would; returns
    its key. ``etag`` is the source image's ETag it was computed from."""
    features = np.zeros(4, np.float32) if array is None else array
    key = feature_key(prefix, source_key)
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=npy(features),
        Metadata=feature_metadata(
            source_bucket=source_bucket,
            source_key=source_key,
            source_etag=etag,
            model="resnet50",
            weights="s3://models/r50.safetensors",
            pool="avg",
            shape=tuple(features.shape),
            dtype=features.dtype.name,
            fingerprint=fingerprint,
        ),
    )
    return key


def create_work_queue(
    sqs: Any, *, max_receive_count: int = 3, attributes: dict[str, str] | None = None
) -> tuple[str, str]:
    """A work queue ``work`` whose redrive policy targets ``work-dlq``; returns both URLs."""
    dlq_url = str(sqs.create_queue(QueueName="work-dlq")["QueueUrl"])
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    queue_url = sqs.create_queue(
        QueueName="work",
        Attributes={**(attributes or {}), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    return str(queue_url), dlq_url
