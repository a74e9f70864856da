"""Backfills from a manifest instead of a listing (moto in-process): an S3 Inventory in CSV,
Parquet and ORC, a key list, and ``bottleneck-reconcile --json`` output."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import ImageRef
from bottleneck_tools import reconcile
from bottleneck_tools.backfill import BackfillResult, run_backfill
from bottleneck_tools.manifest import (
    INVENTORY,
    KEY_LIST,
    PYARROW_HINT,
    RECONCILE,
    Manifest,
    ManifestError,
    open_manifest,
)
from producer_lambda.filters import KeyFilter
from tests.fakes import put_feature, put_image
from tests.moto_batch import REGION

SOURCE = S3Location("images", "photos/")
OUTPUT = S3Location("feats", "resnet50/")
CSV_SCHEMA = (
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
)
INVENTORY_PREFIX = "inventories/images/all-versions/"


@dataclass(frozen=True)
class InventoryRow:
    key: str
    size: int | None = 7
    etag: str | None = "0123abcd"
    bucket: str = "images"
    latest: bool = True
    delete_marker: bool = False


# The images that must be sent, with the ETag and size their messages must carry.
IMAGES = [
    InventoryRow("photos/a.jpg", 11, "aaaa1111"),
    InventoryRow("photos/b b.png", 12, "bbbb2222"),  # a space: "+" in Inventory CSV
    InventoryRow("photos/c+d.JPG", 13, "cccc3333"),  # a plus: "%2B"
    InventoryRow("photos/é/ü.webp", 14, "dddd4444"),  # UTF-8, percent-encoded
    InventoryRow("photos/deep/er/x,y.jpg", 15, "eeee5555-2"),  # a comma, a multipart ETag
]
# Rows that are not sent, and why.
DECOYS = [
    (InventoryRow("photos/a.jpg", 99, "old00000", latest=False), "not-latest"),
    (InventoryRow("photos/gone.jpg", None, None, delete_marker=True), "delete-marker"),
    (InventoryRow("photos/gone.jpg", 5, "gone0000", latest=False), "not-latest"),
    (InventoryRow("photos/notes.txt"), "suffix"),
    (InventoryRow("photos/empty.jpg", 0), "empty-object"),
    (InventoryRow("other/z.jpg"), "outside-input-prefix"),
    (InventoryRow("photos/a.jpg", bucket="elsewhere"), "other-bucket"),
]
ROWS = [IMAGES[0], DECOYS[0][0], *IMAGES[1:3], *(row for row, _ in DECOYS[1:]), *IMAGES[3:]]


def in_order(refs: Any) -> list[ImageRef]:
    return sorted(refs, key=lambda r: (r.key, r.etag or "", r.size or 0))


def expected_refs() -> list[ImageRef]:
    return in_order(ImageRef("images", r.key, etag=r.etag, size=r.size) for r in IMAGES)


def expected_skips() -> Counter[str]:
    return Counter(reason for _, reason in DECOYS)


def csv_data(rows: list[InventoryRow]) -> bytes:
    """An Inventory CSV data file as S3 writes it: gzip, no header, keys URL-encoded."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for r in rows:
        writer.writerow(
            [
                r.bucket,
                quote_plus(r.key, safe="/"),
                "v1",
                str(r.latest).lower(),
                str(r.delete_marker).lower(),
                "" if r.size is None else str(r.size),
                "2024-05-01T00:00:00.000Z",
                r.etag or "",
                "STANDARD",
            ]
        )
    return gzip.compress(text.getvalue().encode())


def table_data(rows: list[InventoryRow], file_format: str) -> bytes:
    """A Parquet or ORC data file with Inventory's column names (keys not encoded)."""
    import pyarrow as pa

    table = pa.table(
        {
            "bucket": [r.bucket for r in rows],
            "key": [r.key for r in rows],
            "version_id": ["v1"] * len(rows),
            "is_latest": [r.latest for r in rows],
            "is_delete_marker": [r.delete_marker for r in rows],
            "size": pa.array([r.size for r in rows], pa.int64()),
            "e_tag": [r.etag for r in rows],
            "storage_class": ["STANDARD"] * len(rows),
        }
    )
    sink = io.BytesIO()
    if file_format == "Parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    else:
        import pyarrow.orc as orc

        orc.write_table(table, sink)
    return sink.getvalue()


