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

A templated output (``BOTTLENECK_OUTPUT`` ending in ``{model}/{fingerprint}/``) keeps one
feature file per image in each version: :func:`remove_all` lists the versions under the root once
per call (:func:`~bottleneck_contract.locations.list_versions`: one ListObjectsV2 for the root
and one per model folder), and for each deleted key :func:`remove_versions` HEADs its feature
file in every version, HEADs the image once if any of them exists, and deletes each found file
on its own ETag: per file the same three steps in the same order, so the same guarantees. A
version created after the listing (a new model's first files, written while the delete is being
handled) is missed like any file written in flight; ``bottleneck-reconcile`` reports it.

Shards (``bottleneck-consumer --layout shards``): rows are immutable, so a deleted image's row is
buried instead (:mod:`bottleneck_contract.shards`). :func:`remove_all` lists ``<version>shards/``
once per call and version (``MaxKeys=1``: does it hold shards?); for each version that does,
every removal HEADs the image (once, shared with the files' step 2), taking the time first, and
an image that answers 404 gets a tombstone line ``{"bucket", "key", "deleted_at"}`` with that
time: a row committed before it is dropped by every reader, a re-upload's row (computed after
the HEAD, so committed later) is kept. The lines of one call go into one create-only object per
version, ``<version>shards/tombstones/<time>-<random>.jsonl`` (``tombstoned``); a failed PUT fails
those removals (their events come back, and a second tombstone for a key adds no harm).

Retries: the S3 client keeps botocore's standard mode, the one layer that retries a raised call
(:mod:`bottleneck_contract.retry`); what still fails comes back as ``failed`` with its error code,
and the caller has the event delivered again (an SQS batch item failure, or a raised error).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.features import feature_key
from bottleneck_contract.locations import OutputTemplate, S3Location, list_versions
from bottleneck_contract.messages import Removal
from bottleneck_contract.shards import (
    SHARDS,
    TOMBSTONE_CONTENT_TYPE,
    TOMBSTONES,
    Tombstone,
    encode_tombstones,
    tombstone_key,
)
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
    "TOMBSTONED",
    "RemovalOutcome",
    "holds_shards",
    "put_tombstones",
    "remove",
    "remove_all",
    "remove_versions",
]

DELETED = "deleted"
SOURCE_EXISTS = "source-exists"
ALREADY_GONE = "already-gone"
FEATURES_CHANGED = "features-changed"
FAILED = "failed"
TOMBSTONED = "tombstoned"
OUTCOMES = (DELETED, TOMBSTONED, SOURCE_EXISTS, ALREADY_GONE, FEATURES_CHANGED, FAILED)

# Each removal is two or three round trips of ~10-30 ms; a bulk delete (aws s3 rm --recursive)
# brings a batch of them at once, and boto3 clients are thread-safe.
DEFAULT_WORKERS = 8


@dataclass(frozen=True, slots=True)
class RemovalOutcome:
    """What became of one deleted image's feature file (or, with shards, its rows: then
    ``feature_key`` is the tombstone object, and ``deleted_at`` the time its line holds);
    ``code``/``error`` only when failed."""

    removal: Removal
    feature_key: str
    result: str
    code: str | None = None
    error: str | None = None
    deleted_at: datetime | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def remove(s3: S3Client, output: S3Location, removal: Removal) -> RemovalOutcome:
    """Remove the feature file of ``removal`` if the image is gone; never raises for AWS errors."""
    return remove_versions(s3, (output,), removal)[0]


def remove_versions(
    s3: S3Client,
    versions: Sequence[S3Location],
    removal: Removal,
    *,
    sharded: Sequence[S3Location] = (),
    now: Callable[[], datetime] = _now,
) -> list[RemovalOutcome]:
    """Remove ``removal``'s feature file from each of ``versions`` if the image is gone: one
    outcome per version, in order, then one per ``sharded`` version (``tombstoned``: its line
    is still to be written, see :func:`remove_all`); never raises for AWS errors.

    Requests: a HEAD per version; the image's HEAD once, only when some file exists or some
    version holds shards; a conditional DELETE per file found (see the module docstring).
    """
    outcomes: list[RemovalOutcome] = []
    found: list[tuple[int, S3Location, str, str]] = []  # (index in outcomes, version, key, ETag)
    for version in versions:
        feature = version.feature_key(removal.key)
        try:
            etag = s3.head_object(Bucket=version.bucket, Key=feature)["ETag"]
        except ClientError as exc:
            if _status(exc) == 404:
                outcomes.append(_outcome(removal, feature, ALREADY_GONE))
            else:
                outcomes.append(_outcome(removal, feature, FAILED, exc))
            continue
        except BotoCoreError as exc:
            outcomes.append(_outcome(removal, feature, FAILED, exc))
            continue
        found.append((len(outcomes), version, feature, etag))
        outcomes.append(_outcome(removal, feature, SOURCE_EXISTS))  # until the image is gone
    for version in sharded:
        found.append((len(outcomes), version, version.prefix + TOMBSTONES, ""))
        outcomes.append(_outcome(removal, version.prefix + TOMBSTONES, SOURCE_EXISTS))
    if not found:
        return outcomes
    # Taken before the HEAD: a re-upload after a 404 is computed, and committed, after it.
    deleted_at = now()
    try:
        s3.head_object(Bucket=removal.bucket, Key=removal.key)
        return outcomes  # a re-upload: every file and row stays (source-exists)
    except ClientError as exc:
        if _status(exc) != 404:
            return _fail(outcomes, found, removal, exc)
    except BotoCoreError as exc:
        return _fail(outcomes, found, removal, exc)
    for index, version, feature, etag in found:
        if etag:
            outcomes[index] = _delete(s3, removal, version.bucket, feature, etag)
        else:
            outcomes[index] = RemovalOutcome(removal, feature, TOMBSTONED, deleted_at=deleted_at)
    return outcomes


