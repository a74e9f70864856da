"""The backfill's pure parts, no AWS: the merge-join with the output listing, runs in key order,
the manifest readers' rows, and the fan-in that joins reading threads to the sending one."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from bottleneck_contract.locations import S3Location
from bottleneck_tools import enqueue
from bottleneck_tools.backfill import (
    SKIP_EXISTS,
    Listed,
    in_feature_order,
    key_order_runs,
    without_features,
)
from bottleneck_tools.fanin import FanIn, Stopped
from bottleneck_tools.manifest import (
    SKIP_DELETE_MARKER,
    SKIP_NOT_LATEST,
    SKIP_ORPHAN,
    SKIP_OTHER_BUCKET,
    InventoryManifest,
    ManifestError,
    csv_rows,
    key_list_rows,
    merge_adjacent,
    parse_inventory_manifest,
    reconcile_rows,
    table_rows,
)


def _listing(keys: list[str]) -> list[Listed]:
    # S3 lists in UTF-8 byte order, which is code point order for str.
    return [Listed(k) for k in sorted(keys, key=lambda k: k.encode())]


def test_feature_order_handles_keys_that_prefix_one_another() -> None:
    # GIVEN keys where appending ".npy" changes their order ("a.jpg" < "a.jpg (1).jpg" but
    # "a.jpg.npy" > "a.jpg (1).jpg.npy")
    keys = ["a.jpg", "a.jpg (1).jpg", "a.jpg-2.jpg", "a.jpg.jpg", "b.png", "a", "a b"]
    # WHEN the listing is re-sorted
    got = [o.key for o in in_feature_order(_listing(keys))]
    # THEN it is in feature-key order
    assert [k + ".npy" for k in got] == sorted(k + ".npy" for k in keys)


def test_feature_order_on_random_keys() -> None:
    rng = random.Random(7)
    alphabet = "ab .-_(1)é"
    keys = list(
        {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(400)}
    )
    got = [o.key for o in in_feature_order(_listing(keys))]
    assert [k + ".npy" for k in got] == sorted(k + ".npy" for k in keys)


def test_without_features_skips_exactly_the_images_with_a_feature_file() -> None:
    # GIVEN images and the feature files of some of them (plus one orphan feature file)
    images = _listing(["x.jpg", "x.jpg (1).jpg", "y.png", "z z.jpg", "é.jpg"])
    features = sorted(["x.jpg.npy", "z z.jpg.npy", "orphan.jpg.npy", "é.jpg.npy"])
    skipped: Counter[str] = Counter()
    # WHEN the two listings are joined
    kept = [o.key for o in without_features(images, features, skipped)]
    # THEN only images without a feature file remain, and the rest are counted
    assert sorted(kept) == ["x.jpg (1).jpg", "y.png"]
    assert skipped == Counter({SKIP_EXISTS: 3})


def test_without_features_with_no_feature_files_keeps_everything() -> None:
    skipped: Counter[str] = Counter()
    kept = list(without_features(_listing(["a.jpg", "b.jpg"]), [], skipped))
    assert [o.key for o in kept] == ["a.jpg", "b.jpg"]
    assert not skipped


# ---------------------------------------------------------------------------- key order runs


def test_key_order_runs_split_where_the_order_breaks() -> None:
    # GIVEN a stream in key order except at two places (equal keys stay in one run)
    keys = ["b", "c", "c", "a", "d", "e", "e0", "0"]
    # WHEN it is split into runs
    runs = [[o.key for o in run] for run in key_order_runs(Listed(k) for k in keys)]
    # THEN each run is in order and together they are the stream
    assert runs == [["b", "c", "c"], ["a", "d", "e", "e0"], ["0"]]


def test_key_order_runs_of_a_run_left_unread() -> None:
    # A reader that stops early does not lose the next run's first key.
    starts = [next(iter(run)).key for run in key_order_runs(Listed(k) for k in "abcab")]
    assert starts == ["a", "a"]
    assert list(key_order_runs([])) == []


# ---------------------------------------------------------------------------- manifests


def _inventory(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "sourceBucket": "images",
        "destinationBucket": "arn:aws:s3:::inventory",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ETag",
        "files": [{"key": "inv/data/1.csv.gz", "size": 1, "MD5checksum": "x"}],
    }
    document.update(changes)
    return document


def test_an_inventory_manifest_names_its_data_files_and_columns() -> None:
    manifest = parse_inventory_manifest(_inventory())
    assert manifest == InventoryManifest(
        source_bucket="images",
        destination_bucket="inventory",
        file_format="CSV",
        files=("inv/data/1.csv.gz",),
        columns=("bucket", "key", "VersionId", "is_latest", "is_delete_marker", "size", "e_tag"),
    )
    # Parquet and ORC carry their own column names; the format is read in any case
    assert parse_inventory_manifest(_inventory(fileFormat="parquet")).file_format == "Parquet"


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"files": None}, "'files'"),
        ({"files": [{"size": 3}]}, "'files'"),
        ({"fileFormat": "JSON"}, "'fileFormat'"),
        ({"destinationBucket": ""}, "'destinationBucket'"),
        ({"sourceBucket": None}, "'sourceBucket'"),
        ({"fileSchema": None}, "'fileSchema'"),
        ({"fileSchema": "Bucket, Size"}, "Bucket and Key"),
    ],
)
def test_a_malformed_inventory_manifest_says_what_is_wrong(
    changes: dict[str, object], says: str
) -> None:
    with pytest.raises(ManifestError, match=says):
        parse_inventory_manifest(_inventory(**changes), "m.json")


COLUMNS = ("bucket", "key", "is_latest", "is_delete_marker", "size", "e_tag")


def test_inventory_csv_keys_are_url_decoded() -> None:
    # S3 Inventory CSV encodes keys like a form: spaces as "+", a real "+" as "%2B"
    records = [
        ["images", "photos/b+b.png", "true", "false", "3", "abc"],
        ["images", "photos/c%2Bd.jpg", "", "", "", ""],
        ["images", "photos/%C3%A9/%C3%BC.jpg", "true", "false", "4", '"q"'],
    ]
    rows = list(csv_rows(records, COLUMNS, "images"))
    assert rows == [
        Listed("photos/b b.png", "abc", 3),
        Listed("photos/c+d.jpg", None, None),
        Listed("photos/é/ü.jpg", "q", 4),
    ]


def test_inventory_rows_that_are_no_image_of_the_bucket() -> None:
    records = [
        ["images", "a.jpg", "false", "false", "3", "abc"],
        ["images", "b.jpg", "true", "true", "", ""],
        ["other", "c.jpg", "true", "false", "3", "abc"],
    ]
    assert list(csv_rows(records, COLUMNS, "images")) == [
        SKIP_NOT_LATEST,
        SKIP_DELETE_MARKER,
        SKIP_OTHER_BUCKET,
    ]
    with pytest.raises(ManifestError, match="row 1 has 2 fields"):
        list(csv_rows([["images", "a.jpg"]], COLUMNS, "images"))
    with pytest.raises(ManifestError, match="size 'big'"):
        list(csv_rows([["images", "a.jpg", "", "", "big", ""]], COLUMNS, "images"))


def test_columnar_rows_take_typed_values() -> None:
    columns: dict[str, list[object]] = {
        "bucket": ["images", "images"],
        "key": ["a b.jpg", "c.jpg"],
        "is_latest": [True, None],
        "is_delete_marker": [False, None],
        "size": [5, None],
        "e_tag": ["e", None],
    }
    assert list(table_rows(columns, "images", "t")) == [Listed("a b.jpg", "e", 5), Listed("c.jpg")]


def test_key_list_rows() -> None:
    lines = ["photos/a.jpg", "", "s3://images/photos/b.jpg", "s3://other/c.jpg", "  x y .jpg"]
    assert list(key_list_rows(lines, "images")) == [
        Listed("photos/a.jpg"),
        Listed("photos/b.jpg"),
        SKIP_OTHER_BUCKET,
        Listed("  x y .jpg"),
    ]
    with pytest.raises(ManifestError, match="names no object"):
        list(key_list_rows(["s3://images"], "images"))


def test_reconcile_rows_keep_the_images_and_the_richer_message() -> None:
    lines = [
        '{"kind": "stale-etag", "key": "a.jpg", "feature_key": "f/a.jpg.npy", "detail": ""}',
        '{"kind": "stale-fingerprint", "key": "a.jpg", "feature_key": "f/a.jpg.npy"}',
        '{"would": "enqueue", "message": {"bucket": "images", "key": "a.jpg", "etag": "e", '
        '"size": 3}}',
        '{"kind": "orphan", "key": "gone.jpg", "feature_key": "f/gone.jpg.npy"}',
        '{"kind": "missing", "key": "b.jpg", "feature_key": null, "detail": ""}',
        '{"would": "delete", "uri": "s3://feats/f/gone.jpg.npy"}',
        '{"summary": {"images": 2}}',
    ]
    rows = list(merge_adjacent(reconcile_rows(lines, "images")))
    # (a row is held until the next key shows; skip reasons pass at once)
    assert rows == [SKIP_ORPHAN, Listed("a.jpg", "e", 3), SKIP_ORPHAN, Listed("b.jpg")]
    with pytest.raises(ManifestError, match="line 1 is not a bottleneck-reconcile finding"):
        list(reconcile_rows(['{"kind": "surprise", "key": "a"}'], "images"))


# ---------------------------------------------------------------------------- fan-in


def test_fan_in_yields_what_every_task_emits_including_tasks_of_tasks() -> None:
    fan: FanIn[int] = FanIn(3, backlog=2, name="t")

    def parent(base: int) -> None:
        for child in range(3):
            fan.submit(lambda child=child: fan.emit(base + child))  # type: ignore[misc]
        fan.emit(base)

    for base in (100, 200):
        fan.submit(lambda base=base: parent(base))  # type: ignore[misc]
    got = sorted(fan.results())
    assert not fan.close()
    assert got == [100, 100, 101, 102, 200, 200, 201, 202]


def test_fan_in_raises_a_task_error_after_what_the_task_emitted() -> None:
    fan: FanIn[str] = FanIn(1, backlog=4, name="t")

    def fails() -> None:
        fan.emit("before")
        raise ValueError("boom")

    fan.submit(fails)
    got: list[str] = []

    def read_all() -> None:
        got.extend(fan.results())

    with pytest.raises(ValueError, match="boom"):
        read_all()
    assert not fan.close()
    assert got == ["before"]


def test_fan_in_close_stops_a_task_waiting_for_room() -> None:
    fan: FanIn[int] = FanIn(1, backlog=1, name="t")
    stopped = threading.Event()

    def endless() -> None:
        try:
            for i in range(10**9):
                fan.emit(i)
        except Stopped:
            stopped.set()
            raise

    fan.submit(endless)
    results = fan.results()
    assert next(results) == 0
    assert not fan.close()
    assert stopped.is_set()


def test_the_stacks_templated_output_is_read_as_its_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the stack's BOTTLENECK_OUTPUT, a template of versions
    environ = {
        "BOTTLENECK_QUEUE_URL": "https://sqs/q",
        "BOTTLENECK_OUTPUT": "s3://bkt/features/{model}/{fingerprint}/",
    }

    # WHEN enqueue parses it, THEN nothing under the root is ever enqueued
    options = enqueue.parse(["s3://bkt/"], environ)
    assert options.output == S3Location("bkt", "features/")

    # AND --skip-existing, which needs one version, says so in one line
    with pytest.raises(SystemExit) as raised:
        enqueue.parse(["s3://bkt/", "--skip-existing"], environ)
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "one version's prefix" in error and "\n" not in error
    options = enqueue.parse(
        [
            "s3://bkt/",
            "--skip-existing",
            "--output",
            "s3://bkt/features/resnet50/0123456789abcdef/",
        ],
        environ,
    )
    assert options.output == S3Location("bkt", "features/resnet50/0123456789abcdef/")
