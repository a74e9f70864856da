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
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "INDEX_CONTENT_TYPE",
    "INDEX_SUFFIX",
    "NPY_SUFFIX",
    "ROWS",
    "SEQ_DIGITS",
    "SHARDS",
    "SHARD_KEY",
    "RowId",
    "ShardIndex",
    "ShardKey",
    "ShardRow",
    "decode_index",
    "encode_index",
    "is_shard_key",
    "newest_rows",
    "parse_shard_key",
    "shard_keys",
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
