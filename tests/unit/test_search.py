"""examples/search.py and bottleneck_tools.similar: nearest images by cosine similarity.

The datasets are made by ``bottleneck-collect`` itself, from feature files in moto S3 written by
the contract's rules, so the search reads exactly the files a user would have.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from bottleneck_contract.shards import ShardRow, encode_index, shard_keys
from bottleneck_tools import collect, similar
from examples import search
from tests import fakes

SOURCE = "s3://feats/resnet50/"
DIM = 16


def collected(s3: Any, directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Feature files for ``arrays`` (source key -> features) collected into ``directory``."""
    for key, array in arrays.items():
        fakes.put_feature(s3, "resnet50/", key, etag=f"etag-{len(key)}", array=array)
    collect.collect(s3, SOURCE, directory)
    return directory


def images(seed: int = 0) -> dict[str, np.ndarray]:
    """Eight random images, an exact copy of one under another key, and an all-zero one."""
    rng = np.random.default_rng(seed)
    arrays = {f"photos/{i}.jpg": rng.standard_normal(DIM).astype(np.float32) for i in range(8)}
    arrays["copies/photo-3.jpg"] = arrays["photos/3.jpg"].copy()
    arrays["blank.jpg"] = np.zeros(DIM, np.float32)
    return arrays


@pytest.fixture
def s3(aws: None) -> Any:
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket="feats")
    return client


