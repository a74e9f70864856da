"""Fetches and idempotent writes of feature files, over :class:`consumer.objects.ObjectClient`.

A new feature file is written create-only (``If-None-Match: *``): one request in the common case,
and two racing workers can never both create it. Only on a conflict does the writer look (HEAD):
a file with the same source ETag and fingerprint means the work is already done; an out-of-date
one is replaced with ``If-Match`` on the ETag just seen, after checking that our source bytes are
still the current version, so that a slow worker never replaces newer features with older ones.

An image deleted while its message was in flight must not keep a feature file (features follow
their images). With ``orphan_check`` the writer looks at the source once more after its write (a
HEAD): when it is gone, the file just written is deleted again, conditionally on its own ETag, so a
file a re-uploaded image's message wrote meanwhile is never touched. The producer's delete handler
runs after the delete, so it sees any file written before this HEAD: between the two, no orphan
is left (what slips through, a lost event say, ``bottleneck-reconcile --fix`` repairs).
The decisions live here; the requests (and their retries) in the object client.
"""

from __future__ import annotations

import logging
from enum import Enum

from bottleneck_contract.features import is_current
from bottleneck_contract.messages import ImageRef
from consumer.errors import TransientError
from consumer.objects import (
    ConditionFailed,
    Existing,
    Fetched,
    ObjectClient,
    SizeCallback,
    strip_etag,
)

__all__ = ["Existing", "Fetched", "WriteOutcome", "fetch", "head", "strip_etag", "write_feature"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-npy"
# A conflicting writer can keep winning; past this many rounds the image is retried later.
_MAX_WRITE_ROUNDS = 4


class WriteOutcome(Enum):
    WRITTEN = "written"  # a new feature file
    REPLACED = "replaced"  # an out-of-date file replaced (re-uploaded image, new settings)
    EXISTS = "exists"  # a matching file was already there (duplicate delivery, lost race)
    SUPERSEDED = "superseded"  # the source changed after we read it: a newer message owns it
    SOURCE_GONE = "source-gone"  # the source was deleted: no feature file is kept for it


def fetch(
    objects: ObjectClient, ref: ImageRef, *, max_bytes: int, on_size: SizeCallback | None = None
) -> Fetched:
    """The image into memory; objects over ``max_bytes`` are refused before their body is read,
    and ``on_size`` hears the size before it is read (see :meth:`ObjectClient.get`)."""
    return objects.get(ref.bucket, ref.key, max_bytes=max_bytes, on_size=on_size)


def head(objects: ObjectClient, bucket: str, key: str) -> Existing | None:
    """The object's ETag and user metadata, or ``None`` when there is no such object."""
    return objects.head(bucket, key)


def write_feature(
    objects: ObjectClient,
    *,
    bucket: str,
    key: str,
    body: bytes,
    metadata: dict[str, str],
    source: ImageRef,
    source_etag: str,
    fingerprint: str,
    overwrite: bool,
    orphan_check: bool,
) -> WriteOutcome:
    """Write one feature file idempotently; see the module docstring for the protocol."""
    if_match: str | None = None
    for _ in range(_MAX_WRITE_ROUNDS):
        try:
            written = objects.put(
                bucket, key, body, metadata=metadata, content_type=CONTENT_TYPE, if_match=if_match
            )
        except ConditionFailed:
            pass
        else:
            if orphan_check and objects.head(source.bucket, source.key) is None:
                return _remove_orphan(objects, bucket, key, written, source)
            return WriteOutcome.WRITTEN if if_match is None else WriteOutcome.REPLACED
        existing = objects.head(bucket, key)
        if existing is None:
            if_match = None  # deleted between our put and our look: create it again
            continue
        if not overwrite and is_current(existing.metadata, source_etag, fingerprint):
            return WriteOutcome.EXISTS
        if existing.metadata.get("source-etag") != source_etag:
            current = objects.head(source.bucket, source.key)
            if current is None and orphan_check:
                # The file there is out of date and its image is gone: an orphan either way.
                return _remove_orphan(objects, bucket, key, existing.etag, source)
            if current is None or current.etag != source_etag:
                return WriteOutcome.SUPERSEDED
        if_match = existing.etag
    raise TransientError("write-conflict", f"s3://{bucket}/{key} kept changing under us")


def _remove_orphan(
    objects: ObjectClient, bucket: str, key: str, etag: str, source: ImageRef
) -> WriteOutcome:
    """Delete the feature file of a deleted image, unless it changed since we saw it."""
    removed = objects.delete(bucket, key, if_match=etag)
    log.info(
        "source deleted while its message was in flight; its feature file is removed",
        extra={"fields": {"bucket": source.bucket, "key": source.key, "removed": removed}},
    )
    return WriteOutcome.SOURCE_GONE
