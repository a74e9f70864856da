"""``bottleneck-collect --incremental``: only new or changed files (or shards) are downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bottleneck_contract.shards import ShardKey
from bottleneck_tools import collect
from tests.functional import test_collect as base
from tests.functional.test_collect import (
    SOURCE,
    CountingS3,
    FailOn,
    put_feature,
    put_shard,
    read_index,
    run,
    stored,
)

# The fixtures of test_collect: seven files under feats/resnet50/, the same as shards.
s3 = base.s3
sharded = base.sharded
FILES = ("features.npy", "index.csv", "manifest.json", collect.OBJECTS)


def same_bytes(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def change_files(s3: Any) -> list[str]:
    """Two files added (one sorting first), one replaced (new bytes, new ETag), one deleted;
    returns the keys a run must download."""
    put_feature(s3, "aardvark/0.jpg", np.full(5, 3, np.float32))
    put_feature(s3, "zebras/1.jpg", np.full(5, 4, np.float32))
    put_feature(s3, "cats/10.jpg", np.full(5, 5, np.float32))
    s3.delete_object(Bucket="feats", Key="resnet50/birds/a.png.npy")
    return sorted(f"resnet50/{k}.npy" for k in ("aardvark/0.jpg", "zebras/1.jpg", "cats/10.jpg"))


def test_only_new_and_changed_files_are_downloaded(s3: Any, tmp_path: Path) -> None:
    target = tmp_path / "inc"
    assert run(s3, [SOURCE, "-o", str(target)])[0] == 0
    expected = change_files(s3)

    counting = CountingS3(s3)
    code, out, err = run(counting, [SOURCE, "-o", str(target), "--incremental"])
    assert (code, err) == (0, "")
    assert sorted(counting.gets) == expected
    assert "collected 8 feature files (3 downloaded, 5 reused, 1 dropped)" in out
    assert not (target / collect.PARTIAL).exists()

    # THEN byte for byte what a fresh full collect writes
    full = tmp_path / "full"
    assert run(s3, [SOURCE, "-o", str(full)])[0] == 0
    same_bytes(target, full)
    row = {r["source_key"]: int(r["row"]) for r in read_index(target)}
    np.testing.assert_array_equal(
        np.load(target / "features.npy")[row["cats/10.jpg"]], np.full(5, 5, np.float32)
    )


def test_nothing_changed_downloads_nothing(s3: Any, tmp_path: Path) -> None:
    target = tmp_path / "inc"
    assert run(s3, [SOURCE, "-o", str(target)])[0] == 0
    before = {name: (target / name).read_bytes() for name in FILES}
    counting = CountingS3(s3)
    code, out, _ = run(counting, [SOURCE, "-o", str(target), "--incremental"])
    assert code == 0
    assert counting.gets == []
    assert "(0 downloaded, 7 reused, 0 dropped)" in out
    assert {name: (target / name).read_bytes() for name in FILES} == before


def test_small_copy_blocks_give_the_same_bytes(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "inc"
    assert run(s3, [SOURCE, "-o", str(target)])[0] == 0
    change_files(s3)
    monkeypatch.setattr(collect, "COPY_BYTES", 1)  # one row a block
    assert run(s3, [SOURCE, "-o", str(target), "--incremental"])[0] == 0
    full = tmp_path / "full"
    assert run(s3, [SOURCE, "-o", str(full)])[0] == 0
    same_bytes(target, full)


def test_a_new_shard_is_the_only_shard_downloaded(
    s3: Any, sharded: dict[str, ShardKey], tmp_path: Path
) -> None:
    source = "s3://feats/sharded/"
    target = tmp_path / "inc"
    assert run(s3, [source, "-o", str(target)])[0] == 0
    # GIVEN a new shard: a new image, and a newer row of one already collected
    new = put_shard(
        s3,
        "sharded/",
        "d-000000",
        [("aardvark/0.jpg", np.full(5, 3, np.float32)), ("dogs/1.jpg", np.ones(5, np.float32))],
    )
    counting = CountingS3(s3)
    code, out, err = run(counting, [source, "-o", str(target), "--incremental"])
    assert (code, err) == (0, "")
    assert [key for key in counting.gets if key.endswith(".npy")] == [new.npy_key]
    assert "collected 8 rows (2 downloaded, 6 reused, 0 dropped; 4 shards)" in out
    full = tmp_path / "full"
    assert run(s3, [source, "-o", str(full)])[0] == 0
    same_bytes(target, full)


def test_an_interrupted_incremental_run_leaves_the_old_dataset(s3: Any, tmp_path: Path) -> None:
    target = tmp_path / "inc"
    assert run(s3, [SOURCE, "-o", str(target), "--concurrency", "1"])[0] == 0
    before = {name: (target / name).read_bytes() for name in FILES}
    first = stored(s3, read_index(target)[0]["feature_key"])  # birds/a.png, deleted below
    expected = change_files(s3)

    # WHEN the last download fails
    with pytest.raises(RuntimeError, match="network gone"):
        collect.collect(FailOn(s3, expected[-1]), SOURCE, target, concurrency=1, incremental=True)
    # THEN the old dataset is there, whole and readable
    assert {name: (target / name).read_bytes() for name in FILES} == before
    assert np.load(target / "features.npy", mmap_mode="r").shape == (7, 5)
    assert len(read_index(target)) == 7
    np.testing.assert_array_equal(np.load(target / "features.npy")[0], first)

    # AND a rerun downloads the one file left, and writes what a full collect writes
    counting = CountingS3(s3)
    code, out, err = run(counting, [SOURCE, "-o", str(target), "--incremental"])
    assert (code, err) == (0, "")
    assert counting.gets == [expected[-1]]
    assert "(1 downloaded, 2 from the interrupted run, 5 reused, 1 dropped)" in out
    full = tmp_path / "full"
    assert run(s3, [SOURCE, "-o", str(full)])[0] == 0
    same_bytes(target, full)


def test_incremental_without_a_dataset_is_a_full_collect(s3: Any, tmp_path: Path) -> None:
    code, out, _ = run(s3, [SOURCE, "-o", str(tmp_path), "--incremental"])
    assert code == 0
    assert "(7 downloaded, 0 reused, 0 dropped)" in out


def test_a_dataset_of_another_source_is_refused(s3: Any, tmp_path: Path) -> None:
    assert run(s3, ["s3://feats/resnet50/cats/", "-o", str(tmp_path)])[0] == 0
    code, _, err = run(s3, [SOURCE, "-o", str(tmp_path), "--incremental"])
    assert code == 1 and err.count("\n") == 1
    assert "holds a collection of s3://feats/resnet50/cats/" in err
