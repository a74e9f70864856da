"""``bottleneck-enqueue --manifest SOURCE``: the keys of a backfill from a file, not a listing.

SOURCE (a local path or an ``s3://`` URI) is one of three things, told apart by its first line:

* an S3 Inventory ``manifest.json`` (a JSON object with ``files``): its data files, in the
  inventory's destination bucket, are CSV (gzip), Parquet or ORC, each read as a stream by its
  own task, several at once. Parquet and ORC need pyarrow (the ``inventory`` extra) and are
  copied to a temporary file first (their footer comes last). CSV keys are URL-encoded by S3,
  spaces as ``+``. Rows for another bucket, delete markers and versions that are not the latest
  (``IsDeleteMarker``, ``IsLatest``: the optional fields of an inventory of all versions) are
  passed over and counted;
* ``bottleneck-reconcile --json`` output: one JSON object a line; ``missing`` and stale findings
  are images (sent by key alone: a finding has no ETag or size), orphans are not, the summary
  line is no row at all. With ``--fix --dry-run`` each finding acted on is followed by the
  message that would be sent, ETag and size included: that message is sent instead;
* a key list: one key a line, relative to the source bucket, or an ``s3://bucket/key`` URI.

The readers here turn rows into :class:`~bottleneck_tools.listing.Listed` objects (or the reason
a row is not one); which keys are images, under the prefix and not yet done is for the backfill
to decide, exactly as for a listing. A SOURCE that is not one of these is a :class:`ManifestError`
(one line), found before anything is sent.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from bottleneck_contract.locations import InvalidS3Uri, split_s3_uri
from bottleneck_tools.listing import Listed

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "INVENTORY",
    "KEY_LIST",
    "PYARROW_HINT",
    "RECONCILE",
    "SKIP_DELETE_MARKER",
    "SKIP_NOT_LATEST",
    "SKIP_ORPHAN",
    "SKIP_OTHER_BUCKET",
    "InventoryManifest",
    "Manifest",
    "ManifestError",
    "Row",
    "csv_rows",
    "key_list_rows",
    "merge_adjacent",
    "open_manifest",
    "parse_inventory_manifest",
    "reconcile_rows",
    "table_rows",
]

INVENTORY = "inventory"
RECONCILE = "reconcile"
KEY_LIST = "key-list"

SKIP_OTHER_BUCKET = "other-bucket"
SKIP_DELETE_MARKER = "delete-marker"
SKIP_NOT_LATEST = "not-latest"
SKIP_ORPHAN = "orphan"

PYARROW_HINT = "pip install 'serverless-bottleneck[inventory]'"
# A manifest.json lists data files, a few hundred bytes each: this is far beyond any real one.
MAX_MANIFEST_BYTES = 64 << 20
# The findings of bottleneck-reconcile that name an image to compute (again).
_RECONCILE_IMAGES = {"missing", "stale-etag", "stale-fingerprint"}
_FORMATS = {"csv": "CSV", "parquet": "Parquet", "orc": "ORC"}
# Parquet and ORC inventories name their columns in snake case; CSV ones in the fileSchema.
_CSV_COLUMNS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size",
    "ETag": "e_tag",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}
_TABLE_COLUMNS = tuple(_CSV_COLUMNS.values())
_ROWS_PER_BATCH = 10_000

# A Listed to consider, or the short word that says why a row is not one.
Row = Listed | str


class ManifestError(ValueError):
    """SOURCE is not a manifest this tool reads; the message is one line."""


@dataclass(frozen=True, slots=True)
class InventoryManifest:
    """What an S3 Inventory ``manifest.json`` says: where the data files are and their format.

    ``columns`` are the CSV columns in the canonical snake-case names (``bucket``, ``key``,
    ``size``, ``e_tag``, ``is_latest``, ``is_delete_marker``; others keep their own name);
    Parquet and ORC files carry their own.
    """

    source_bucket: str
    destination_bucket: str
    file_format: str
    files: tuple[str, ...]
    columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    """An opened SOURCE: its kind, and one reader per data file (each read on its own task).

    A reader closes what it reads; :meth:`close` closes what no reader will (a run given up).
    """

    kind: str
    name: str
    parts: tuple[Callable[[], Iterator[Row]], ...]
    closer: Callable[[], None] = lambda: None

    def close(self) -> None:
        """Close the SOURCE when its parts will not be read."""
        self.closer()


# ---------------------------------------------------------------------------- pure parts


def parse_inventory_manifest(document: object, name: str = "manifest") -> InventoryManifest:
    """Validate a parsed ``manifest.json``; a :class:`ManifestError` says what is wrong."""

    def bad(why: str) -> ManifestError:
        return ManifestError(f"{name} is not a valid S3 Inventory manifest: {why}")

    if not isinstance(document, Mapping):
        raise bad("not a JSON object")
    files = document.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, Mapping) and isinstance(f.get("key"), str) and f["key"] for f in files
    ):
        raise bad("'files' must be a list of objects with a 'key'")
    text_format = document.get("fileFormat")
    file_format = _FORMATS.get(str(text_format).lower()) if isinstance(text_format, str) else None
    if file_format is None:
        raise bad(f"'fileFormat' must be CSV, Parquet or ORC, got {text_format!r}")
    destination = document.get("destinationBucket")
    if not isinstance(destination, str) or not destination.strip():
        raise bad("'destinationBucket' is missing")
    source = document.get("sourceBucket")
    if not isinstance(source, str) or not source.strip():
        raise bad("'sourceBucket' is missing")
    columns: tuple[str, ...] = ()
    if file_format == "CSV":
        schema = document.get("fileSchema")
        if not isinstance(schema, str):
            raise bad("a CSV inventory needs 'fileSchema'")
        columns = tuple(_CSV_COLUMNS.get(c.strip(), c.strip()) for c in schema.split(","))
        if "bucket" not in columns or "key" not in columns:
            raise bad(f"'fileSchema' must name Bucket and Key, got {schema!r}")
    return InventoryManifest(
        source_bucket=source.strip(),
        # "arn:aws:s3:::bucket" in real manifests; a plain name is taken as it is.
        destination_bucket=destination.strip().rpartition(":")[2],
        file_format=file_format,
        files=tuple(f["key"] for f in files),
        columns=columns,
    )


def csv_rows(
    records: Iterable[Sequence[str]], columns: Sequence[str], bucket: str, name: str = "CSV"
) -> Iterator[Row]:
    """The rows of an Inventory CSV file (no header; ``columns`` from the fileSchema).

    Keys are URL-encoded in Inventory CSV (spaces as ``+``) and are decoded here.
    """
    where = {column: i for i, column in enumerate(columns)}
    for number, record in enumerate(records, 1):
        if not record:
            continue  # a blank line (files can end with one)
        if len(record) != len(columns):
            raise ManifestError(
                f"{name}: row {number} has {len(record)} fields, the fileSchema names "
                f"{len(columns)}"
            )
        values = {column: record[i] for column, i in where.items()}
        values["key"] = unquote_plus(values["key"])
        yield _row(values, bucket, f"{name}: row {number}")


def table_rows(columns: Mapping[str, Sequence[Any]], bucket: str, name: str) -> Iterator[Row]:
    """The rows of one batch of a Parquet or ORC inventory (its columns as lists)."""
    present = [c for c in _TABLE_COLUMNS if c in columns]
    count = len(columns["key"])
    for i in range(count):
        yield _row({c: columns[c][i] for c in present}, bucket, name)


def key_list_rows(lines: Iterable[str], bucket: str) -> Iterator[Row]:
    """A key list: one key a line, relative to ``bucket``, or an ``s3://bucket/key`` URI."""
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("s3://"):
            # Split by hand: split_s3_uri strips blanks, and a key may end with one.
            row_bucket, slash, key = line[len("s3://") :].partition("/")
            if not slash or not key:
                raise ManifestError(f"key list line {line!r} names no object")
            yield Listed(key) if row_bucket == bucket else SKIP_OTHER_BUCKET
        else:
            yield Listed(line)


