"""Feature shards as every side sees them: where they lie, what their index says, which row counts.

Pure, standard library only. With ``bottleneck-consumer --layout shards`` the features of many
images go into one ``.npy`` (shape ``(N, *row shape)``) beside a JSON-lines index that names each
row's image:

    <prefix>shards/<fingerprint>/<writer>-<seq>.npy
    <prefix>shards/<fingerprint>/<writer>-<seq>.index.jsonl

The ``.npy`` is written first and the index last: **a shard exists iff its index exists**, so a
reader ignores a ``.npy`` without one (a flush that failed or was cut short by a crash; its images
were computed again elsewhere). At-least-once delivery can put an image in two shards: a reader
takes one row per ``(bucket, key, fingerprint)``, the newest (:func:`newest_rows`).

Rows are immutable, so a deleted image's row is buried, not removed: the producer's delete handler
(and ``bottleneck-reconcile --fix``) writes a tombstone index, JSON lines in create-only objects

    <prefix>shards/tombstones/<YYYYmmddTHHMMSS.ffffff>Z-<token>.jsonl

each line ``{"bucket", "key", "deleted_at"}``. A reader drops a row whose image has a tombstone
with ``deleted_at`` later than the row's shard's commit (its index's ``LastModified``): a
re-upload computed after the delete lies in a newer shard and stays (:func:`live_rows`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "INDEX_CONTENT_TYPE",
    "INDEX_SUFFIX",
    "NPY_SUFFIX",
    "ROWS",
    "SEQ_DIGITS",
    "SHARDS",
    "SHARD_KEY",
    "TOMBSTONES",
    "TOMBSTONE_CONTENT_TYPE",
    "TOMBSTONE_KEY",
    "TOMBSTONE_SUFFIX",
    "Deletes",
    "RowId",
    "ShardIndex",
    "ShardKey",
    "ShardRow",
    "Tombstone",
    "buried",
    "decode_index",
    "decode_tombstones",
    "encode_index",
    "encode_tombstones",
    "is_shard_key",
    "is_tombstone_key",
    "latest_deletes",
    "live_rows",
    "newest_rows",
    "parse_shard_key",
    "shard_keys",
    "tombstone_key",
]

SHARDS = "shards/"
NPY_SUFFIX = ".npy"
INDEX_SUFFIX = ".index.jsonl"
INDEX_CONTENT_TYPE = "application/x-ndjson"
SEQ_DIGITS = 6
# User metadata beyond the feature files' settings keys: the shard's row count.
ROWS = "rows"
# A shard object's key below the output prefix. Per-image listings skip what matches it.
SHARD_KEY = re.compile(
    rf"shards/(?P<fingerprint>[0-9a-f]{{16}})/(?P<name>[A-Za-z0-9-]+-[0-9]{{{SEQ_DIGITS},}})"
    r"(?P<suffix>\.npy|\.index\.jsonl)"
)
_WRITER = re.compile(r"[A-Za-z0-9-]+")


@dataclass(frozen=True, slots=True)
class ShardKey:
    """A shard object's key, taken apart: its fingerprint folder, its name, and which half."""

    prefix: str
    fingerprint: str
    name: str  # <writer>-<seq>
    is_index: bool

    @property
    def npy_key(self) -> str:
        return f"{self.prefix}{SHARDS}{self.fingerprint}/{self.name}{NPY_SUFFIX}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}{SHARDS}{self.fingerprint}/{self.name}{INDEX_SUFFIX}"


def shard_keys(prefix: str, fingerprint: str, writer: str, seq: int) -> ShardKey:
    """The keys of ``writer``'s shard number ``seq`` (the writer names one consumer process)."""
    if not _WRITER.fullmatch(writer):
        raise ValueError(f"a shard writer is letters, digits and '-', got {writer!r}")
    return ShardKey(prefix, fingerprint, f"{writer}-{seq:0{SEQ_DIGITS}d}", is_index=False)