def put_inventory(
    s3: Any, rows: list[InventoryRow], file_format: str = "CSV", files: int = 2
) -> tuple[str, dict[str, Any]]:
    """Write an inventory of ``rows`` in ``files`` data files to bucket ``inventory``; returns
    the manifest's URI and the manifest document."""
    if "inventory" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="inventory")
    ending = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}[file_format]
    entries = []
    for i in range(files):
        share = rows[i::files]
        body = csv_data(share) if file_format == "CSV" else table_data(share, file_format)
        key = f"{INVENTORY_PREFIX}data/part-{i}.{ending}"
        s3.put_object(Bucket="inventory", Key=key, Body=body)
        entries.append({"key": key, "size": len(body), "MD5checksum": "0" * 32})
    document: dict[str, Any] = {
        "sourceBucket": "images",
        "destinationBucket": "arn:aws:s3:::inventory",
        "version": "2016-11-30",
        "creationTimestamp": "1714521600000",
        "fileFormat": file_format,
        "files": entries,
    }
    if file_format == "CSV":
        document["fileSchema"] = CSV_SCHEMA
    else:
        document["fileSchema"] = "message s3.inventory { required binary bucket (STRING); ... }"
    key = f"{INVENTORY_PREFIX}2024-05-01T00-00Z/manifest.json"
    s3.put_object(Bucket="inventory", Key=key, Body=json.dumps(document, indent=2).encode())
    return f"s3://inventory/{key}", document


@pytest.fixture
def clients(aws: None) -> tuple[Any, Any, str]:
    s3 = boto3.client("s3", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    s3.create_bucket(Bucket="images")
    s3.create_bucket(Bucket="feats")
    return s3, sqs, sqs.create_queue(QueueName="work")["QueueUrl"]


def dry_run(s3: Any, manifest: Manifest, **kwargs: Any) -> tuple[BackfillResult, list[ImageRef]]:
    selected: list[ImageRef] = []
    result = run_backfill(
        s3=s3,
        sqs=None,
        source=SOURCE,
        queue_url=None,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix, output=OUTPUT),
        dry_run=True,
        on_selected=selected.append,
        list_concurrency=kwargs.pop("list_concurrency", 4),
        manifest=manifest,
        **kwargs,
    )
    return result, selected


def queued(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while got := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [json.loads(m["Body"]) for m in got]
    return bodies


def count_list_calls(s3: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    s3.meta.events.register(
        "provide-client-params.s3.ListObjectsV2", lambda params, **_: calls.append(dict(params))
    )
    return calls


# ---------------------------------------------------------------------------- S3 Inventory


def test_a_csv_inventory_sends_exactly_its_images(clients: tuple[Any, Any, str]) -> None:
    # GIVEN a CSV inventory of all versions, in two gzip data files
    s3, sqs, queue_url = clients
    uri, _ = put_inventory(s3, ROWS)
    calls = count_list_calls(s3)
    manifest = open_manifest(uri, s3, "images")
    assert (manifest.kind, len(manifest.parts)) == (INVENTORY, 2)
    # WHEN the backfill sends what it lists
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=SOURCE,
        queue_url=queue_url,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix),
        list_concurrency=2,
        manifest=manifest,
    )
    # THEN exactly the latest image versions under the prefix are sent, keys decoded, with the
    # inventory's ETag and size, and nothing was listed
    bodies = queued(sqs, queue_url)
    assert in_order(ImageRef(**b) for b in bodies) == expected_refs()
    assert (result.listed, result.selected, result.sent, result.not_sent) == (
        len(ROWS),
        len(IMAGES),
        len(IMAGES),
        0,
    )
    assert result.skipped == expected_skips()
    assert (result.error, result.interrupted) == (None, False)
    assert calls == []


@pytest.mark.parametrize("file_format", ["Parquet", "ORC"])
def test_a_columnar_inventory_sends_exactly_its_images(
    clients: tuple[Any, Any, str], file_format: str
) -> None:
    s3, _, _ = clients
    uri, _ = put_inventory(s3, ROWS, file_format, files=3)
    result, selected = dry_run(s3, open_manifest(uri, s3, "images"))
    assert in_order(selected) == expected_refs()
    assert result.skipped == expected_skips()
    assert result.listed == len(ROWS)


def test_a_local_manifest_reads_its_data_files_from_the_destination_bucket(
    clients: tuple[Any, Any, str], tmp_path: Path
) -> None:
    s3, _, _ = clients
    _, document = put_inventory(s3, ROWS)
    local = tmp_path / "manifest.json"
    local.write_text(json.dumps(document))  # one line, as well as indented
    _, selected = dry_run(s3, open_manifest(str(local), s3, "images"))
    assert in_order(selected) == expected_refs()