def reconcile_rows(lines: Iterable[str], bucket: str, name: str = "reconcile") -> Iterator[Row]:
    """``bottleneck-reconcile --json`` lines: the missing and stale images, orphans passed over.

    A finding names its key only (the message then has no ETag or size); a ``--fix --dry-run``
    line carries the very message, ETag and size included.
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ManifestError(f"{name}: line {number} is not JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise ManifestError(f"{name}: line {number} is not a JSON object")
        if "summary" in entry:
            continue
        if "would" in entry:
            message = entry.get("message")
            if entry["would"] != "enqueue" or not isinstance(message, dict):
                yield SKIP_ORPHAN
                continue
            if message.get("bucket") != bucket:
                yield SKIP_OTHER_BUCKET
                continue
            yield Listed(
                _text(message.get("key"), f"{name}: line {number}: key"),
                etag=message.get("etag") or None,
                size=_size(message.get("size"), f"{name}: line {number}"),
            )
            continue
        kind = entry.get("kind")
        if kind in _RECONCILE_IMAGES:
            yield Listed(_text(entry.get("key"), f"{name}: line {number}: key"))
        elif kind == "orphan":
            yield SKIP_ORPHAN
        else:
            raise ManifestError(f"{name}: line {number} is not a bottleneck-reconcile finding")


def merge_adjacent(rows: Iterable[Row]) -> Iterator[Row]:
    """One row for neighbours with the same key, the one with an ETag if any.

    reconcile reports a file stale both ways as two findings, next to each other when it ran
    with ``--fingerprint``, and its ``--fix --dry-run`` plan follows each finding it acts on with
    the message it would send: that message (with ETag and size) is the one kept.
    """
    held: Listed | None = None
    for row in rows:
        if not isinstance(row, Listed):
            yield row
        elif held is not None and row.key == held.key:
            if held.etag is None and row.etag is not None:
                held = row
        else:
            if held is not None:
                yield held
            held = row
    if held is not None:
        yield held


def _row(values: Mapping[str, Any], bucket: str, where: str) -> Row:
    if values["bucket"] != bucket:
        return SKIP_OTHER_BUCKET
    if _flag(values.get("is_delete_marker")):
        return SKIP_DELETE_MARKER
    if values.get("is_latest") is not None and not _flag(values.get("is_latest"), True):
        return SKIP_NOT_LATEST
    etag = str(values.get("e_tag") or "").strip('"')
    return Listed(
        key=_text(values.get("key"), f"{where}: key"),
        etag=etag or None,
        size=_size(values.get("size"), where),
    )


def _flag(value: object, empty: bool = False) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value or "").strip().lower()
    return empty if not text else text == "true"


def _size(value: object, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: size {value!r} is not a number") from None


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where} is missing")
    return value


# ---------------------------------------------------------------------------- reading


def open_manifest(spec: str, s3: S3Client, bucket: str) -> Manifest:
    """Open SOURCE (a path or ``s3://`` URI) for the backfill of ``bucket``, telling its kind
    from its first line. A malformed SOURCE raises :class:`ManifestError`; one that cannot be
    read raises ``OSError`` (a path) or botocore's errors (a URI)."""
    stream = _open(spec, s3)
    try:
        first = _first_line(stream, spec)
        if first is None:
            stream.close()
            return Manifest(KEY_LIST, spec, (lambda: iter(()),))
        if not first.lstrip().startswith("{"):
            keys = lambda lines: key_list_rows(lines, bucket)  # noqa: E731
            return _single(KEY_LIST, spec, keys, first, stream)
        try:
            document = json.loads(first)
        except ValueError:
            document = _whole_document(first, stream, spec)
            stream.close()
            return _inventory(document, spec, s3, bucket)
        if isinstance(document, dict) and ("files" in document or "fileFormat" in document):
            _expect_end(stream, spec)
            stream.close()
            return _inventory(document, spec, s3, bucket)
        if isinstance(document, dict) and {"kind", "summary", "would"} & document.keys():
            return _single(
                RECONCILE,
                spec,
                lambda lines: merge_adjacent(reconcile_rows(lines, bucket, spec)),
                first,
                stream,
            )
        raise ManifestError(
            f"{spec} is neither an S3 Inventory manifest (no 'files') nor "
            "bottleneck-reconcile --json output"
        )
    except BaseException:
        stream.close()
        raise


def _open(spec: str, s3: S3Client) -> IO[bytes]:
    if spec.startswith("s3://"):
        try:
            manifest_bucket, key = split_s3_uri(spec, "--manifest")
        except InvalidS3Uri as exc:
            raise ManifestError(str(exc)) from None
        if not key:
            raise ManifestError(f"--manifest {spec} names a bucket, not an object")
        body = s3.get_object(Bucket=manifest_bucket, Key=key)["Body"]
        return io.BufferedReader(_RawReader(body), buffer_size=1 << 16)
    return Path(spec).open("rb")


def _first_line(stream: IO[bytes], name: str) -> str | None:
    """The first line that is not blank (a BOM dropped), or None for an empty SOURCE."""
    while True:
        raw = stream.readline(MAX_MANIFEST_BYTES)
        if not raw:
            return None
        line = _decode(raw, name).removeprefix("\ufeff")
        if line.strip():
            return line


def _whole_document(first: str, stream: IO[bytes], name: str) -> object:
    rest = stream.read(MAX_MANIFEST_BYTES)
    if stream.read(1):
        raise ManifestError(f"{name} is larger than any S3 Inventory manifest")
    try:
        return json.loads(first + _decode(rest, name))
    except ValueError as exc:
        raise ManifestError(f"{name} is not valid JSON: {exc}") from None


def _expect_end(stream: IO[bytes], name: str) -> None:
    if _first_line(stream, name) is not None:
        raise ManifestError(f"{name} has more after its JSON object")


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name} is not UTF-8 text: {exc}") from None


