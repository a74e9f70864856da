"""examples/train_head.py: a linear head on a tiny generated, separable collected dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from examples import train_head

CLASSES = ("cats", "dogs", "owls")


def write_dataset(directory: Path, per_class: int = 20, dim: int = 8, seed: int = 1) -> None:
    """What bottleneck-collect writes: three Gaussian blobs, one folder per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (len(CLASSES), dim))
    rows = []
    features = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            features.append(centres[c] + rng.normal(0, 1, dim))
            rows.append(f"photos/{name}/{i}.jpg")
    order = rng.permutation(len(rows))  # classes interleaved, as sorted keys would not be
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "features.npy", np.asarray(features, np.float32)[order])
    with (directory / "index.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "source_bucket", "source_key", "source_etag", "feature_key"])
        for row, j in enumerate(order):
            writer.writerow([row, "images", rows[j], "e", f"feats/{rows[j]}.npy"])
    (directory / "manifest.json").write_text(json.dumps({"count": len(rows)}))


def test_trains_above_chance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path)
    assert train_head.main([str(tmp_path), "--seed", "3", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["classes"] == list(CLASSES)
    assert score["test_rows"] == 15  # 5 of each class's 20
    assert score["chance"] < 0.5
    assert score["test_accuracy"] >= 0.9


def test_labels_from_the_parent_folder() -> None:
    assert train_head.label_of("cats/1.jpg") == "cats"
    assert train_head.label_of("a/b/dogs/x y.png") == "dogs"
    with pytest.raises(train_head.DatasetError, match="not in a folder"):
        train_head.label_of("top.jpg")


def test_split_is_stratified_and_seeded() -> None:
    labels = np.array([0] * 8 + [1] * 4 + [2] * 1)
    train, test = train_head.stratified_split(labels, 0.25, seed=7)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(13))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    again = train_head.stratified_split(labels, 0.25, seed=7)
    assert train.tolist() == again[0].tolist()
    assert test.tolist() == again[1].tolist()


def test_a_single_class_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(tmp_path)
    index = (tmp_path / "index.csv").read_text()
    (tmp_path / "index.csv").write_text(
        index.replace("/dogs/", "/cats/").replace("/owls/", "/cats/")
    )
    assert train_head.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "at least two classes" in err


def test_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path)
    assert train_head.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 classes (cats, dogs, owls)" in out
    assert "held-out accuracy" in out


def test_a_hashed_source_key_takes_its_label_from_the_feature_key(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    index = (tmp_path / "index.csv").read_text().splitlines()
    header, first = index[0], index[1].split(",")
    first[2] = "sha256:" + "0" * 64
    (tmp_path / "index.csv").write_text("\n".join([header, ",".join(first), *index[2:]]) + "\n")
    expected = train_head.label_of(index[1].split(",")[2])
    dataset = train_head.load_dataset(tmp_path)
    assert dataset.classes[dataset.labels[0]] == expected
