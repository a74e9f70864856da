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