def _single(
    kind: str,
    name: str,
    rows: Callable[[Iterable[str]], Iterator[Row]],
    first: str,
    stream: IO[bytes],
) -> Manifest:
    """A SOURCE read as one stream of lines (by one task: there is nothing to split)."""

    def read() -> Iterator[Row]:
        with closing(stream):
            yield from rows(_lines(first, stream, name))

    return Manifest(kind, name, (read,), stream.close)


def _lines(first: str, stream: IO[bytes], name: str) -> Iterator[str]:
    yield first.removesuffix("\n").removesuffix("\r")
    # Lines end at b"\n", which is never inside a UTF-8 sequence: each decodes on its own.
    for number, raw in enumerate(stream, 2):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{name}: line {number} is not UTF-8: {exc}") from None
        yield line.removesuffix("\n").removesuffix("\r")


def _inventory(document: object, name: str, s3: S3Client, bucket: str) -> Manifest:
    inventory = parse_inventory_manifest(document, name)
    if inventory.source_bucket != bucket:
        raise ManifestError(
            f"{name} is the inventory of bucket {inventory.source_bucket!r}, "
            f"not of the source bucket {bucket!r}"
        )
    if inventory.file_format != "CSV":
        _require_pyarrow(inventory.file_format, name)
    parts = tuple(_data_file_reader(s3, inventory, key, bucket) for key in inventory.files)
    return Manifest(INVENTORY, name, parts)


