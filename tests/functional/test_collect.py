"""``bottleneck-collect``: per-image feature files in moto S3 -> one memory-mappable dataset."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from bottleneck_contract.features import feature_metadata
from bottleneck_contract.shards import ShardKey, ShardRow, encode_index, parse_shard_key
from bottleneck_tools import collect
from tests import fakes

REGION = "us-east-1"
SOURCE = "s3://feats/resnet50/"
FP_A = "a" * 16
FP_B = "b" * 16
KEYS = [
    "dogs/2.jpg",
    "cats/1.jpg",
    "cats/1.jpg (1).jpg",
    "cats/10.jpg",
    "ünï/cödé 3.jpg",
    "dogs/1.jpg",
    "birds/a.png",
]


def put_feature(
    s3: Any, source_key: str, array: np.ndarray, fingerprint: str = FP_A, prefix: str = "resnet50/"
) -> None:
    fakes.put_feature(
        s3,
        prefix,
        source_key,
        etag=f"etag-{len(source_key)}",
        fingerprint=fingerprint,
        array=array,
    )


@pytest.fixture
def s3(aws: None) -> Any:
    """GIVEN seven feature files (D=5, float32) under feats/resnet50/, plus decoys."""
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket="feats")
    rng = np.random.default_rng(0)
    for key in KEYS:
        put_feature(client, key, rng.standard_normal(5).astype(np.float32))
    client.put_object(Bucket="feats", Key="resnet50/README.txt", Body=b"not a feature")
    put_feature(client, "cats/9.jpg", np.ones(5, np.float32), prefix="other/")
    return client


class CountingS3:
    """The moto client, counting GetObject calls; ``fail_at`` makes the n-th one raise."""

    def __init__(self, s3: Any, fail_at: int | None = None, error: BaseException | None = None):
        self.s3 = s3
        self.fail_at = fail_at
        self.error = error or RuntimeError("network gone")
        self.gets: list[str] = []

    def get_paginator(self, name: str) -> Any:
        return self.s3.get_paginator(name)

    def get_object(self, **kwargs: Any) -> Any:
        self.gets.append(kwargs["Key"])
        if self.fail_at is not None and len(self.gets) >= self.fail_at:
            raise self.error
        return self.s3.get_object(**kwargs)


def stored(s3: Any, key: str) -> np.ndarray:
    body = s3.get_object(Bucket="feats", Key=key)["Body"].read()
    return np.load(io.BytesIO(body), allow_pickle=False)


def read_index(directory: Path) -> list[dict[str, str]]:
    with (directory / "index.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def run(s3: Any, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = collect.run(collect.parse(argv), s3=s3, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_round_trip_n_files_to_one_array(s3: Any, tmp_path: Path) -> None:
    code, out, err = run(s3, [SOURCE, "-o", str(tmp_path), "--concurrency", "3"])
    assert (code, err) == (0, "")
    assert "collected 7 feature files (7 downloaded)" in out

    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert isinstance(features, np.memmap)
    assert features.shape == (7, 5)
    assert features.dtype == np.float32
    rows = read_index(tmp_path)
    feature_keys = [row["feature_key"] for row in rows]
    assert feature_keys == sorted(f"resnet50/{k}.npy" for k in KEYS)
    assert [int(row["row"]) for row in rows] == list(range(7))
    for row in rows:
        assert row["source_key"] == row["feature_key"][len("resnet50/") : -len(".npy")]
        assert row["source_bucket"] == "images"
        assert row["fingerprint"] == FP_A
        np.testing.assert_array_equal(
            features[int(row["row"])], stored(s3, row["feature_key"]), strict=True
        )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"] == "resnet50"
    assert manifest["weights"] == "s3://models/r50.safetensors"
    assert manifest["pool"] == "avg"
    assert manifest["fingerprint"] == FP_A
    assert manifest["dtype"] == "float32"
    assert manifest["shape"] == [7, 5]
    assert manifest["count"] == 7
    assert "mixed" not in manifest
    assert not (tmp_path / collect.PARTIAL).exists()


def test_mixed_fingerprints_are_refused_unless_allowed(s3: Any, tmp_path: Path) -> None:
    put_feature(s3, "cats/new-model.jpg", np.zeros(5, np.float32), fingerprint=FP_B)
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path / "strict")])
    assert code == 1
    assert err.count("\n") == 1
    assert "mixed fingerprints" in err
    assert "--allow-mixed" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()

    # The rows already written are kept: --allow-mixed finishes the same run.
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path / "strict"), "--allow-mixed"])
    assert (code, err) == (0, "")
    manifest = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert manifest["mixed"] is True
    assert manifest["fingerprints"] == {FP_A: 7, FP_B: 1}
    index = read_index(tmp_path / "strict")
    assert {row["fingerprint"] for row in index} == {FP_A, FP_B}


@pytest.mark.parametrize("error", [RuntimeError("network gone"), KeyboardInterrupt()])
def test_resume_after_interruption_downloads_only_the_rest(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    monkeypatch.setattr(collect, "CHECKPOINT_ROWS", 2)
    reference = tmp_path / "reference"
    assert run(s3, [SOURCE, "-o", str(reference), "--concurrency", "1"])[0] == 0

    # WHEN the fifth download fails
    target = tmp_path / "resumed"
    flaky = CountingS3(s3, fail_at=5, error=error)
    if isinstance(error, KeyboardInterrupt):
        code, _, err = run(flaky, [SOURCE, "-o", str(target), "--concurrency", "1"])
        assert code == 130
        assert "rerun to resume" in err
    else:
        with pytest.raises(RuntimeError, match="network gone"):
            collect.collect(flaky, SOURCE, target, concurrency=1)
    journal = (target / collect.PARTIAL / "done.jsonl").read_text().splitlines()
    assert len(journal) == 4
    assert not (target / "manifest.json").exists()

    # THEN a rerun fetches only the three rows not done, and writes the same bytes
    counting = CountingS3(s3)
    code, out, err = run(counting, [SOURCE, "-o", str(target), "--concurrency", "2"])
    assert (code, err) == (0, "")
    assert "(3 downloaded, 4 from the interrupted run)" in out
    assert sorted(counting.gets) == sorted(f"resnet50/{k}.npy" for k in KEYS)[4:]
    for name in ("features.npy", "index.csv", "manifest.json"):
        assert (target / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_torn_journal_line_is_done_again(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        collect.collect(CountingS3(s3, fail_at=7), SOURCE, tmp_path, concurrency=1)
    journal = tmp_path / collect.PARTIAL / "done.jsonl"
    journal.write_text(journal.read_text() + '{"row": 6, "sou')
    assert collect.collect(s3, SOURCE, tmp_path).count == 7
    assert len(read_index(tmp_path)) == 7


def test_rerun_into_a_directory_of_another_source_is_refused(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        collect.collect(CountingS3(s3, fail_at=3), SOURCE, tmp_path, concurrency=1)
    code, _, err = run(s3, ["s3://feats/resnet50/cats/", "-o", str(tmp_path)])
    assert code == 1
    assert "interrupted collection of s3://feats/resnet50/" in err
    code, out, _ = run(s3, ["s3://feats/resnet50/cats/", "-o", str(tmp_path), "--restart"])
    assert code == 0
    assert "collected 3 feature files" in out


def test_different_shapes_cannot_be_stacked(s3: Any, tmp_path: Path) -> None:
    put_feature(s3, "zebras/1.jpg", np.zeros(7, np.float32))
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path)])
    assert code == 1
    assert "cannot be stacked" in err


def test_unpooled_maps_keep_their_shape(s3: Any, tmp_path: Path) -> None:
    for i in range(3):
        put_feature(s3, f"{i}.jpg", np.full((2, 3, 3), i, np.float16), prefix="maps/")
    assert run(s3, ["s3://feats/maps/", "-o", str(tmp_path)])[0] == 0
    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert features.shape == (3, 2, 3, 3)
    assert features.dtype == np.float16
    assert [float(features[i].mean()) for i in range(3)] == [0.0, 1.0, 2.0]


def test_empty_prefix_is_one_line_error(s3: Any, tmp_path: Path) -> None:
    code, _, err = run(s3, ["s3://feats/nothing-here/", "-o", str(tmp_path)])
    assert code == 1
    assert err == "bottleneck-collect: error: no .npy files under s3://feats/nothing-here/\n"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["feats/resnet50/", "-o", "x"], "s3://"),
        ([SOURCE], "-o"),
        ([SOURCE, "-o", "x", "--concurrency", "0"], "--concurrency"),
        ([SOURCE, "-o", "x", "--concurrency", "many"], "--concurrency"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        collect.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert needle in err


# ---------------------------------------------------------------------------- shards


def etag_of(source_key: str) -> str:
    """The ETag the fixture's per-image files name (``put_feature``)."""
    return f"etag-{len(source_key)}"


