"""``bottleneck-collect``: gather feature files (or shards) into one training-ready dataset.

    bottleneck-collect s3://feats/resnet50/ -o DIR [--allow-mixed] [--concurrency N] [--restart]
                       [--layout auto|files|shards|both] [--incremental]

Writes into ``DIR``:

* ``features.npy``: every feature stacked, ``(N, D)`` for pooled features (``(N, C, H, W)``
  for unpooled ones), in the files' dtype; ``np.load(path, mmap_mode="r")`` maps it without
  reading it into memory. It is written through ``np.lib.format.open_memmap``, so collecting
  never needs the whole array in memory either.
* ``index.csv``: one line per row: ``row, source_bucket, source_key, source_etag, feature_key,
  fingerprint`` (``source_key`` decoded from the metadata's percent-encoding).
* ``manifest.json``: model, weights, pool, fingerprint, dtype, shape, count, and the source.

Rows are in feature-key order (Python string order, which is S3's UTF-8 byte order), so the
same files always give the same bytes.

Shards (``bottleneck-consumer --layout shards``, the format in :mod:`bottleneck_contract.shards`):
every committed shard's index (``<prefix>shards/<fingerprint>/*.index.jsonl``; a ``.npy`` without
its index is ignored) is read, one row is kept per ``(bucket, key, fingerprint)`` (the newest
shard's: at-least-once delivery can put an image in two shards), a row whose image a tombstone
says was deleted after the shard was committed is dropped (``<prefix>shards/tombstones/``, see
:func:`bottleneck_contract.shards.live_rows`), and the rows go into the same
three files as per-image files would, in the same order: each row's ``feature_key`` is the key its
per-image file would have. Each shard is downloaded once, ``SHARD_CONCURRENCY`` at a time at most
(a shard can be a few hundred MB). ``--layout auto`` (default) takes whichever layout the prefix
holds and refuses a prefix that holds both; ``--layout both`` takes the union, a per-image file
winning over shard rows with its feature key; ``files`` or ``shards`` take one and ignore the
other.

Versions: a root holding several ``<model>/<fingerprint>/`` versions is refused (name one); a
root holding exactly one is collected as that version (its shards' keys are relative to it).

Fingerprints: the files must all carry the same ``fingerprint`` (the same model, weights, pool,
preprocessing and dtype), or the rows would not be comparable; a second fingerprint stops the
run with an error unless ``--allow-mixed`` is given (then ``manifest.json`` counts each, and a
file whose dtype differs is cast to the first file's). Shapes must agree in any case.

Resuming: the work happens in ``DIR/.collect-partial/``: the key list taken at the start, the
array being filled, and a journal of the rows already written (appended, and synced, only after
their data is flushed). Run the same command again after an interruption (Ctrl-C, a crash, a
network error, a refusal to mix fingerprints) and only the rows not in the journal are
downloaded; the result is byte for byte what an uninterrupted run would have written. The key
list is that of the first attempt: ``--restart`` starts over with a fresh listing (to pick up
files written since). When all rows are in, the three files are moved into ``DIR`` and the
partial folder removed.

Incremental (``--incremental``, opt-in; without it a run into a finished dataset collects it all
again): beside the three files every run writes ``.collect-objects.csv`` (``row, feature_key,
object``: a file's ETag and LastModified as its GetObject returned them, a shard row's shard and
row). ``--incremental`` lists the prefix again and, for each row of the new plan whose feature key
and object (as listed now) match a row of the finished dataset in ``DIR``, copies that row from
the old ``features.npy`` (through memmaps, in blocks of ``COPY_BYTES``) instead of downloading it;
rows of changed files, new files and new shards are downloaded; rows whose files are gone are
dropped. The result is byte for byte what a full collect would write now. The copy happens in the
partial folder before it counts as begun (interrupted there, the next run starts over); after
that an interruption resumes like any other run, and the old dataset stays whole in ``DIR`` until
the final moves. ``DIR`` without a dataset (or without ``.collect-objects.csv``): every row is
downloaded. A dataset of another source is refused.

Exit status: 0 done, 1 error (one line on stderr), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bottleneck_contract.features import (
    DTYPE,
    FINGERPRINT,
    MODEL,
    POOL,
    SHAPE,
    SOURCE_BUCKET,
    SOURCE_ETAG,
    SOURCE_KEY,
    WEIGHTS,
    decode_key,
    decode_weights,
    encode_key,
    feature_key,
)
from bottleneck_contract.locations import InvalidS3Uri, OutputTemplate, S3Location, find_versions
from bottleneck_tools.cmdline import OneLineParser
from bottleneck_tools.shard_reader import Listing, ShardReadError, list_prefix, read_shards

__all__ = [
    "CollectError",
    "Downloaded",
    "Result",
    "collect",
    "list_feature_keys",
    "list_prefix",
    "main",
    "parse_source",
]

PROG = "bottleneck-collect"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
FEATURES = "features.npy"
INDEX = "index.csv"
MANIFEST = "manifest.json"
PARTIAL = ".collect-partial"
# Beside the three files: each row's object as collected (a file's ETag and LastModified, a
# shard row's shard and row), what --incremental compares with a new listing.
OBJECTS = ".collect-objects.csv"
OBJECTS_COLUMNS = ("row", "feature_key", "object")
# Rows copied from the previous features.npy at once at most, by size.
COPY_BYTES = 64 << 20
INDEX_COLUMNS = (
    "row",
    "source_bucket",
    "source_key",
    "source_etag",
    "feature_key",
    "fingerprint",
)
# Rows per checkpoint: the array is flushed, then their journal lines written and synced.
CHECKPOINT_ROWS = 256
LAYOUTS = ("auto", "files", "shards", "both")
# Shards downloaded at once at most, whatever --concurrency says: each is held whole in memory
# until its rows are in the array (up to 256 MiB, the consumer's cap).
SHARD_CONCURRENCY = 4


class CollectError(Exception):
    """A reason the collection cannot go on, in one line."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    """One feature file: its array and what its metadata says about it."""

    row: int
    key: str  # the feature key (for a shard's row: the key its per-image file would have)
    etag: str
    array: np.ndarray
    metadata: Mapping[str, str]
    where: str = ""  # where the row was read, for messages, when not at ``key``
    object: str = ""  # its object's identity (:func:`object_id`, or a shard's row)

    def entry(self) -> dict[str, Any]:
        """Its journal (and index) entry."""
        meta = self.metadata
        return {
            "row": self.row,
            "source_bucket": meta.get(SOURCE_BUCKET, ""),
            "source_key": decode_key(meta.get(SOURCE_KEY, "")),
            "source_etag": meta.get(SOURCE_ETAG, ""),
            "feature_key": self.key,
            "fingerprint": meta.get(FINGERPRINT, ""),
            "object": self.object,
        }


def object_id(etag: str, modified: Any) -> str:
    """A per-image file's version as ``ETag LastModified`` (to the second, UTC: a listing and a
    GetObject agree on both), or ``""`` when either is unknown."""
    etag = str(etag or "").strip('"')
    if not etag or modified is None:
        return ""
    if hasattr(modified, "astimezone"):
        modified = modified.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{etag} {modified}"


def shard_row_id(npy_key: str, row: int) -> str:
    """A shard row's identity: shards are create-only, so its bytes never change."""
    return f"{npy_key}#{row}"


