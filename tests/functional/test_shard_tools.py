"""The tools and the delete path over ``--layout shards`` output, in moto.

Shards are written here as the consumer writes them (the contract's keys, the ``.npy`` first,
then the index that commits it), so that reconcile, status, collect and the delete handler read
exactly what a consumer leaves behind.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import Removal
from bottleneck_contract.shards import (
    INDEX_CONTENT_TYPE,
    TOMBSTONES,
    ShardIndex,
    ShardKey,
    ShardRow,
    Tombstone,
    decode_tombstones,
    encode_index,
    encode_tombstones,
    is_tombstone_key,
    live_rows,
    shard_keys,
    tombstone_key,
)
from bottleneck_tools import collect, reconcile, status
from producer_lambda.handler import handle
from producer_lambda.removals import TOMBSTONED, remove_all
from producer_lambda.settings import Settings
from tests.factories import eventbridge_s3_event, sqs_event
from tests.fakes import put_feature, put_image
from tests.functional.conftest import Stack

FP = "0123456789abcdef"
FP_OLD = "fedcba9876543210"
DIM = 4


def put_shard(
    s3: Any,
    prefix: str,
    rows: Sequence[tuple[str, str]],
    *,
    fingerprint: str = FP,
    seq: int = 0,
    commit: bool = True,
    bucket: str = "feats",
) -> ShardKey:
    """A shard of ``rows`` (source key, ETag) of images in bucket ``images``; row ``i`` holds
    ``i + 1 + 100 * seq`` everywhere. Without ``commit`` only its ``.npy`` (a failed flush)."""
    key = shard_keys(prefix, fingerprint, "host-1-abc123", seq)
    array = np.stack([np.full(DIM, i + 1 + 100 * seq, np.float32) for i in range(len(rows))])
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    metadata = {
        "model": "resnet50",
        "weights": "random",
        "pool": "avg",
        "head": "drop",
        "normalize": "none",
        "shape": str(DIM),
        "dtype": "float32",
        "fingerprint": fingerprint,
        "rows": str(len(rows)),
    }
    s3.put_object(Bucket=bucket, Key=key.npy_key, Body=buffer.getvalue(), Metadata=metadata)
    if commit:
        index = encode_index(
            ShardRow(i, "images", k, etag, fingerprint) for i, (k, etag) in enumerate(rows)
        )
        s3.put_object(
            Bucket=bucket,
            Key=key.index_key,
            Body=index,
            Metadata=metadata,
            ContentType=INDEX_CONTENT_TYPE,
        )
    return key


def every_key(s3: Any, bucket: str = "feats") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def run_reconcile(stack: Stack, *argv: str) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    options = reconcile.parse(list(argv), {})
    sqs = stack.sqs if "--fix" in argv and "--dry-run" not in argv else None
    code = reconcile.run(
        options, s3=stack.s3, sqs=sqs, stdout=out, stderr=err, sleep=lambda _: None
    )
    assert err.getvalue() == ""
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return code, lines[:-1], lines[-1]["summary"]


def kinds(findings: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(f["kind"], f["key"]) for f in findings}


def drain(stack: Stack) -> list[str]:
    keys: list[str] = []
    while got := stack.sqs.receive_message(QueueUrl=stack.queue_url, MaxNumberOfMessages=10).get(
        "Messages"
    ):
        keys += [json.loads(m["Body"])["key"] for m in got]
    return sorted(keys)


@pytest.fixture
def mixed(stack: Stack) -> dict[str, str]:
    """GIVEN the whole images bucket against s3://feats/out/, holding per-image files AND shards
    (and the consumer's own objects): every combination of the two layouts."""
    s3 = stack.s3
    etags = {name: put_image(s3, f"photos/{name}.jpg") for name in "abcdef"}
    etags["e"] = put_image(s3, "photos/e.jpg", b"new bytes")
    put_feature(s3, "out/", "photos/a.jpg", etag=etags["a"], fingerprint=FP)  # file current
    put_feature(s3, "out/", "photos/e.jpg", etag="old", fingerprint=FP)  # file stale, row current
    put_feature(s3, "out/", "photos/f.jpg", etag="old", fingerprint=FP)  # file stale, row stale
    rows = [
        ("photos/a.jpg", "old"),  # row stale, file current: current
        ("photos/b.jpg", etags["b"]),  # row current
        ("photos/c.jpg", "old"),  # row stale: stale-etag
        ("photos/e.jpg", etags["e"]),
        ("photos/f.jpg", "old"),
        ("photos/gone.jpg", "x"),  # its image is gone: an orphan row
    ]
    put_shard(s3, "out/", rows)
    put_shard(s3, "out/", [("photos/d.jpg", etags["d"])], seq=1, commit=False)  # a failed flush
    s3.put_object(Bucket="feats", Key="out/_bottleneck/running/m", Body=b"")
    s3.put_object(Bucket="feats", Key=f"out/_bottleneck/content/{FP}/x.npy", Body=b"")
    return etags


def test_reconcile_never_takes_shard_objects_for_feature_files(
    stack: Stack, mixed: dict[str, str]
) -> None:
    # WHEN the whole bucket is reconciled against the output
    code, findings, summary = run_reconcile(
        stack, "s3://images/", "--output", "s3://feats/out/", "--json"
    )
    # THEN no shard, tombstone or _bottleneck object is an orphan or a feature file; an image is
    # current in either layout; the orphan row is reported
    assert code == 0
    assert kinds(findings) == {
        ("missing", "photos/d.jpg"),  # its only row never committed
        ("stale-etag", "photos/c.jpg"),
        ("stale-etag", "photos/f.jpg"),
        ("orphan-row", "photos/gone.jpg"),
    }
    assert summary["features"] == 3
    assert (summary["shards"], summary["shard_rows"], summary["orphan_rows"]) == (1, 6, 1)
    assert summary["expected_fingerprint"] == FP
    stale_c = next(f for f in findings if f["key"] == "photos/c.jpg")
    assert stale_c["feature_key"].endswith(".npy#2")


def test_reconcile_fix_deletes_no_shard_object_and_buries_orphan_rows(
    stack: Stack, mixed: dict[str, str], tmp_path: Path
) -> None:
    before = every_key(stack.s3)
    # WHEN --fix runs over the prefix holding shards
    code, _, summary = run_reconcile(
        stack,
        *("s3://images/", "--output", "s3://feats/out/", "--json", "--fix"),
        *("--queue-url", stack.queue_url, "--no-progress"),
    )
    # THEN nothing was deleted (no file is an orphan), missing and stale images were sent, and
    # the orphan row got a tombstone
    assert code == 0
    after = every_key(stack.s3)
    assert before <= after
    [tombstone] = after - before
    assert is_tombstone_key("out/", tombstone)
    assert drain(stack) == ["photos/c.jpg", "photos/d.jpg", "photos/f.jpg"]
    assert summary["fix"]["orphan"]["deleted"] == 0
    assert summary["fix"]["orphan-row"] == {
        "found": 1,
        "tombstoned": 1,
        "kept": {"image-exists": 0},
        "failed": 0,
        "not_done": 0,
    }
    body = stack.s3.get_object(Bucket="feats", Key=tombstone)["Body"].read()
    assert [(t.bucket, t.key) for t in decode_tombstones(body)] == [("images", "photos/gone.jpg")]
    # AND the next reconcile, and collect, no longer see the row
    _, findings, _ = run_reconcile(stack, "s3://images/", "--output", "s3://feats/out/", "--json")
    assert ("orphan-row", "photos/gone.jpg") not in kinds(findings)
    collect.collect(stack.s3, "s3://feats/out/", tmp_path, layout="shards")
    index = (tmp_path / "index.csv").read_text()
    assert "photos/gone.jpg" not in index and "photos/b.jpg" in index


def test_a_row_of_another_fingerprint_only_is_stale_fingerprint(stack: Stack) -> None:
    etag = put_image(stack.s3, "photos/a.jpg")
    put_shard(stack.s3, "out/", [("photos/a.jpg", etag)], fingerprint=FP_OLD)
    code, findings, _ = run_reconcile(
        stack, "s3://images/photos/", "--output", "s3://feats/out/", "--json", "--fingerprint", FP
    )
    assert code == 0
    assert kinds(findings) == {("stale-fingerprint", "photos/a.jpg")}


def test_status_counts_shards_rows_and_images_per_fingerprint(stack: Stack) -> None:
    # GIVEN two shards (one image twice: at-least-once delivery), a tombstoned image, a failed
    # flush, and one per-image file
    put_shard(stack.s3, "out/", [("a", "1"), ("b", "1"), ("gone", "1")])
    put_shard(stack.s3, "out/", [("b", "1")], seq=1)
    put_shard(stack.s3, "out/", [("c", "1")], seq=2, commit=False)
    later = datetime.now(UTC) + timedelta(hours=1)
    stack.s3.put_object(
        Bucket="feats",
        Key=tombstone_key("out/", later, "t1"),
        Body=encode_tombstones([Tombstone("images", "gone", later)]),
    )
    put_feature(stack.s3, "out/", "photos/z", etag="e")
    options = status.Options(queue_url=stack.queue_url, output=S3Location("feats", "out/"))
    # WHEN a sample is taken
    sample = status.take_sample(
        options, sqs=stack.sqs, s3=stack.s3, batch=None, dead_letter_url=None
    )
    # THEN the file is counted apart from the shards' objects, and the shards per fingerprint
    assert sample.features == 1
    doc = status.to_json(sample, None)
    assert doc["shards"] == {"": {FP: {"shards": 2, "rows": 4, "images": 2}}}
    text = status.render_text(sample, None, options)
    assert f"shards        {FP} 2 committed, 4 rows, 2 images" in text


# ---------------------------------------------------------------------------- deletes


OUTPUT = S3Location("feats", "resnet50/")


def deleted(key: str) -> dict[str, Any]:
    event = eventbridge_s3_event("images", key, detail_type="Object Deleted", version_id=None)
    event["detail"].update({"reason": "DeleteObject", "deletion-type": "Permanently Deleted"})
    return event


def collected_keys(stack: Stack, directory: Path) -> list[str]:
    collect.collect(stack.s3, f"s3://feats/{OUTPUT.prefix}", directory, restart=True)
    lines = (directory / "index.csv").read_text().splitlines()[1:]
    return [line.split(",")[2] for line in lines]


def test_a_deleted_images_row_is_dropped_and_a_second_delete_adds_no_harm(
    stack: Stack, tmp_path: Path
) -> None:
    # GIVEN two uploaded images computed into a shard
    settings = Settings(queue_url=stack.queue_url, output=OUTPUT, input_prefix="uploads/")
    keys = ["uploads/a.jpg", "uploads/b.jpg"]
    put_shard(stack.s3, OUTPUT.prefix, [(k, put_image(stack.s3, k)) for k in keys])
    assert collected_keys(stack, tmp_path) == keys
    # WHEN one is deleted and its event handled, twice (a redelivery)
    stack.s3.delete_object(Bucket="images", Key="uploads/a.jpg")
    for _ in range(2):
        event = sqs_event(deleted("uploads/a.jpg"))
        summary = handle(event, settings, sqs=stack.sqs, s3=stack.s3, batch=None)
        # THEN a tombstone says so, and collect no longer has its row
        assert summary["deletes"][TOMBSTONED] == 1
        assert summary["batchItemFailures"] == []
        assert collected_keys(stack, tmp_path) == ["uploads/b.jpg"]
    tombstones = [k for k in every_key(stack.s3) if is_tombstone_key(OUTPUT.prefix, k)]
    assert len(tombstones) == 2


def test_a_delete_of_an_image_that_exists_again_writes_no_tombstone(stack: Stack) -> None:
    put_shard(stack.s3, OUTPUT.prefix, [("uploads/a.jpg", put_image(stack.s3, "uploads/a.jpg"))])
    # (one outcome for the per-image file, one for the shards)
    outcomes = remove_all(stack.s3, OUTPUT, [Removal("images", "uploads/a.jpg")])
    assert [o.result for o in outcomes] == ["already-gone", "source-exists"]
    assert not [k for k in every_key(stack.s3) if TOMBSTONES in k]


def test_a_reupload_computed_after_the_delete_keeps_its_row(stack: Stack, tmp_path: Path) -> None:
    # GIVEN an image with a row, deleted, and the delete handled: its row is buried
    keys = ["uploads/a.jpg", "uploads/b.jpg"]
    put_shard(stack.s3, OUTPUT.prefix, [(k, put_image(stack.s3, k)) for k in keys])
    stack.s3.delete_object(Bucket="images", Key="uploads/a.jpg")
    _, outcome = remove_all(stack.s3, OUTPUT, [Removal("images", "uploads/a.jpg")])
    assert outcome.result == TOMBSTONED and is_tombstone_key(OUTPUT.prefix, outcome.feature_key)
    assert collected_keys(stack, tmp_path) == ["uploads/b.jpg"]
    # WHEN it is uploaded again and computed into a newer shard (LastModified has one-second
    # resolution: a real shard's flush takes longer than that)
    time.sleep(1.1)
    etag = put_image(stack.s3, "uploads/a.jpg", b"new bytes")
    put_shard(stack.s3, OUTPUT.prefix, [("uploads/a.jpg", etag)], seq=1)
    # THEN its new row stands
    assert collected_keys(stack, tmp_path) == keys
    assert f"uploads/a.jpg,{etag}" in (tmp_path / "index.csv").read_text()


def test_the_tombstone_rule_compares_with_the_shards_commit() -> None:
    at = datetime(2025, 1, 1, 12, tzinfo=UTC)
    key = shard_keys("p/", FP, "w", 0)
    row = ShardRow(0, "images", "a", "e", FP)
    shard = ShardIndex(key, at, (row,))
    before, after = at - timedelta(seconds=1), at + timedelta(seconds=1)
    assert live_rows([shard], [Tombstone("images", "a", after)]) == {}
    assert live_rows([shard], [Tombstone("images", "a", before)]) != {}
    assert live_rows([shard], [Tombstone("other", "a", after)]) != {}
    # (the latest delete of a key counts)
    assert (
        live_rows([shard], [Tombstone("images", "a", after), Tombstone("images", "a", before)])
        == {}
    )
    text = encode_tombstones([Tombstone("images", "a b/ü", at)])
    assert decode_tombstones(text) == [Tombstone("images", "a b/ü", at)]
    with pytest.raises(ValueError, match="line 1"):
        decode_tombstones(
            b'{"bucket": "images", "key": "a", "deleted_at": "2025-01-01T12:00:00"}\n'
        )


# ---------------------------------------------------------------------------- collect


def test_collect_from_a_root_of_one_version_collects_its_shards(
    stack: Stack, tmp_path: Path
) -> None:
    # GIVEN shards in the one version under a root
    version = f"features/resnet50/{FP}/"
    put_shard(stack.s3, version, [("photos/a.jpg", "1"), ("photos/b.jpg", "2")])
    # WHEN the root is collected
    options = collect.parse(["s3://feats/features/", "-o", str(tmp_path), "--no-progress"])
    out, err = io.StringIO(), io.StringIO()
    code = collect.run(options, s3=stack.s3, stdout=out, stderr=err)
    # THEN that version's rows are
    assert (code, err.getvalue()) == (0, "")
    assert "collected 2 rows" in out.getvalue()
    assert np.load(tmp_path / "features.npy").tolist() == [[1.0] * DIM, [2.0] * DIM]