def put_shard(
    s3: Any,
    prefix: str,
    name: str,
    rows: list[tuple[str, np.ndarray]],
    *,
    fingerprint: str = FP_A,
    etags: dict[str, str] | None = None,
    index: bool = True,
    npy: bool = True,
) -> ShardKey:
    """A shard as ``bottleneck-consumer --layout shards`` writes one: the rows, then the index."""
    key = parse_shard_key(prefix, f"{prefix}shards/{fingerprint}/{name}.npy")
    assert key is not None
    array = np.stack([features for _, features in rows])
    settings = feature_metadata(
        source_bucket="",
        source_key="",
        source_etag="",
        model="resnet50",
        weights="s3://models/r50.safetensors",
        pool="avg",
        shape=array.shape[1:],
        dtype=array.dtype.name,
        fingerprint=fingerprint,
    )
    meta = {k: v for k, v in settings.items() if not k.startswith("source-")} | {
        "rows": str(len(rows))
    }
    if npy:
        s3.put_object(Bucket="feats", Key=key.npy_key, Body=fakes.npy(array), Metadata=meta)
    if index:
        lines = [
            ShardRow(i, "images", k, (etags or {}).get(k, etag_of(k)), fingerprint)
            for i, (k, _) in enumerate(rows)
        ]
        s3.put_object(Bucket="feats", Key=key.index_key, Body=encode_index(lines), Metadata=meta)
    return key


