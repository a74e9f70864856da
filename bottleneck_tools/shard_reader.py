"""Reading a prefix's shards for the tools: one listing, the committed indexes, the tombstones.

``bottleneck-collect``, ``bottleneck-reconcile`` and ``bottleneck-status`` all read shards
through here, so that they agree on what a prefix holds: the format and its rules (commit,
newest row, tombstones) are :mod:`bottleneck_contract.shards`'; this module only fetches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bottleneck_contract.features import FEATURE_SUFFIX
from bottleneck_contract.shards import (
    SHARDS,
    RowId,
    ShardIndex,
    ShardKey,
    ShardRow,
    Tombstone,
    decode_index,
    decode_tombstones,
    is_tombstone_key,
    live_rows,
    parse_shard_key,
)

__all__ = [
    "Listing",
    "ShardReadError",
    "Shards",
    "list_prefix",
    "list_shards",
    "read_shards",
]


class ShardReadError(Exception):
    """A damaged shard or tombstone object, in one line naming it."""


@dataclass
class Listing:
    """What a prefix holds: per-image feature files, committed shards' indexes, shards' ``.npy``,
    tombstone objects."""

    files: list[str] = field(default_factory=list)  # sorted
    # each file's ETag and LastModified as listed (what an incremental collect compares)
    file_objects: dict[str, tuple[str, Any]] = field(default_factory=dict)
    indexes: dict[str, tuple[ShardKey, Any]] = field(default_factory=dict)  # key: LastModified
    shard_npys: set[str] = field(default_factory=set)
    tombstones: list[str] = field(default_factory=list)
    npy_bytes: int = 0  # of the shards' .npy objects (committed or not)


def _sort(listing: Listing, prefix: str, objects: Iterable[dict[str, Any]]) -> Listing:
    for obj in objects:
        key = obj["Key"]
        shard = parse_shard_key(prefix, key)
        if shard is not None:
            if shard.is_index:
                listing.indexes[key] = (shard, obj["LastModified"])
            else:
                listing.shard_npys.add(key)
                listing.npy_bytes += int(obj.get("Size") or 0)
        elif is_tombstone_key(prefix, key):
            listing.tombstones.append(key)
        elif key.endswith(FEATURE_SUFFIX):
            listing.files.append(key)
            listing.file_objects[key] = (str(obj.get("ETag", "")), obj.get("LastModified"))
    listing.files.sort()
    listing.tombstones.sort()
    return listing


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def list_prefix(s3: Any, bucket: str, prefix: str) -> Listing:
    """One listing of ``prefix``, sorted into per-image feature files and shard objects."""
    return _sort(Listing(), prefix, _objects(s3, bucket, prefix))


def list_shards(s3: Any, bucket: str, prefix: str) -> Listing:
    """The shard objects of output ``prefix`` only (one listing of ``<prefix>shards/``)."""
    return _sort(Listing(), prefix, _objects(s3, bucket, prefix + SHARDS))


def _get(s3: Any, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
    response = s3.get_object(Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    return data, {k.lower(): v for k, v in response.get("Metadata", {}).items()}


@dataclass
class Shards:
    """A prefix's committed shards as read: each index, each shard's metadata by ``.npy`` key,
    the tombstones, and the rows a reader takes (newest, not buried)."""

    indexes: list[ShardIndex] = field(default_factory=list)
    metas: dict[str, dict[str, str]] = field(default_factory=dict)
    tombstones: list[Tombstone] = field(default_factory=list)
    rows: dict[RowId, tuple[ShardIndex, ShardRow]] = field(default_factory=dict)

    @property
    def committed_rows(self) -> int:
        return sum(len(index.rows) for index in self.indexes)


def read_shards(
    s3: Any,
    bucket: str,
    listing: Listing,
    concurrency: int = 16,
    *,
    strict: bool = True,
    cache: dict[str, Any] | None = None,
) -> Shards:
    """GET every committed index and every tombstone object of ``listing``, ``concurrency`` at a
    time; a damaged one is a :class:`ShardReadError`. ``strict``: an index without its
    ``.npy`` is damaged too (collect needs the rows; a count does not). ``cache`` (by key) keeps
    what was read for the next call: both kinds of object are immutable (create-only)."""
    shards = Shards()
    if cache is not None:
        return _cached(s3, bucket, listing, concurrency, strict, cache)

    def index(key: str) -> ShardIndex:
        shard, modified = listing.indexes[key]
        if strict and shard.npy_key not in listing.shard_npys:
            raise ShardReadError(f"s3://{bucket}/{key}: a shard index without its .npy (damaged)")
        data, meta = _get(s3, bucket, key)
        try:
            rows = decode_index(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShardReadError(f"s3://{bucket}/{key}: not a shard index: {exc}") from None
        shards.metas[shard.npy_key] = meta
        return ShardIndex(shard, modified, tuple(rows))

    def tombstones(key: str) -> list[Tombstone]:
        data, _ = _get(s3, bucket, key)
        try:
            return decode_tombstones(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShardReadError(f"s3://{bucket}/{key}: not a tombstone object: {exc}") from None

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="shards") as pool:
        shards.indexes = list(pool.map(index, sorted(listing.indexes)))
        shards.tombstones = [t for ts in pool.map(tombstones, listing.tombstones) for t in ts]
    shards.rows = live_rows(shards.indexes, shards.tombstones)
    return shards


def _cached(
    s3: Any, bucket: str, listing: Listing, concurrency: int, strict: bool, cache: dict[str, Any]
) -> Shards:
    """:func:`read_shards` for the objects not in ``cache`` yet; the rest from it."""
    fresh = Listing(
        indexes={k: v for k, v in listing.indexes.items() if k not in cache},
        shard_npys=listing.shard_npys,
    )
    for index in read_shards(s3, bucket, fresh, concurrency, strict=strict).indexes:
        cache[index.key.index_key] = index
    for key in listing.tombstones:
        if key not in cache:
            data, _ = _get(s3, bucket, key)
            try:
                cache[key] = decode_tombstones(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ShardReadError(
                    f"s3://{bucket}/{key}: not a tombstone object: {exc}"
                ) from None
    shards = Shards(
        indexes=[cache[key] for key in sorted(listing.indexes)],
        tombstones=[t for key in listing.tombstones for t in cache[key]],
    )
    shards.rows = live_rows(shards.indexes, shards.tombstones)
    return shards