def _fail(
    outcomes: list[RemovalOutcome],
    found: Sequence[tuple[int, S3Location, str, str]],
    removal: Removal,
    exc: BaseException,
) -> list[RemovalOutcome]:
    # The image's HEAD failed (a 403 above all): no found file may go on a guess.
    for index, _, feature, _ in found:
        outcomes[index] = _outcome(removal, feature, FAILED, exc)
    return outcomes


def _delete(s3: S3Client, removal: Removal, bucket: str, feature: str, etag: str) -> RemovalOutcome:
    try:
        s3.delete_object(Bucket=bucket, Key=feature, IfMatch=etag)
    except ClientError as exc:
        if _status(exc) == 412:
            return _outcome(removal, feature, FEATURES_CHANGED)
        if _status(exc) == 404:
            return _outcome(removal, feature, ALREADY_GONE)
        return _outcome(removal, feature, FAILED, exc)
    except BotoCoreError as exc:
        return _outcome(removal, feature, FAILED, exc)
    return _outcome(removal, feature, DELETED)


def _outcome(
    removal: Removal, feature: str, result: str, exc: BaseException | None = None
) -> RemovalOutcome:
    if exc is None:
        return RemovalOutcome(removal, feature, result)
    return RemovalOutcome(removal, feature, result, error_code(exc), str(exc))


def holds_shards(s3: S3Client, version: S3Location) -> bool:
    """Whether ``version`` holds shard objects (one ListObjectsV2 of one key)."""
    page = s3.list_objects_v2(Bucket=version.bucket, Prefix=version.prefix + SHARDS, MaxKeys=1)
    return bool(page.get("Contents"))


def put_tombstones(
    s3: S3Client, output: S3Location, tombstones: Sequence[Tombstone], when: datetime
) -> str:
    """Write ``tombstones`` into one new tombstone object of ``output`` (create-only); its key.
    AWS errors are raised."""
    key = tombstone_key(output.prefix, when, secrets.token_hex(4))
    s3.put_object(
        Bucket=output.bucket,
        Key=key,
        Body=encode_tombstones(tombstones),
        ContentType=TOMBSTONE_CONTENT_TYPE,
        IfNoneMatch="*",
    )
    return key


def remove_all(
    s3: S3Client,
    output: S3Location | OutputTemplate,
    removals: Iterable[Removal],
    *,
    workers: int = DEFAULT_WORKERS,
    now: Callable[[], datetime] = _now,
) -> list[RemovalOutcome]:
    """The outcomes of every removal, ``workers`` removals at a time, in the given order.

    A plain output: one outcome per removal (:func:`remove`). A templated one: its versions are
    listed once for all the removals, then one outcome per removal and version; a removal for
    which no version exists is one ``already-gone`` whose key keeps the placeholders. A failed
    listing fails every removal (their events come back). Versions holding shards add one
    outcome per removal each; their tombstones are written last, one object per version.
    """
    template = output if isinstance(output, OutputTemplate) else OutputTemplate(output)
    todo: Sequence[Removal] = list(removals)
    if not todo:
        return []
    versions: Sequence[S3Location] = (template.root,)
    if template.templated:
        try:
            versions = list_versions(s3, template).found
        except (ClientError, BotoCoreError) as exc:
            return [_outcome(r, _pattern(template, r), FAILED, exc) for r in todo]
    try:
        sharded = [version for version in versions if holds_shards(s3, version)]
    except (ClientError, BotoCoreError) as exc:
        return [_outcome(r, _pattern(template, r), FAILED, exc) for r in todo]

    def one(removal: Removal) -> list[RemovalOutcome]:
        if not versions:
            return [_outcome(removal, _pattern(template, removal), ALREADY_GONE)]
        return remove_versions(s3, versions, removal, sharded=sharded, now=now)

    if len(todo) <= 1 or workers <= 1:
        outcomes = [outcome for removal in todo for outcome in one(removal)]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            outcomes = [outcome for outcomes in pool.map(one, todo) for outcome in outcomes]
    for version in sharded:
        _bury(s3, version, outcomes, now())
    return outcomes


def _bury(
    s3: S3Client, version: S3Location, outcomes: list[RemovalOutcome], when: datetime
) -> None:
    """Write ``version``'s tombstone lines of this call in one object; each outcome then names
    it, or fails with the PUT."""
    folder = version.prefix + TOMBSTONES
    mine = [i for i, o in enumerate(outcomes) if o.result == TOMBSTONED and o.feature_key == folder]
    if not mine:
        return
    lines = []
    for i in mine:
        removal, deleted_at = outcomes[i].removal, outcomes[i].deleted_at
        assert deleted_at is not None
        lines.append(Tombstone(removal.bucket, removal.key, deleted_at))
    try:
        key = put_tombstones(s3, version, lines, when)
    except (ClientError, BotoCoreError) as exc:
        for i in mine:
            outcomes[i] = _outcome(outcomes[i].removal, folder, FAILED, exc)
        return
    for i in mine:
        outcomes[i] = replace(outcomes[i], feature_key=key)


def _pattern(template: OutputTemplate, removal: Removal) -> str:
    # Where the feature files would be, placeholders kept: what the log says when none is.
    return feature_key(template.key_prefix, removal.key)


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