def parse_shard_key(prefix: str, key: str) -> ShardKey | None:
    """The shard object ``key`` under ``prefix`` names, or ``None`` if it is not one."""
    if not key.startswith(prefix):
        return None
    match = SHARD_KEY.fullmatch(key, len(prefix))
    if match is None:
        return None
    return ShardKey(
        prefix,
        match["fingerprint"],
        match["name"],
        is_index=match["suffix"] == INDEX_SUFFIX,
    )


def is_shard_key(prefix: str, key: str) -> bool:
    """Whether ``key`` is a shard's ``.npy`` or index under ``prefix`` (not a per-image file)."""
    return parse_shard_key(prefix, key) is not None


@dataclass(frozen=True, slots=True)
class ShardRow:
    """One index line: row ``row`` of the shard holds the features of this image."""

    row: int
    bucket: str
    key: str
    etag: str
    fingerprint: str
    source_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "row": self.row,
            "bucket": self.bucket,
            "key": self.key,
            "etag": self.etag,
            "fingerprint": self.fingerprint,
        }
        if self.source_sha256:
            doc["source-sha256"] = self.source_sha256
        return doc


def encode_index(rows: Iterable[ShardRow]) -> bytes:
    """The ``.index.jsonl`` bytes: one JSON object per row, in row order, UTF-8."""
    lines = (
        json.dumps(row.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows
    )
    return "".join(lines).encode("utf-8")


def decode_index(data: bytes) -> list[ShardRow]:
    """The rows of an index; a line that does not parse, or rows out of order, is a
    ``ValueError`` (the shard is damaged: it is not read at all)."""
    rows: list[ShardRow] = []
    for number, line in enumerate(data.decode("utf-8").splitlines()):
        try:
            doc = json.loads(line)
            row = ShardRow(
                row=doc["row"],
                bucket=doc["bucket"],
                key=doc["key"],
                etag=doc["etag"],
                fingerprint=doc["fingerprint"],
                source_sha256=doc.get("source-sha256", ""),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number + 1}: not an index row ({exc})") from None
        if row.row != number or not all(
            isinstance(v, str) for v in (row.bucket, row.key, row.etag, row.fingerprint)
        ):
            raise ValueError(f"line {number + 1}: row {row.row!r} where {number} was due")
        rows.append(row)
    return rows


# (source bucket, source key, fingerprint): one row of these per image in a reader's result.
RowId = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ShardIndex:
    """A committed shard as a listing and its index show it."""

    key: ShardKey
    last_modified: datetime  # of the index object: when the shard was committed
    rows: tuple[ShardRow, ...]

    @property
    def order(self) -> tuple[datetime, str]:
        return (self.last_modified, self.key.index_key)


def newest_rows(indexes: Iterable[ShardIndex]) -> dict[RowId, tuple[ShardIndex, ShardRow]]:
    """One row per ``(bucket, key, fingerprint)``: the newest shard's, its last row if twice.

    Shards are ordered by their index's ``LastModified`` (S3's clock: when the shard was
    committed), then by index key, so the choice is deterministic for a given bucket. Rows with
    the same ETag are the same computation delivered twice; a row with another ETag is another
    version of the image, and the newest computation stands for it.
    """
    chosen: dict[RowId, tuple[ShardIndex, ShardRow]] = {}
    for index in sorted(indexes, key=lambda i: i.order):
        for row in index.rows:
            chosen[(row.bucket, row.key, row.fingerprint)] = (index, row)
    return chosen


# ---------------------------------------------------------------------------- tombstones

TOMBSTONES = SHARDS + "tombstones/"
TOMBSTONE_SUFFIX = ".jsonl"
TOMBSTONE_CONTENT_TYPE = INDEX_CONTENT_TYPE
# A tombstone object's key below the output prefix: when it was written, then a random token
# (two writers in one microsecond still get two objects; both PUTs are create-only).
TOMBSTONE_KEY = re.compile(
    r"shards/tombstones/[0-9]{8}T[0-9]{6}(?:\.[0-9]{1,6})?Z-[A-Za-z0-9-]+\.jsonl"
)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """One tombstone line: the image ``bucket``/``key`` was found gone at ``deleted_at`` (UTC)."""

    bucket: str
    key: str
    deleted_at: datetime

    def to_json(self) -> dict[str, Any]:
        when = self.deleted_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"bucket": self.bucket, "key": self.key, "deleted_at": when}


