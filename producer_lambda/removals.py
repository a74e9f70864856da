"""Deleted images: their feature files go, but only once the image is really gone.

Deleting is the producer's own work: no queue message, no GPU job. For each deleted key that the
key filter accepts, :func:`remove` makes up to three requests:

1. ``HeadObject`` of the feature file ``<output prefix><key>.npy``. A 404 ends it: the image never
   had features, or an earlier delete event removed them (``already-gone``, one request).
2. ``HeadObject`` of the image. A 200 ends it: the key holds an object again, a re-upload made
   after the delete (events arrive in any order, and a retried one late), so the features stay
   (``source-exists``; if they belong to the older image, the consumer replaces them). A 404 means
   gone; in a versioned bucket a current delete marker answers 404 too. Anything else is an error,
   403 above all: without ``s3:ListBucket`` S3 answers 403 for a missing key, and a 403 is just as
   well a permission that is missing, so it is never read as gone.
3. ``DeleteObject`` of the feature file with ``IfMatch`` set to the ETag seen in step 1. A file
   written again since then (the features of a re-upload made after step 2) no longer matches:
   S3 answers 412 and the new features stay (``features-changed``). A 404 means another delete
   event got there first (``already-gone``).

Why the feature file is looked at first: its ETag is what makes the delete conditional, which
closes the race with a re-upload whose features land between step 2 and step 3; and a key without
features costs one request and leaves no delete marker in a versioned output bucket, where a plain
``DeleteObject`` of a missing key would add one. What the order cannot see: a re-upload of the very
same bytes whose message the consumer settles between step 2 and step 3 finds its features current
and writes nothing, so they go (``bottleneck-reconcile`` reports the image as ``missing``).

Retries: the S3 client keeps botocore's standard mode, the one layer that retries a raised call
(:mod:`bottleneck_contract.retry`); what still fails comes back as ``failed`` with its error code,
and the caller has the event delivered again (an SQS batch item failure, or a raised error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import Removal
from producer_lambda.backoff import error_code

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "ALREADY_GONE",
    "DELETED",
    "FAILED",
    "FEATURES_CHANGED",
    "OUTCOMES",
    "SOURCE_EXISTS",
    "RemovalOutcome",
    "remove",
    "remove_all",
]

DELETED = "deleted"
SOURCE_EXISTS = "source-exists"
ALREADY_GONE = "already-gone"
FEATURES_CHANGED = "features-changed"
FAILED = "failed"
OUTCOMES = (DELETED, SOURCE_EXISTS, ALREADY_GONE, FEATURES_CHANGED, FAILED)

# Each removal is two or three round trips of ~10-30 ms; a bulk delete (aws s3 rm --recursive)
# brings a batch of them at once, and boto3 clients are thread-safe.
DEFAULT_WORKERS = 8


@dataclass(frozen=True, slots=True)
class RemovalOutcome:
    """What became of one deleted image's feature file; ``code``/``error`` only when failed."""

    removal: Removal
    feature_key: str
    result: str
    code: str | None = None
    error: str | None = None


def remove(s3: S3Client, output: S3Location, removal: Removal) -> RemovalOutcome:
    """Remove the feature file of ``removal`` if the image is gone; never raises for AWS errors."""
    feature = output.feature_key(removal.key)

    def outcome(result: str, exc: BaseException | None = None) -> RemovalOutcome:
        if exc is None:
            return RemovalOutcome(removal, feature, result)
        return RemovalOutcome(removal, feature, result, error_code(exc), str(exc))

    try:
        try:
            etag = s3.head_object(Bucket=output.bucket, Key=feature)["ETag"]
        except ClientError as exc:
            if _status(exc) == 404:
                return outcome(ALREADY_GONE)
            raise
        try:
            s3.head_object(Bucket=removal.bucket, Key=removal.key)
            return outcome(SOURCE_EXISTS)
        except ClientError as exc:
            if _status(exc) != 404:
                raise
        try:
            s3.delete_object(Bucket=output.bucket, Key=feature, IfMatch=etag)
        except ClientError as exc:
            if _status(exc) == 412:
                return outcome(FEATURES_CHANGED)
            if _status(exc) == 404:
                return outcome(ALREADY_GONE)
            raise
        return outcome(DELETED)
    except (ClientError, BotoCoreError) as exc:
        return outcome(FAILED, exc)


def remove_all(
    s3: S3Client,
    output: S3Location,
    removals: Iterable[Removal],
    *,
    workers: int = DEFAULT_WORKERS,
) -> list[RemovalOutcome]:
    """:func:`remove` for each removal, ``workers`` at a time; outcomes in the given order."""
    todo: Sequence[Removal] = list(removals)
    if len(todo) <= 1 or workers <= 1:
        return [remove(s3, output, removal) for removal in todo]
    with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
        return list(pool.map(lambda removal: remove(s3, output, removal), todo))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