@pytest.fixture
def dataset(s3: Any, tmp_path: Path) -> Path:
    """GIVEN a collected dataset of ten images (see :func:`images`)."""
    return collected(s3, tmp_path / "features", images())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = search.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def neighbours(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    return list(json.loads(out)["neighbours"])


def brute_force(features: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row scored at once in float64 and fully sorted (ties to the lower row)."""
    x = np.asarray(features, np.float64)
    norms = np.linalg.norm(x, axis=1)
    unit = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    sims = unit @ query.astype(np.float64)
    order = np.lexsort((np.arange(len(sims)), -sims))[:k]
    return order, sims[order]


# ---------------------------------------------------------------------------- the command


def test_an_image_is_nearest_itself_and_its_copy_comes_next(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the original is the query THEN it leads, its identical copy follows at 1.0
    found = neighbours(capsys, str(dataset), "photos/3.jpg", "--k", "3")
    assert [n["source_key"] for n in found[:2]] == ["photos/3.jpg", "copies/photo-3.jpg"]
    assert [n["rank"] for n in found] == [1, 2, 3]
    assert found[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert found[1]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert found[2]["similarity"] < 0.99
    # AND the copy as query leads its own list, though both score the same
    found = neighbours(capsys, str(dataset), "copies/photo-3.jpg", "--k", "2")
    assert [n["source_key"] for n in found] == ["copies/photo-3.jpg", "photos/3.jpg"]


def test_a_sharded_run_is_searched_through_what_collect_writes(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the images' features in two shards (--layout shards), one image in both (a repeat)
    arrays = images()
    keys = sorted(arrays)
    fingerprint = "0123456789abcdef"
    for seq, part in enumerate((keys[:6], keys[4:])):
        shard = shard_keys("resnet50/", fingerprint, "host-1-abc123", seq)
        buffer = io.BytesIO()
        np.save(buffer, np.stack([arrays[k] for k in part]), allow_pickle=False)
        metadata = {"model": "resnet50", "weights": "random", "pool": "avg", "shape": str(DIM)}
        metadata.update(dtype="float32", fingerprint=fingerprint, rows=str(len(part)))
        s3.put_object(Bucket="feats", Key=shard.npy_key, Body=buffer.getvalue(), Metadata=metadata)
        rows = (ShardRow(i, "images", k, f"etag-{k}", fingerprint) for i, k in enumerate(part))
        s3.put_object(
            Bucket="feats", Key=shard.index_key, Body=encode_index(rows), Metadata=metadata
        )
    # WHEN they are collected and searched
    directory = tmp_path / "shards"
    result = collect.collect(s3, SOURCE, directory)
    assert (result.layout, result.count) == ("shards", len(keys))
    found = neighbours(capsys, str(directory), "photos/5.jpg", "--k", "2")
    # THEN each image is nearest itself, whichever shard holds its row
    assert found[0]["source_key"] == "photos/5.jpg"
    assert found[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    found = neighbours(capsys, str(directory), "photos/3.jpg", "--k", "2")
    assert [n["source_key"] for n in found] == ["photos/3.jpg", "copies/photo-3.jpg"]


def test_similarities_are_the_cosines_of_the_stored_features(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = images()
    found = neighbours(capsys, str(dataset), "photos/0.jpg", "--k", "10")
    query = arrays["photos/0.jpg"]
    for n in found:
        other = arrays[n["source_key"]]
        norm = np.linalg.norm(query) * np.linalg.norm(other)
        expected = 0.0 if norm == 0 else float(query @ other / norm)
        assert n["similarity"] == pytest.approx(expected, abs=1e-5), n["source_key"]
    assert [n["similarity"] for n in found[1:]] == sorted(
        (n["similarity"] for n in found[1:]), reverse=True
    )


def test_text_lines_are_rank_similarity_and_key(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, str(dataset), "photos/3.jpg", "--k", "2")
    assert (code, err) == (0, "")
    assert out == "1  1.0000  photos/3.jpg\n2  1.0000  copies/photo-3.jpg\n"


def test_k_larger_than_the_dataset_lists_every_image_once(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = neighbours(capsys, str(dataset), "photos/1.jpg", "--k", "1000")
    assert sorted(n["source_key"] for n in found) == sorted(images())
    assert [n["rank"] for n in found] == list(range(1, 11))


def test_a_zero_vector_has_similarity_zero_never_nan(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the all-zero image is the query THEN it leads with 0, and so does everything else
    found = neighbours(capsys, str(dataset), "blank.jpg", "--k", "10")
    assert found[0]["source_key"] == "blank.jpg"
    assert [n["similarity"] for n in found] == [0.0] * 10
    # AND as a neighbour of another image it scores 0 as well
    found = neighbours(capsys, str(dataset), "photos/2.jpg", "--k", "10")
    assert {n["source_key"]: n["similarity"] for n in found}["blank.jpg"] == 0.0
    # AND the text form never prints "nan" or "-0.0000"
    code, out, _ = run(capsys, str(dataset), "blank.jpg", "--k", "3")
    assert code == 0
    assert "nan" not in out.lower()
    assert "-0.0000" not in out


def test_an_unknown_query_is_one_line_naming_it_and_exit_2(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, str(dataset), "photos/nope.jpg")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "'photos/nope.jpg'" in err


def test_a_bad_k_is_a_usage_error(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        search.main([str(dataset), "photos/1.jpg", "--k", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_missing_dataset_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, str(tmp_path), "photos/1.jpg")
    assert code == 1
    assert err.count("\n") == 1
    assert "features.npy is missing" in err


def test_unpooled_maps_are_flattened_with_a_note(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN --pool none features (C, H, W), one an exact copy of another
    rng = np.random.default_rng(5)
    maps = {f"maps/{i}.jpg": rng.standard_normal((4, 2, 2)).astype(np.float32) for i in range(4)}
    maps["maps/copy.jpg"] = maps["maps/2.jpg"].copy()
    directory = collected(s3, tmp_path / "maps", maps)
    # WHEN searched THEN the copy is nearest, and stderr says the maps were flattened
    code, out, err = run(capsys, str(directory), "maps/2.jpg", "--k", "2")
    assert code == 0
    assert out.splitlines()[1].endswith("maps/copy.jpg")
    assert err.count("\n") == 1
    assert "(4, 2, 2) are flattened to 16 values" in err


def test_a_hashed_source_key_is_recovered_from_the_feature_key(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a key whose percent-encoding is too long for S3 metadata (stored as sha256:<hex>)
    long_key = "é" * 340 + ".jpg"
    arrays = {long_key: np.ones(DIM, np.float32), "short.jpg": np.arange(DIM, dtype=np.float32)}
    directory = collected(s3, tmp_path / "long", arrays)
    assert "sha256:" in (directory / "index.csv").read_text(encoding="utf-8")
    # WHEN searched by its real key THEN it is found and listed under that key
    found = neighbours(capsys, str(directory), long_key, "--k", "2")
    assert [n["source_key"] for n in found] == [long_key, "short.jpg"]


# ---------------------------------------------------------------------------- the query


def row(n: int, key: str, bucket: str = "images", prefix: str = "r50/") -> similar.IndexRow:
    return similar.IndexRow(n, bucket, key, f"{prefix}{key}.npy")


def test_a_key_in_two_buckets_is_ambiguous_until_given_as_s3_uri() -> None:
    index = [row(0, "a.jpg", "cams"), row(1, "a.jpg", "phones", "r50b/"), row(2, "b.jpg")]
    with pytest.raises(similar.RequestError, match=r"2 rows, from buckets cams, phones") as exc:
        similar.find_query(index, "a.jpg")
    assert "s3://cams/a.jpg or s3://phones/a.jpg" in str(exc.value)
    assert similar.find_query(index, "s3://phones/a.jpg") == 1
    assert similar.find_query(index, "b.jpg") == 2


def test_one_image_under_two_prefixes_is_found_by_its_feature_key() -> None:
    index = [row(0, "a.jpg", prefix="r50/"), row(1, "a.jpg", prefix="vit/")]
    with pytest.raises(similar.RequestError, match=r"r50/a\.jpg\.npy, vit/a\.jpg\.npy"):
        similar.find_query(index, "a.jpg")
    assert similar.find_query(index, "vit/a.jpg.npy") == 1


def test_an_unknown_s3_uri_is_unknown() -> None:
    with pytest.raises(similar.RequestError, match=r"no image 's3://other/a\.jpg'"):
        similar.find_query([row(0, "a.jpg")], "s3://other/a.jpg")


# ---------------------------------------------------------------------------- numpy core


def test_normalise_gives_unit_rows_and_zero_for_rows_without_a_length() -> None:
    block = np.array(
        [[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0], [1e-30, 0.0]], np.float64
    )
    out = similar.normalise(block)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1:4], np.zeros((3, 2)))
    assert np.isfinite(out).all()
    assert block[0, 0] == 3.0  # a copy: the memory-mapped input is read-only


@pytest.mark.parametrize("k", [1, 5, 37, 64, 65, 999, 1000, 5000])
@pytest.mark.parametrize("block_rows", [1, 64, 333, 10_000])
def test_blocks_merged_equal_a_full_sort(k: int, block_rows: int) -> None:
    # GIVEN 1,000 random rows, scanned in blocks (one block, uneven blocks, one row a block)
    rng = np.random.default_rng(k * 7919 + block_rows)
    features = rng.standard_normal((1000, 12)).astype(np.float32)
    query = similar.normalise(rng.standard_normal((1, 12)))[0]
    # WHEN the top k is merged from the blocks THEN it is the brute-force full sort's
    rows, sims = similar.top_k(features, query, k, block_rows=block_rows)
    expected_rows, expected_sims = brute_force(features, query, k)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)


@pytest.mark.parametrize("block_rows", [7, 50, 400])
def test_ties_go_to_the_lower_row_across_blocks(block_rows: int) -> None:
    # GIVEN many exact ties: 200 zero rows and 40 copies each of five rows whose cosines with
    # the first axis are exact in float32 (1, 0, 0.5, -0.5, 0.6), shuffled
    rng = np.random.default_rng(block_rows)
    distinct = np.array(
        [[2, 0, 0, 0], [0, 3, 0, 0], [1, 1, 1, 1], [-1, 1, 1, 1], [3, 4, 0, 0]], np.float32
    )
    features = np.concatenate([np.repeat(distinct, 40, axis=0), np.zeros((200, 4), np.float32)])
    features = features[rng.permutation(len(features))]
    # WHEN the query ties with every row (all-zero) THEN the first k rows win
    for k in (1, 13, 150, 400):
        rows, _ = similar.top_k(features, np.zeros(4, np.float32), k, block_rows=block_rows)
        np.testing.assert_array_equal(rows, np.arange(min(k, 400)))
    # AND WHEN the cut falls inside a group of ties THEN the group's lowest rows are kept
    axis = np.array([1, 0, 0, 0], np.float32)
    for k in (1, 39, 40, 41, 75, 79, 80, 81, 300):
        rows, sims = similar.top_k(features, axis, k, block_rows=block_rows)
        expected_rows, expected_sims = brute_force(features, axis, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(sims, expected_sims.astype(np.float32))


def test_nearest_puts_the_query_first_even_when_a_copy_ties() -> None:
    features = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [0.0, 0.0]], np.float32)
    assert [r for r, _ in similar.nearest(features, 1, 3)] == [1, 0, 2]
    assert [r for r, _ in similar.nearest(features, 3, 2)] == [3, 0]
    assert similar.nearest(features, 3, 1) == [(3, 0.0)]


# ---------------------------------------------------------------------------- backends


def test_auto_takes_faiss_only_when_importable_and_large() -> None:
    big = similar.FAISS_MIN_ROWS
    assert similar.choose_backend("auto", big, available=False) == "numpy"
    assert similar.choose_backend("auto", big - 1, available=True) == "numpy"
    assert similar.choose_backend("auto", big, available=True) == "faiss"
    assert similar.choose_backend("numpy", big, available=True) == "numpy"
    with pytest.raises(similar.RequestError, match="pip install faiss-cpu"):
        similar.choose_backend("faiss", 10, available=False)


def test_faiss_without_faiss_is_one_line_and_exit_2(
    dataset: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(similar, "faiss_available", lambda: False)
    code, out, err = run(capsys, str(dataset), "photos/1.jpg", "--backend", "faiss")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "faiss is not installed" in err
    # AND auto falls back to numpy
    code, out, _ = run(capsys, str(dataset), "photos/1.jpg", "--json")
    assert code == 0
    assert json.loads(out)["backend"] == "numpy"


def test_faiss_finds_what_numpy_finds(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    features = rng.standard_normal((500, 12)).astype(np.float32)
    features[::50] = 0.0
    query = similar.normalise(features[7:8])[0]
    for k in (1, 10, 499, 600):
        rows, sims = similar.top_k_faiss(features, query, k, block_rows=64)
        expected_rows, expected_sims = similar.top_k(features, query, k, block_rows=64)
        np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
        # Up to ties: the zero rows all score 0, and faiss may pick others among them.
        distinct = expected_sims != 0
        np.testing.assert_array_equal(rows[distinct], expected_rows[distinct])
    found = neighbours(capsys, str(dataset), "photos/3.jpg", "--k", "3", "--backend", "faiss")
    assert [n["source_key"] for n in found[:2]] == ["photos/3.jpg", "copies/photo-3.jpg"]