def test_data_files_are_read_in_parallel(clients: tuple[Any, Any, str]) -> None:
    # GIVEN an inventory in 3 data files, whose first two reads can only complete together
    s3, _, _ = clients
    uri, document = put_inventory(s3, ROWS, files=3)
    data_keys = {f["key"] for f in document["files"]}
    barrier = threading.Barrier(2, timeout=10)
    turns = iter(range(2))
    lock = threading.Lock()

    def meet(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] in data_keys:
            with lock:
                turn = next(turns, None)
            if turn is not None:
                barrier.wait()

    s3.meta.events.register("provide-client-params.s3.GetObject", meet)
    # WHEN it is read by 3 threads THEN both reads got past the barrier and nothing was lost
    result, selected = dry_run(s3, open_manifest(uri, s3, "images"), list_concurrency=3)
    assert not barrier.broken
    assert in_order(selected) == expected_refs()
    assert result.error is None


def test_skip_existing_with_an_inventory(clients: tuple[Any, Any, str]) -> None:
    # GIVEN feature files for two of the images
    s3, _, _ = clients
    for row in IMAGES[1:3]:
        put_feature(s3, OUTPUT.prefix, row.key, etag=row.etag or "")
    uri, _ = put_inventory(s3, sorted(ROWS, key=lambda r: r.key), files=1)
    calls = count_list_calls(s3)
    result, selected = dry_run(s3, open_manifest(uri, s3, "images"), existing=OUTPUT)
    # THEN the others are sent, and a data file in key order costs one output listing
    assert in_order(selected) == in_order(set(expected_refs()) - {_ref(r) for r in IMAGES[1:3]})
    assert result.skipped["feature-exists"] == 2
    assert [c["Prefix"] for c in calls] == [OUTPUT.prefix + SOURCE.prefix]


def test_a_corrupt_data_file_stops_the_run_with_an_error(clients: tuple[Any, Any, str]) -> None:
    s3, _, _ = clients
    uri, document = put_inventory(s3, ROWS, files=2)
    s3.put_object(Bucket="inventory", Key=document["files"][1]["key"], Body=b"not gzip at all")
    result, _ = dry_run(s3, open_manifest(uri, s3, "images"))
    assert result.error is not None
    assert result.error.startswith("reading the manifest failed: s3://inventory/")
    assert "\n" not in result.error


# ---------------------------------------------------------------------------- other sources


def test_a_key_list(clients: tuple[Any, Any, str], tmp_path: Path) -> None:
    # GIVEN a key list: keys relative to the bucket, s3:// URIs, a blank line, CRLF endings
    s3, sqs, queue_url = clients
    lines = [
        "photos/a.jpg",
        "s3://images/photos/b b.png",
        "",
        "s3://elsewhere/photos/c.jpg",
        "photos/c+d.JPG",
        "other/z.jpg",
        "photos/notes.txt",
        "photos/ leading space.jpg",
    ]
    path = tmp_path / "keys.txt"
    path.write_bytes("\r\n".join(lines).encode())
    manifest = open_manifest(str(path), s3, "images")
    assert manifest.kind == KEY_LIST
    result = run_backfill(
        s3=s3,
        sqs=sqs,
        source=SOURCE,
        queue_url=queue_url,
        key_filter=KeyFilter(input_prefix=SOURCE.prefix),
        manifest=manifest,
    )
    # THEN the images under the prefix are sent, by key alone (a list has no ETag or size)
    assert sorted(b["key"] for b in queued(sqs, queue_url)) == [
        "photos/ leading space.jpg",
        "photos/a.jpg",
        "photos/b b.png",
        "photos/c+d.JPG",
    ]
    assert result.skipped == Counter({"other-bucket": 1, "outside-input-prefix": 1, "suffix": 1})


def test_skip_existing_with_a_key_list_out_of_order(
    clients: tuple[Any, Any, str], tmp_path: Path
) -> None:
    # GIVEN a key list in no order, two of whose images have feature files
    s3, _, _ = clients
    keys = ["photos/m.jpg", "photos/b.jpg", "photos/z.jpg", "photos/a.jpg", "photos/a.jpg (1).jpg"]
    for key in ["photos/b.jpg", "photos/a.jpg"]:
        put_feature(s3, OUTPUT.prefix, key, etag="e")
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(keys) + "\n")
    calls = count_list_calls(s3)
    result, selected = dry_run(s3, open_manifest(str(path), s3, "images"), existing=OUTPUT)
    # THEN exactly the others are sent; each run in key order cost one output listing
    assert sorted(r.key for r in selected) == [
        "photos/a.jpg (1).jpg",
        "photos/m.jpg",
        "photos/z.jpg",
    ]
    assert result.skipped["feature-exists"] == 2
    assert [c["StartAfter"] for c in calls] == [
        "resnet50/photos/m.jpg",
        "resnet50/photos/b.jpg",
        "resnet50/photos/a.jpg",
    ]