@pytest.fixture
def sharded(s3: Any) -> dict[str, ShardKey]:
    """GIVEN the fixture's seven feature arrays also as shards under feats/sharded/: three shards
    in processing (not key) order, one image twice (a duplicate delivery), and the .npy of a
    flush that never committed (no index)."""
    arrays = {k: stored(s3, f"resnet50/{k}.npy") for k in KEYS}
    order = [KEYS[i] for i in (4, 0, 6, 2, 1, 5, 3)]
    shards = {
        "a": put_shard(s3, "sharded/", "a-000000", [(k, arrays[k]) for k in order[:3]]),
        "b": put_shard(s3, "sharded/", "a-000001", [(k, arrays[k]) for k in order[3:5]]),
        "c": put_shard(s3, "sharded/", "b-000000", [(k, arrays[k]) for k in order[4:]]),
        "orphan": put_shard(
            s3, "sharded/", "c-000000", [(k, np.full(5, 9, np.float32)) for k in KEYS], index=False
        ),
    }
    return shards


def _without(manifest_path: Path, *names: str) -> dict[str, Any]:
    manifest = json.loads(manifest_path.read_text())
    return {k: v for k, v in manifest.items() if k not in names}


def test_shards_collect_to_what_per_image_files_collect(
    s3: Any, sharded: dict[str, ShardKey], tmp_path: Path
) -> None:
    # WHEN the per-image files and the shards of the same features are collected
    counting = CountingS3(s3)
    code, out, err = run(counting, ["s3://feats/sharded/", "-o", str(tmp_path / "shards")])
    assert (code, err) == (0, "")
    assert "collected 7 rows (7 downloaded; 3 shards)" in out
    assert run(s3, [SOURCE, "-o", str(tmp_path / "files")])[0] == 0

    # THEN the same rows, in the same order, with the same bytes; each row's feature key is
    # the one its per-image file would have
    files, shards = tmp_path / "files", tmp_path / "shards"
    assert (files / "features.npy").read_bytes() == (shards / "features.npy").read_bytes()
    assert (files / "index.csv").read_text().replace(",resnet50/", ",sharded/") == (
        shards / "index.csv"
    ).read_text()
    assert _without(files / "manifest.json", "source", "layout") == _without(
        shards / "manifest.json", "source", "layout"
    )
    assert json.loads((shards / "manifest.json").read_text())["layout"] == "shards"
    # AND each committed shard was downloaded once, the uncommitted one never
    npys = [key for key in counting.gets if key.endswith(".npy")]
    assert sorted(npys) == sorted(sharded[n].npy_key for n in "abc")


def test_the_newest_shard_holds_an_images_row(s3: Any, tmp_path: Path) -> None:
    # GIVEN cats/1.jpg in an older shard and, re-uploaded and computed again, in a newer one
    put_shard(s3, "re/", "a-000000", [("cats/1.jpg", np.zeros(5, np.float32))])
    put_shard(
        s3,
        "re/",
        "b-000000",
        [("cats/1.jpg", np.ones(5, np.float32)), ("dogs/1.jpg", np.ones(5, np.float32))],
        etags={"cats/1.jpg": "new-etag"},
    )
    # WHEN collected THEN one row for it: the newest shard's
    assert run(s3, ["s3://feats/re/", "-o", str(tmp_path)])[0] == 0
    index = read_index(tmp_path)
    assert [(r["source_key"], r["source_etag"]) for r in index] == [
        ("cats/1.jpg", "new-etag"),
        ("dogs/1.jpg", etag_of("dogs/1.jpg")),
    ]
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), np.ones((2, 5)))