def _require_pyarrow(file_format: str, name: str) -> None:
    try:
        import pyarrow  # noqa: F401  (only to know that it is there)
    except ImportError:
        raise ManifestError(
            f"{name} is a {file_format} inventory, which needs pyarrow: {PYARROW_HINT}"
        ) from None


def _data_file_reader(
    s3: S3Client, inventory: InventoryManifest, key: str, bucket: str
) -> Callable[[], Iterator[Row]]:
    name = f"s3://{inventory.destination_bucket}/{key}"

    def read() -> Iterator[Row]:
        body = s3.get_object(Bucket=inventory.destination_bucket, Key=key)["Body"]
        with closing(body):
            if inventory.file_format == "CSV":
                yield from _read_csv(body, key, inventory.columns, bucket, name)
            else:
                yield from _read_table(body, inventory.file_format, bucket, name)

    return read


def _read_csv(body: Any, key: str, columns: Sequence[str], bucket: str, name: str) -> Iterator[Row]:
    raw: IO[bytes] = io.BufferedReader(_RawReader(body), buffer_size=1 << 16)
    if key.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    try:
        yield from csv_rows(csv.reader(text), columns, bucket, name)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{name} cannot be read as gzip CSV: {exc}") from None


def _read_table(body: Any, file_format: str, bucket: str, name: str) -> Iterator[Row]:
    # Parquet and ORC keep their index at the end of the file: a local copy is read in batches
    # (Parquet) or stripes (ORC), so memory holds one batch, never the whole file.
    import pyarrow as pa

    with tempfile.TemporaryFile() as copy:
        shutil.copyfileobj(body, copy, 1 << 20)
        copy.seek(0)
        try:
            for batch in _table_batches(copy, file_format):
                columns = batch.to_pydict()
                if "key" not in columns or "bucket" not in columns:
                    raise ManifestError(f"{name} has no bucket and key columns")
                yield from table_rows(columns, bucket, name)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{name} cannot be read as {file_format}: {exc}") from None


def _table_batches(copy: IO[bytes], file_format: str) -> Iterator[Any]:
    if file_format == "Parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(copy)
        wanted = [c for c in _TABLE_COLUMNS if c in parquet.schema_arrow.names]
        yield from parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=wanted)
    else:
        import pyarrow.orc as orc

        table = orc.ORCFile(copy)
        wanted = [c for c in _TABLE_COLUMNS if c in table.schema.names]
        for stripe in range(table.nstripes):
            yield table.read_stripe(stripe, columns=wanted)


class _RawReader(io.RawIOBase):
    """A botocore streaming body as a raw stream, so that the standard buffered and text
    wrappers (``readline``, line iteration, gzip) read it as they would a file."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()