@dataclass
class Result:
    """What a run did: rows in all, rows downloaded by this run, and where the files are."""

    count: int
    downloaded: int
    resumed: int
    shape: tuple[int, ...]
    dtype: str
    fingerprints: Counter[str] = field(default_factory=Counter)
    directory: Path = Path()
    layout: str = "files"
    shards: int = 0  # shards the rows come from (with shards)
    reused: int = 0  # rows copied from the previous dataset (--incremental)
    dropped: int = 0  # rows of the previous dataset whose files (or rows) are gone


# ---------------------------------------------------------------------------- S3 reads


def parse_source(uri: str) -> S3Location:
    """The feature files' location, by the contract's rule (``s3://b/p`` is the folder ``p/``);
    an invalid URI is a :class:`CollectError`."""
    try:
        return S3Location.parse(uri, "source")
    except InvalidS3Uri as exc:
        raise CollectError(str(exc)) from None


def list_feature_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Every per-image ``.npy`` key under ``prefix`` (shards' are not), sorted (code point
    order = S3's UTF-8 byte order)."""
    return list_prefix(s3, bucket, prefix).files


def choose_layout(listing: Listing, requested: str, source: str) -> str:
    """The layout to collect: ``requested``, or for ``auto`` the one ``listing`` holds."""
    if requested != "auto":
        return requested
    if listing.files and listing.indexes:
        raise CollectError(
            f"{source} holds both per-image feature files ({len(listing.files):,}) and shards "
            f"({len(listing.indexes):,}); pass --layout files, shards or both"
        )
    return "shards" if listing.indexes else "files"


# A row of the plan, as the partial state keeps it: a per-image file's key, or a shard's row
# {"shard": .npy key, "row": i, "rows": N, "entry": index.csv fields}.
Item = str | dict[str, Any]


def _shard_items(
    s3: Any,
    bucket: str,
    prefix: str,
    listing: Listing,
    concurrency: int,
    taken: set[str],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """The newest row of each image in the committed shards, but for feature keys ``taken`` by
    per-image files; and each shard's metadata by its ``.npy`` key."""
    try:
        shards = read_shards(s3, bucket, listing, concurrency)
    except ShardReadError as exc:
        raise CollectError(str(exc)) from None
    items: list[dict[str, Any]] = []
    # The newest row of each image, less those a tombstone buries (a deleted image).
    for index, row in shards.rows.values():
        key = feature_key(prefix, row.key)
        if key in taken:
            continue
        entry = {
            "source_bucket": row.bucket,
            "source_key": row.key,
            "source_etag": row.etag,
            "feature_key": key,
            "fingerprint": row.fingerprint,
        }
        items.append(
            {"shard": index.key.npy_key, "row": row.row, "rows": len(index.rows), "entry": entry}
        )
    return items, shards.metas


def _order(item: Item) -> tuple[str, str, str]:
    """Rows in feature-key order; a shard's rows with one feature key by bucket, fingerprint."""
    if isinstance(item, str):
        return (item, "", "")
    entry = item["entry"]
    return (entry["feature_key"], entry["source_bucket"], entry["fingerprint"])


def _plan(
    s3: Any, bucket: str, prefix: str, layout: str, listing: Listing, concurrency: int
) -> tuple[list[Item], dict[str, dict[str, str]]]:
    """Every row to collect, in row order, and the shards' metadata by ``.npy`` key."""
    files: list[Item] = list(listing.files) if layout in ("files", "both") else []
    if layout == "files":
        return files, {}
    taken = set(listing.files) if layout == "both" else set()
    shard_items, metas = _shard_items(s3, bucket, prefix, listing, concurrency, taken)
    return sorted([*files, *shard_items], key=_order), metas


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("x")) if text else ()


def download(s3: Any, bucket: str, key: str, row: int) -> Downloaded:
    """GetObject one feature file (its metadata comes with it) and parse the ``.npy`` bytes."""
    response = s3.get_object(Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # np.load raises several kinds for bad bytes
        raise CollectError(f"s3://{bucket}/{key} is not a readable .npy file: {exc}") from None
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    etag = str(response.get("ETag", "")).strip('"')
    version = object_id(etag, response.get("LastModified"))
    return Downloaded(row, key, etag, array, metadata, object=version)


def download_shard(
    s3: Any, bucket: str, npy_key: str, rows: Sequence[tuple[int, dict[str, Any]]]
) -> list[Downloaded]:
    """GetObject one shard's ``.npy`` (once) and take the plan's ``rows`` from it: ``(row of
    the dataset, plan item)`` pairs."""
    response = s3.get_object(Bucket=bucket, Key=npy_key)
    body = response["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    where = f"s3://{bucket}/{npy_key}"
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # np.load raises several kinds for bad bytes
        raise CollectError(f"{where} is not a readable .npy file: {exc}") from None
    expected = rows[0][1]["rows"]
    if array.ndim < 1 or array.shape[0] != expected:
        raise CollectError(
            f"{where} has shape {array.shape}, its index {expected} rows: a damaged shard"
        )
    shard_meta = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    etag = str(response.get("ETag", "")).strip('"')
    out = []
    for row, item in rows:
        entry = item["entry"]
        meta = {
            **shard_meta,
            SOURCE_BUCKET: entry["source_bucket"],
            SOURCE_KEY: encode_key(entry["source_key"]),
            SOURCE_ETAG: entry["source_etag"],
            FINGERPRINT: entry["fingerprint"],
        }
        out.append(
            Downloaded(
                row,
                entry["feature_key"],
                etag,
                array[item["row"]],
                meta,
                where=f"{where} row {item['row']}",
                object=shard_row_id(npy_key, item["row"]),
            )
        )
    return out


# ---------------------------------------------------------------------------- partial state


class _Partial:
    """``DIR/.collect-partial/``: the key snapshot, the array being filled, the journal."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / PARTIAL
        self.meta_path = self.dir / "meta.json"
        self.keys_path = self.dir / "keys.txt"
        self.array_path = self.dir / FEATURES
        self.journal_path = self.dir / "done.jsonl"

    def exists(self) -> bool:
        return self.meta_path.is_file() and self.keys_path.is_file() and self.array_path.is_file()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(
        self,
        source: str,
        keys: Sequence[Item],
        row_shape: tuple[int, ...],
        dtype: np.dtype[Any],
        metadata: Mapping[str, str],
        layout: str,
        extra: Mapping[str, Any] | None = None,
        fill: Callable[[np.memmap[Any, Any]], None] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A fresh partial state whose array has the first row's shape and dtype; ``fill``
        writes rows into it (and their journal lines) before the state counts as begun."""
        self.remove()
        self.dir.mkdir(parents=True)
        _write_text(self.keys_path, "".join(json.dumps(k) + "\n" for k in keys))
        meta = {
            "source": source,
            "count": len(keys),
            "row_shape": list(row_shape),
            "dtype": dtype.str,
            "settings": dict(settings) if settings is not None else _settings(metadata),
            "layout": layout,
            **(extra or {}),
        }
        shape = (len(keys), *row_shape)
        array = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=dtype, shape=shape)
        if fill is not None:
            # Interrupted here, there is no meta.json yet: the next run starts over.
            fill(array)
        del array  # created at full size; reopened below in r+ mode
        _write_text(self.meta_path, json.dumps(meta, sort_keys=True))
        return meta

    def load(self) -> tuple[dict[str, Any], list[Item], dict[int, dict[str, Any]]]:
        meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        keys = [json.loads(line) for line in self.keys_path.read_text("utf-8").splitlines()]
        done: dict[int, dict[str, Any]] = {}
        if self.journal_path.is_file():
            for line in self.journal_path.read_text("utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash: its row is simply done again
                if isinstance(entry, dict) and 0 <= entry.get("row", -1) < len(keys):
                    done[int(entry["row"])] = entry
        return meta, keys, done

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return
        with self.journal_path.open("a", encoding="utf-8") as journal:
            journal.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
            journal.flush()
            os.fsync(journal.fileno())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _settings(metadata: Mapping[str, str]) -> dict[str, str]:
    return {
        "model": metadata.get(MODEL, ""),
        "weights": decode_weights(metadata.get(WEIGHTS, "")),
        "pool": metadata.get(POOL, ""),
        "fingerprint": metadata.get(FINGERPRINT, ""),
    }


# ---------------------------------------------------------------------------- the previous dataset


@dataclass
class _Previous:
    """A finished dataset in the directory, as --incremental reuses it."""

    path: Path  # its features.npy
    settings: dict[str, str]
    dtype: str
    row_shape: tuple[int, ...]
    # (feature key, object) -> (its row, its index entry): the rows whose object is known
    rows: dict[tuple[str, str], tuple[int, dict[str, Any]]]
    names: list[str]  # every row's feature key


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _previous(directory: Path, source: str) -> _Previous | None:
    """The finished dataset in ``directory`` (``None`` if there is none); one of another source
    is a :class:`CollectError`."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("source") != source:
        raise CollectError(
            f"{directory} holds a collection of {manifest.get('source')}; --incremental updates "
            "one of the same source: collect into another directory"
        )
    index = _read_csv(directory / INDEX)
    shape = np.load(directory / FEATURES, mmap_mode="r").shape
    if not len(index) == manifest.get("count") == shape[0]:
        raise CollectError(
            f"{directory}: {FEATURES}, {INDEX} and {MANIFEST} disagree on the count; collect "
            "without --incremental"
        )
    objects: dict[int, str] = {}
    if (directory / OBJECTS).is_file():  # absent: collected before --incremental; no reuse
        objects = {
            int(line["row"]): line["object"]
            for line in _read_csv(directory / OBJECTS)
            if int(line["row"]) < len(index)
            and index[int(line["row"])]["feature_key"] == line["feature_key"]
        }
    rows: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    for row, entry in enumerate(index):
        if objects.get(row):
            rows[(entry["feature_key"], objects[row])] = (row, {**entry, "object": objects[row]})
    return _Previous(
        path=directory / FEATURES,
        settings={k: manifest[k] for k in ("model", "weights", "pool", "fingerprint")},
        dtype=manifest["dtype"],
        row_shape=tuple(manifest["shape"][1:]),
        rows=rows,
        names=[entry["feature_key"] for entry in index],
    )


def _listed_object(item: Item, listing: Listing) -> str:
    """The identity of a plan row's object as listed now (compared with :data:`OBJECTS`)."""
    if isinstance(item, str):
        etag, modified = listing.file_objects.get(item, ("", None))
        return object_id(etag, modified)
    return shard_row_id(item["shard"], item["row"])


def _copy_rows(
    previous: _Previous,
    array: np.memmap[Any, Any],
    reuse: Sequence[tuple[int, int]],
    partial: _Partial,
    done: dict[int, dict[str, Any]],
    entries: Mapping[int, dict[str, Any]],
) -> None:
    """Copy the ``(new row, old row)`` pairs from the previous ``features.npy`` into ``array``,
    runs of consecutive rows at once (at most :data:`COPY_BYTES`), journalling each block after
    its data is flushed."""
    old = np.load(previous.path, mmap_mode="r")
    row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    block = max(1, COPY_BYTES // row_bytes)
    i = 0
    try:
        while i < len(reuse):
            new0, old0 = reuse[i]
            n = 1
            while i + n < len(reuse) and n < block and reuse[i + n] == (new0 + n, old0 + n):
                n += 1
            array[new0 : new0 + n] = old[old0 : old0 + n]
            array.flush()
            lines = []
            for new, was in reuse[i : i + n]:
                done[new] = {**entries[was], "row": new}
                lines.append(done[new])
            partial.append(lines)
            i += n
    finally:
        del old


# ---------------------------------------------------------------------------- the run


def collect(
    s3: Any,
    source: str,
    directory: Path,
    *,
    allow_mixed: bool = False,
    concurrency: int = 16,
    restart: bool = False,
    progress: Callable[[int, int], Any] | None = None,
    layout: str = "auto",
    incremental: bool = False,
) -> Result:
    """Collect the ``.npy`` files (or shards) under ``source`` into ``directory`` (see the module
    docstring); ``layout`` is one of :data:`LAYOUTS`. ``incremental``: rows whose object is
    unchanged since the finished dataset in ``directory`` are copied from it, not downloaded.

    ``progress(done, total)`` is called once with the rows already done, and returns an object
    with ``update(n)`` and ``close()`` (a tqdm bar fits). Raises :class:`CollectError` for bad
    input, the AWS error for failed requests, and ``KeyboardInterrupt``; in every case the rows
    written so far are kept for the next run.
    """
    location = parse_source(source)
    # Spelled with or without its trailing "/", the same prefix resumes the same collection.
    source, bucket, prefix = str(location), location.bucket, location.prefix
    directory.mkdir(parents=True, exist_ok=True)
    partial = _Partial(directory)
    if restart:
        partial.remove()
    fresh = 0
    reused = dropped = 0
    if partial.exists():
        meta, keys, done = partial.load()
        if meta.get("source") != source:
            raise CollectError(
                f"{directory} holds an interrupted collection of {meta.get('source')}; "
                f"collect into another directory, or pass --restart to discard it"
            )
        begun = meta.get("layout", "files")
        if layout not in ("auto", begun):
            raise CollectError(
                f"{directory} holds an interrupted collection with --layout {begun}; rerun with "
                "it, or pass --restart to discard it"
            )
    else:
        listing = list_prefix(s3, bucket, prefix)
        chosen = choose_layout(listing, layout, source)
        keys, metas = _plan(s3, bucket, prefix, chosen, listing, concurrency)
        if not keys:
            raise CollectError(f"no .npy files under {source}")
        done = {}
        previous = _previous(directory, source) if incremental else None
        reuse: list[tuple[int, int]] = []  # (new row, old row)
        entries: dict[int, dict[str, Any]] = {}  # old row -> its index entry
        if previous is not None:
            for row, planned in enumerate(keys):
                hit = previous.rows.get((_name(planned), _listed_object(planned, listing)))
                if hit is not None:
                    reuse.append((row, hit[0]))
                    entries[hit[0]] = hit[1]
            names = {_name(planned) for planned in keys}
            dropped = sum(1 for name in previous.names if name not in names)
        head = keys[0]
        # The settings come from the first row, as a full collect's: the previous dataset's
        # when that row is reused with its fingerprint (a fingerprint names the settings).
        settings = None
        if previous is not None and reuse and reuse[0][0] == 0 and isinstance(head, str):
            if entries[reuse[0][1]]["fingerprint"] == previous.settings["fingerprint"]:
                settings = previous.settings
            else:
                reuse.pop(0)
        reused = len(reuse)

        def fill(array: np.memmap[Any, Any]) -> None:
            if previous is not None and reuse:
                if array.shape[1:] != previous.row_shape:
                    raise CollectError(
                        f"{directory}'s rows have shape {previous.row_shape}, {source}'s "
                        f"{array.shape[1:]}: collect without --incremental"
                    )
                _copy_rows(previous, array, reuse, partial, done, entries)

        extra = {"reused": reused, "dropped": dropped}
        if settings is not None:
            meta = partial.start(
                source,
                keys,
                previous.row_shape if previous is not None else (),
                np.dtype(previous.dtype if previous is not None else "float32"),
                {},
                chosen,
                extra,
                fill,
                settings,
            )
        elif isinstance(head, str):
            first = download(s3, bucket, head, 0)
            _check_metadata(first)
            meta = partial.start(
                source,
                keys,
                first.array.shape,
                first.array.dtype,
                first.metadata,
                chosen,
                extra,
                fill,
            )
            _write_row(partial, [first], done)
            fresh = 1
        else:
            shard_meta = metas[head["shard"]]
            meta = partial.start(
                source,
                keys,
                _shape(shard_meta.get(SHAPE, "")),
                np.dtype(shard_meta.get(DTYPE, "float32")),
                {**shard_meta, FINGERPRINT: head["entry"]["fingerprint"]},
                chosen,
                extra,
                fill,
            )

    reference = meta["settings"]["fingerprint"]
    row_shape = tuple(meta["row_shape"])
    fingerprints: Counter[str] = Counter(entry["fingerprint"] for entry in done.values())
    reused = int(meta.get("reused", 0))
    dropped = int(meta.get("dropped", 0))
    resumed = len(done) - fresh - reused
    if not allow_mixed:
        _refuse_mixed(fingerprints, reference, done)
        _refuse_mixed_shards(keys, reference)

    array = np.lib.format.open_memmap(partial.array_path, mode="r+")
    todo = [row for row in range(len(keys)) if row not in done]
    bar = progress(len(done), len(keys)) if progress is not None else None
    pending: list[dict[str, Any]] = []
    downloaded = fresh

    def checkpoint() -> None:
        # The data first, durably; only then the journal lines that say it is there.
        array.flush()
        partial.append(pending)
        pending.clear()

    try:
        with closing(_fetch_all(s3, bucket, keys, todo, concurrency)) as items:
            for item in items:
                _check_metadata(item)
                where = item.where or f"s3://{bucket}/{item.key}"
                if item.array.shape != row_shape:
                    raise CollectError(
                        f"{where} has shape {item.array.shape}, the others "
                        f"{row_shape}: features of different shapes cannot be stacked"
                    )
                entry = item.entry()
                fingerprint = entry["fingerprint"]
                if fingerprint != reference and not allow_mixed:
                    raise CollectError(
                        f"mixed fingerprints: {where} has {fingerprint}, "
                        f"{_name(keys[0])} has {reference} (different model settings); pass "
                        "--allow-mixed to collect both, or collect a prefix with one"
                    )
                array[item.row] = item.array
                fingerprints[fingerprint] += 1
                done[item.row] = entry
                pending.append(entry)
                downloaded += 1
                if bar is not None:
                    bar.update(1)
                if len(pending) >= CHECKPOINT_ROWS:
                    checkpoint()
    finally:
        checkpoint()
        if bar is not None:
            bar.close()

    _finish(partial, directory, meta, keys, done, fingerprints)
    return Result(
        count=len(keys),
        downloaded=downloaded,
        resumed=resumed,
        shape=(len(keys), *row_shape),
        dtype=np.dtype(meta["dtype"]).name,
        fingerprints=fingerprints,
        directory=directory,
        layout=meta.get("layout", "files"),
        shards=len({k["shard"] for k in keys if not isinstance(k, str)}),
        reused=reused,
        dropped=dropped,
    )


def _name(item: Item) -> str:
    """How messages name a row: a file's key, or a shard row's feature key."""
    return item if isinstance(item, str) else str(item["entry"]["feature_key"])


def _write_row(partial: _Partial, items: Sequence[Downloaded], done: dict[int, Any]) -> None:
    array = np.lib.format.open_memmap(partial.array_path, mode="r+")
    for item in items:
        array[item.row] = item.array
        done[item.row] = item.entry()
    array.flush()
    del array
    partial.append([done[item.row] for item in items])


def _check_metadata(item: Downloaded) -> None:
    if FINGERPRINT not in item.metadata:
        raise CollectError(
            f"{item.key} has no fingerprint metadata: not written by bottleneck-consumer?"
        )


def _refuse_mixed_shards(keys: Sequence[Item], reference: str) -> None:
    """Shard rows name their fingerprint in the index: a mix is found before any download."""
    for item in keys:
        if not isinstance(item, str) and item["entry"]["fingerprint"] != reference:
            raise CollectError(
                f"mixed fingerprints: {_name(item)} (row {item['row']} of {item['shard']}) has "
                f"{item['entry']['fingerprint']}, the first row {reference}; pass --allow-mixed "
                "to collect both"
            )


def _refuse_mixed(fingerprints: Counter[str], reference: str, done: Mapping[int, Any]) -> None:
    others = [fp for fp in fingerprints if fp != reference]
    if others:
        example = next(e["feature_key"] for e in done.values() if e["fingerprint"] == others[0])
        raise CollectError(
            f"mixed fingerprints: {example} has {others[0]}, the first file {reference}; "
            "pass --allow-mixed to collect both"
        )


def _units(keys: Sequence[Item], rows: Sequence[int]) -> list[list[int]]:
    """The downloads that bring ``rows`` in: one per file, one per shard (all its rows), in the
    order of each one's first row."""
    units: list[list[int]] = []
    by_shard: dict[str, list[int]] = {}
    for row in rows:
        item = keys[row]
        if isinstance(item, str):
            units.append([row])
        elif item["shard"] in by_shard:
            by_shard[item["shard"]].append(row)
        else:
            by_shard[item["shard"]] = [row]
            units.append(by_shard[item["shard"]])
    return units


def _fetch_all(
    s3: Any, bucket: str, keys: Sequence[Item], rows: Sequence[int], concurrency: int
) -> Generator[Downloaded, None, None]:
    """Downloads in the order of their first row, ``concurrency`` at a time (shards fewer), at
    most ``2 * concurrency`` held."""
    window: deque[Future[list[Downloaded]]] = deque()
    stop = threading.Event()
    if any(not isinstance(keys[row], str) for row in rows):
        concurrency = min(concurrency, SHARD_CONCURRENCY)

    def fetch(unit: list[int]) -> list[Downloaded]:
        if stop.is_set():
            raise CollectError("stopped")
        item = keys[unit[0]]
        if isinstance(item, str):
            return [download(s3, bucket, item, unit[0])]
        pairs = [(row, keys[row]) for row in unit]
        return download_shard(s3, bucket, item["shard"], pairs)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="collect") as pool:
        try:
            for unit in _units(keys, rows):
                window.append(pool.submit(fetch, unit))
                if len(window) > 2 * concurrency:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:
            stop.set()
            for future in window:
                future.cancel()


def _finish(
    partial: _Partial,
    directory: Path,
    meta: Mapping[str, Any],
    keys: Sequence[Item],
    done: Mapping[int, dict[str, Any]],
    fingerprints: Counter[str],
) -> None:
    """Write the index and the manifest, then move the three files into ``directory``."""
    missing = len(keys) - len(done)
    if missing:
        raise CollectError(f"{missing} rows are still missing")  # pragma: no cover
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in range(len(keys)):
        writer.writerow({column: done[row][column] for column in INDEX_COLUMNS})
    settings = dict(meta["settings"])
    manifest: dict[str, Any] = {
        "source": meta["source"],
        "model": settings["model"],
        "weights": settings["weights"],
        "pool": settings["pool"],
        "fingerprint": settings["fingerprint"],
        "dtype": np.dtype(meta["dtype"]).name,
        "shape": [len(keys), *meta["row_shape"]],
        "count": len(keys),
        "features": FEATURES,
        "index": INDEX,
        "index_columns": list(INDEX_COLUMNS),
        "layout": meta.get("layout", "files"),
    }
    if len(fingerprints) > 1:
        manifest["mixed"] = True
        manifest["fingerprints"] = dict(sorted(fingerprints.items()))
    objects = io.StringIO()
    writer = csv.DictWriter(objects, fieldnames=OBJECTS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in range(len(keys)):
        entry = done[row]
        writer.writerow(
            {"row": row, "feature_key": entry["feature_key"], "object": entry.get("object", "")}
        )
    _write_text(partial.dir / INDEX, buffer.getvalue())
    _write_text(partial.dir / OBJECTS, objects.getvalue())
    _write_text(partial.dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    # The manifest last: its presence says the others are complete. Until the first move the
    # previous dataset is whole (an interrupted --incremental run leaves it as it was).
    (directory / MANIFEST).unlink(missing_ok=True)
    os.replace(partial.array_path, directory / FEATURES)
    os.replace(partial.dir / INDEX, directory / INDEX)
    os.replace(partial.dir / OBJECTS, directory / OBJECTS)
    os.replace(partial.dir / MANIFEST, directory / MANIFEST)
    partial.remove()


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Gather per-image feature files into features.npy, index.csv and "
        "manifest.json. Rerun the same command to resume an interrupted run.",
    )
    parser.add_argument("source", help="s3://bucket/prefix/ of the feature files")
    parser.add_argument("-o", "--output", required=True, help="directory to write into")
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="collect files with different fingerprints (model settings) together",
    )
    parser.add_argument(
        "--concurrency", default="16", help="downloads in parallel (default 16, max 128)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard an interrupted run in the directory and list the prefix afresh",
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="auto (default): per-image files or shards, whichever the prefix holds (both is an "
        "error); files or shards: that one only; both: their union, a per-image file winning "
        "over a shard's row for the same image",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="update the dataset in the directory: download only the files (or shards) new or "
        "changed since it was collected, copy the unchanged rows from it, drop the rows of "
        "files gone (a directory without one: a full collect)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@dataclass(frozen=True, slots=True)
class Options:
    source: str
    output: Path
    allow_mixed: bool = False
    concurrency: int = 16
    restart: bool = False
    progress: bool = True
    layout: str = "auto"
    incremental: bool = False


def parse(argv: Sequence[str] | None) -> Options:
    """Parse and validate the command line; bad arguments exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_source(args.source)
    except CollectError as exc:
        parser.error(str(exc))
    try:
        concurrency = int(args.concurrency)
    except ValueError:
        parser.error(f"--concurrency must be a whole number, got {args.concurrency!r}")
    if not 1 <= concurrency <= 128:
        parser.error(f"--concurrency must be between 1 and 128, got {concurrency}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} exists and is not a directory")
    return Options(
        source=args.source,
        output=output,
        allow_mixed=args.allow_mixed,
        concurrency=concurrency,
        restart=args.restart,
        progress=not args.no_progress,
        layout=args.layout,
        incremental=args.incremental,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    options = parse(argv)
    import boto3
    import botocore.config

    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=options.concurrency + 4,
    )
    s3 = boto3.session.Session().client("s3", config=config)
    return run(options, s3=s3)


def run(
    options: Options, *, s3: Any, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run the validated command with the given client; returns the exit status."""
    import botocore.exceptions

    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def bar(done: int, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=done,
            desc="collected",
            unit="file",
            file=err,
            disable=not options.progress or None,
            dynamic_ncols=True,
        )

    try:
        # A root of several versions (<model>/<fingerprint>/ folders) mixes models: name one.
        versions = find_versions(s3, OutputTemplate(parse_source(options.source)))
        if len(versions.found) > 1:
            err.write(
                f"{PROG}: error: {versions.root} holds {len(versions.found)} versions "
                f"(<model>/<fingerprint>): {', '.join(versions.labels)}; collect one, such as "
                f"{versions.found[0]}\n"
            )
            return EXIT_USAGE
        # A root of one version is that version: its shards' keys are read relative to it.
        source = str(versions.found[0]) if versions.found else options.source
        result = collect(
            s3,
            source,
            options.output,
            allow_mixed=options.allow_mixed,
            concurrency=options.concurrency,
            restart=options.restart,
            progress=bar,
            layout=options.layout,
            incremental=options.incremental,
        )
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted: rows written so far are kept; rerun to resume\n")
        return EXIT_INTERRUPTED
    except CollectError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILED
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        err.write(f"{PROG}: error: {code}: {exc} (rows written so far are kept; rerun)\n")
        return EXIT_FAILED
    except OSError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILED

    shape = "x".join(str(d) for d in result.shape)
    fps = ", ".join(f"{fp} ({n:,})" for fp, n in sorted(result.fingerprints.items()))
    how = f"{result.downloaded:,} downloaded"
    if result.resumed:
        how += f", {result.resumed:,} from the interrupted run"
    if options.incremental:
        how += f", {result.reused:,} reused, {result.dropped:,} dropped"
    what = "feature files" if result.layout == "files" else "rows"
    if result.shards:
        how += f"; {result.shards:,} shards"
    out.write(
        f"collected {result.count:,} {what} ({how}) into {result.directory}/\n"
        f"  {FEATURES:<14} {shape} {result.dtype} (np.load(path, mmap_mode='r'))\n"
        f"  {INDEX:<14} {', '.join(INDEX_COLUMNS)}\n"
        f"  {MANIFEST:<14} fingerprint {fps}\n"
    )
    out.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