def test_a_prefix_with_both_layouts_needs_a_choice(s3: Any, tmp_path: Path) -> None:
    # GIVEN per-image files under resnet50/ and shards beside them: cats/1.jpg in both, with
    # other numbers, and one image only in a shard
    put_shard(
        s3,
        "resnet50/",
        "a-000000",
        [("cats/1.jpg", np.full(5, 7, np.float32)), ("zebras/1.jpg", np.full(5, 8, np.float32))],
    )
    # WHEN collected without a choice THEN one line asks for one
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path / "auto")])
    assert code == 1 and err.count("\n") == 1
    assert "both per-image feature files (7) and shards (1)" in err and "--layout" in err
    # WHEN --layout files THEN the per-image files alone (a shard's .npy is no feature file)
    assert run(s3, [SOURCE, "-o", str(tmp_path / "files"), "--layout", "files"])[0] == 0
    assert len(read_index(tmp_path / "files")) == 7
    # WHEN --layout shards THEN the shard's rows alone
    assert run(s3, [SOURCE, "-o", str(tmp_path / "shards"), "--layout", "shards"])[0] == 0
    assert [r["source_key"] for r in read_index(tmp_path / "shards")] == [
        "cats/1.jpg",
        "zebras/1.jpg",
    ]
    # WHEN --layout both THEN the union, the per-image file winning for cats/1.jpg
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path / "both"), "--layout", "both"])
    assert (code, err) == (0, "")
    index = read_index(tmp_path / "both")
    assert [r["feature_key"] for r in index] == sorted(
        f"resnet50/{k}.npy" for k in [*KEYS, "zebras/1.jpg"]
    )
    features = np.load(tmp_path / "both" / "features.npy")
    row = {r["source_key"]: int(r["row"]) for r in index}
    np.testing.assert_array_equal(
        features[row["cats/1.jpg"]], stored(s3, "resnet50/cats/1.jpg.npy")
    )
    np.testing.assert_array_equal(features[row["zebras/1.jpg"]], np.full(5, 8, np.float32))


class FailOn(CountingS3):
    """The moto client, counting GetObject calls; the first GET of ``key`` raises."""

    def __init__(self, s3: Any, key: str) -> None:
        super().__init__(s3)
        self.key = key

    def get_object(self, **kwargs: Any) -> Any:
        if kwargs["Key"] == self.key:
            self.key = ""
            raise RuntimeError("network gone")
        return super().get_object(**kwargs)


def test_resuming_shards_downloads_only_the_shards_not_done(
    s3: Any, sharded: dict[str, ShardKey], tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    assert run(s3, ["s3://feats/sharded/", "-o", str(reference)])[0] == 0
    # WHEN the download of the last shard (by its first row) fails, the others done
    target = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="network gone"):
        collect.collect(FailOn(s3, sharded["c"].npy_key), "s3://feats/sharded/", target)
    # THEN a rerun downloads that shard alone (nothing listed or read again) and writes the
    # same bytes as an uninterrupted run
    counting = CountingS3(s3)
    code, _, err = run(counting, ["s3://feats/sharded/", "-o", str(target)])
    assert (code, err) == (0, "")
    assert counting.gets == [sharded["c"].npy_key]
    for name in ("features.npy", "index.csv", "manifest.json"):
        assert (target / name).read_bytes() == (reference / name).read_bytes(), name


def test_damaged_shards_stop_the_collection_with_one_line(s3: Any, tmp_path: Path) -> None:
    # GIVEN an index that names three rows of a two-row .npy
    key = put_shard(s3, "bad/", "a-000000", [(k, np.zeros(5, np.float32)) for k in KEYS[:3]])
    s3.put_object(Bucket="feats", Key=key.npy_key, Body=fakes.npy(np.zeros((2, 5), np.float32)))
    code, _, err = run(s3, ["s3://feats/bad/", "-o", str(tmp_path / "a")])
    assert code == 1 and err.count("\n") == 1 and "damaged shard" in err
    # GIVEN an index without its .npy
    put_shard(s3, "lost/", "a-000000", [("x.jpg", np.zeros(5, np.float32))], npy=False)
    code, _, err = run(s3, ["s3://feats/lost/", "-o", str(tmp_path / "b")])
    assert code == 1 and err.count("\n") == 1 and "index without its .npy" in err


def test_shards_of_two_fingerprints_are_refused_before_any_download(
    s3: Any, tmp_path: Path
) -> None:
    put_shard(s3, "mix/", "a-000000", [("a.jpg", np.zeros(5, np.float32))])
    put_shard(s3, "mix/", "a-000001", [("b.jpg", np.zeros(5, np.float32))], fingerprint=FP_B)
    counting = CountingS3(s3)
    code, _, err = run(counting, ["s3://feats/mix/", "-o", str(tmp_path)])
    assert code == 1 and err.count("\n") == 1
    assert "mixed fingerprints" in err and "--allow-mixed" in err
    assert not [key for key in counting.gets if key.endswith(".npy")]
    # --allow-mixed takes both
    code, _, err = run(s3, ["s3://feats/mix/", "-o", str(tmp_path), "--allow-mixed"])
    assert (code, err) == (0, "")
    assert {r["fingerprint"] for r in read_index(tmp_path)} == {FP_A, FP_B}