@pytest.fixture
def reconciled(clients: tuple[Any, Any, str]) -> dict[str, str]:
    """Images against feature files: one current, one missing, one stale (re-uploaded), one
    orphan; returns the ETags of the images."""
    s3, _, _ = clients
    etags = {}
    for name in ["ok.jpg", "new.jpg", "changed.jpg"]:
        etags[name] = put_image(s3, f"photos/{name}", name.encode())
    put_feature(s3, OUTPUT.prefix, "photos/ok.jpg", etag=etags["ok.jpg"])
    put_feature(s3, OUTPUT.prefix, "photos/changed.jpg", etag="first-upload")
    put_feature(s3, OUTPUT.prefix, "photos/gone.jpg", etag="e")
    return etags


def reconcile_output(s3: Any, tmp_path: Path, *extra: str) -> Path:
    out = io.StringIO()
    argv = [str(SOURCE), "--output", str(OUTPUT), "--json", *extra]
    reconcile.run(reconcile.parse(argv, {}), s3=s3, stdout=out, stderr=io.StringIO())
    path = tmp_path / "findings.jsonl"
    path.write_text(out.getvalue())
    return path


def test_reconcile_json_output(
    clients: tuple[Any, Any, str], reconciled: dict[str, str], tmp_path: Path
) -> None:
    # GIVEN bottleneck-reconcile --json's findings: missing, stale-etag, orphan, the summary
    s3, _, _ = clients
    path = reconcile_output(s3, tmp_path)
    manifest = open_manifest(str(path), s3, "images")
    assert manifest.kind == RECONCILE
    # WHEN they are the backfill's keys
    result, selected = dry_run(s3, manifest)
    # THEN the missing and the stale image are sent, the orphan is not
    assert sorted(r.key for r in selected) == ["photos/changed.jpg", "photos/new.jpg"]
    assert result.skipped == Counter({"orphan": 1})


def test_reconcile_fix_dry_run_output_keeps_the_messages(
    clients: tuple[Any, Any, str], reconciled: dict[str, str], tmp_path: Path
) -> None:
    # GIVEN the plan of reconcile --fix --dry-run --json: its messages carry ETag and size
    s3, _, _ = clients
    path = reconcile_output(s3, tmp_path, "--fix", "--dry-run")
    _, selected = dry_run(s3, open_manifest(str(path), s3, "images"))
    # THEN the backfill sends those very messages, each image once
    assert in_order(selected) == in_order(
        ImageRef("images", f"photos/{name}", etag=reconciled[name], size=len(name))
        for name in ["changed.jpg", "new.jpg"]
    )


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"files": [', "not valid JSON"),
        ('{\n  "fileFormat": "CSV",\n  "files": "nope"\n}', "'files' must be a list"),
        ('{"fileFormat": "XLS", "files": []}', "'fileFormat' must be CSV, Parquet or ORC"),
        (
            '{"sourceBucket": "images", "destinationBucket": "inv", "fileFormat": "CSV", '
            '"files": [{"key": "a.csv.gz"}]}',
            "needs 'fileSchema'",
        ),
        (
            '{"sourceBucket": "images", "destinationBucket": "inv", "fileFormat": "CSV", '
            '"fileSchema": "Size, ETag", "files": []}',
            "must name Bucket and Key",
        ),
        (
            '{"sourceBucket": "other", "destinationBucket": "inv", "fileFormat": "Parquet", '
            '"files": []}',
            "inventory of bucket 'other'",
        ),
        ('{"hello": "world"}', "neither an S3 Inventory manifest"),
        ('{"kind": "missing", "key": "photos/a.jpg"}\n{oops\n', "line 2 is not JSON"),
    ],
)
def test_a_malformed_manifest_is_one_line(
    clients: tuple[Any, Any, str], tmp_path: Path, text: str, says: str
) -> None:
    s3, _, _ = clients
    path = tmp_path / "manifest.json"
    path.write_text(text)

    def read_all() -> None:
        manifest = open_manifest(str(path), s3, "images")
        for read in manifest.parts:  # a bad line of a stream is found as it is read
            list(read())

    with pytest.raises(ManifestError) as caught:
        read_all()
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parquet_without_pyarrow_says_what_to_install(
    clients: tuple[Any, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3, _, _ = clients
    uri, _ = put_inventory(s3, ROWS, "Parquet", files=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(ManifestError, match="needs pyarrow") as caught:
        open_manifest(uri, s3, "images")
    assert PYARROW_HINT in str(caught.value)


def _ref(row: InventoryRow) -> ImageRef:
    return ImageRef("images", row.key, etag=row.etag, size=row.size)
