"""S3 reads and idempotent writes of feature files.

A new feature file is written with ``IfNoneMatch="*"``: one request in the common case, and two
racing workers can never both create it. Only on a conflict does the writer look (HEAD): a file
with the same source ETag and fingerprint means the work is already done; an out-of-date one is
replaced with ``IfMatch`` on the ETag just seen, after checking that our source bytes are still
the current version, so that a slow worker never replaces newer features with older ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bottleneck_contract.features import is_current
from bottleneck_contract.messages import ImageRef
from consumer import aws
from consumer.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# A conflicting writer can keep winning; past this many rounds the image is retried later.
_MAX_WRITE_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    etag: str


@dataclass(frozen=True, slots=True)
class Existing:
    etag: str
    metadata: dict[str, str]


class WriteOutcome(Enum):
    WRITTEN = "written"  # a new feature file
    REPLACED = "replaced"  # an out-of-date file replaced (re-uploaded image, new settings)
    EXISTS = "exists"  # a matching file was already there (duplicate delivery, lost race)
    SUPERSEDED = "superseded"  # the source changed after we read it: a newer message owns it


def strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def fetch(s3: Any, ref: ImageRef, *, max_bytes: int) -> Fetched:
    """GetObject into memory; objects over ``max_bytes`` are refused before their body is read."""
    response = aws.call(s3.get_object, Bucket=ref.bucket, Key=ref.key)
    body = response["Body"]
    try:
        length = int(response.get("ContentLength", 0))
        if length > max_bytes:
            raise PermanentError("too-large", f"object is {length} bytes; the limit is {max_bytes}")
        data = body.read()
    finally:
        body.close()
    return Fetched(data, strip_etag(response.get("ETag")))


def head(s3: Any, bucket: str, key: str) -> Existing | None:
    """HeadObject, or ``None`` when there is no such object."""
    try:
        response = aws.call(s3.head_object, Bucket=bucket, Key=key)
    except Exception as exc:
        if aws.error_code(exc) in _NOT_FOUND:
            return None
        raise
    return Existing(strip_etag(response.get("ETag")), dict(response.get("Metadata", {})))


def write_feature(
    s3: Any,
    *,
    bucket: str,
    key: str,
    body: bytes,
    metadata: dict[str, str],
    source: ImageRef,
    source_etag: str,
    fingerprint: str,
    overwrite: bool,
) -> WriteOutcome:
    """Write one feature file idempotently; see the module docstring for the protocol."""
    put: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "Body": body,
        "Metadata": metadata,
        "ContentType": "application/x-npy",
    }
    if_match: str | None = None
    for _ in range(_MAX_WRITE_ROUNDS):
        try:
            if if_match is None:
                aws.call(s3.put_object, IfNoneMatch="*", **put)
                return WriteOutcome.WRITTEN
            aws.call(s3.put_object, IfMatch=f'"{if_match}"', **put)
            return WriteOutcome.REPLACED
        except Exception as exc:
            if aws.error_code(exc) != "PreconditionFailed":
                raise
        existing = head(s3, bucket, key)
        if existing is None:
            if_match = None  # deleted between our put and our look: create it again
            continue
        if not overwrite and is_current(existing.metadata, source_etag, fingerprint):
            return WriteOutcome.EXISTS
        if existing.metadata.get("source-etag") != source_etag and not _still_current(
            s3, source, source_etag
        ):
            return WriteOutcome.SUPERSEDED
        if_match = existing.etag
    raise TransientError("write-conflict", f"s3://{bucket}/{key} kept changing under us")


def _still_current(s3: Any, source: ImageRef, source_etag: str) -> bool:
    current = head(s3, source.bucket, source.key)
    if current is None:
        log.info(
            "source deleted after it was read; its feature file is left as it is",
            extra={"fields": {"bucket": source.bucket, "key": source.key}},
        )
        return False
    return current.etag == source_etag