def tombstone_key(prefix: str, when: datetime, token: str) -> str:
    """The key of a tombstone object written at ``when`` under output ``prefix``."""
    if not _WRITER.fullmatch(token):
        raise ValueError(f"a tombstone token is letters, digits and '-', got {token!r}")
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")
    return f"{prefix}{TOMBSTONES}{stamp}Z-{token}{TOMBSTONE_SUFFIX}"


def is_tombstone_key(prefix: str, key: str) -> bool:
    """Whether ``key`` is a tombstone object under ``prefix``."""
    return key.startswith(prefix) and TOMBSTONE_KEY.fullmatch(key, len(prefix)) is not None


def encode_tombstones(tombstones: Iterable[Tombstone]) -> bytes:
    """A tombstone object's bytes: one JSON object per line, UTF-8."""
    lines = (
        json.dumps(t.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
        for t in tombstones
    )
    return "".join(lines).encode("utf-8")


def decode_tombstones(data: bytes) -> list[Tombstone]:
    """The lines of a tombstone object; one that does not parse is a ``ValueError`` (unknown
    fields are ignored). A ``deleted_at`` without a time zone is refused: it would be compared
    with S3's UTC clock."""
    tombstones: list[Tombstone] = []
    for number, line in enumerate(data.decode("utf-8").splitlines()):
        try:
            doc = json.loads(line)
            when = datetime.fromisoformat(doc["deleted_at"])
            tombstone = Tombstone(doc["bucket"], doc["key"], when)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number + 1}: not a tombstone ({exc})") from None
        if when.tzinfo is None or not isinstance(tombstone.bucket, str):
            raise ValueError(f"line {number + 1}: not a tombstone (no time zone, or no bucket)")
        if not isinstance(tombstone.key, str):
            raise ValueError(f"line {number + 1}: not a tombstone (key {tombstone.key!r})")
        tombstones.append(tombstone)
    return tombstones


# (source bucket, source key) -> the latest time it was found gone.
Deletes = dict[tuple[str, str], datetime]


def latest_deletes(tombstones: Iterable[Tombstone]) -> Deletes:
    """Each image's latest ``deleted_at`` (a second delete of one key adds no harm)."""
    deletes: Deletes = {}
    for tombstone in tombstones:
        image = (tombstone.bucket, tombstone.key)
        if image not in deletes or tombstone.deleted_at > deletes[image]:
            deletes[image] = tombstone.deleted_at
    return deletes


def buried(index: ShardIndex, row: ShardRow, deletes: Deletes) -> bool:
    """Whether ``row`` was committed before its image was found gone: the row is dropped.

    ``LastModified`` has one-second resolution, so a shard committed in the second of a delete
    loses that image's row; the delete handler takes ``deleted_at`` before it HEADs the image,
    so a re-upload after that HEAD is computed and committed strictly later (a shard's flush
    takes seconds) and is kept.
    """
    deleted = deletes.get((row.bucket, row.key))
    return deleted is not None and deleted > index.last_modified


def live_rows(
    indexes: Iterable[ShardIndex], tombstones: Iterable[Tombstone] = ()
) -> dict[RowId, tuple[ShardIndex, ShardRow]]:
    """:func:`newest_rows`, less the rows a tombstone buries (:func:`buried`): what a reader
    takes."""
    deletes = latest_deletes(tombstones)
    return {
        row_id: (index, row)
        for row_id, (index, row) in newest_rows(indexes).items()
        if not buried(index, row, deletes)
    }
