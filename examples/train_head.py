"""Train a linear classifier on collected bottleneck features: the transfer-learning step.

    python examples/train_head.py DIR [--seed 0] [--test-fraction 0.25] [--json]

``DIR`` is what ``bottleneck-collect`` wrote (``features.npy``, ``index.csv``,
``manifest.json``). Each row's label is the folder its image sits in: ``cats/1.jpg`` is a
``cats``, ``photos/dogs/7.jpg`` a ``dogs``. The rows are split per class (stratified) into a
training and a held-out set with ``--seed``; a multinomial logistic regression (softmax, L2,
full-batch gradient descent on standardised features, NumPy only) is fitted on the first and
scored on the second, next to the chance level (always answering the most common training
class). Unpooled feature maps are flattened.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "Dataset",
    "LinearHead",
    "Score",
    "label_of",
    "load_dataset",
    "main",
    "stratified_split",
    "train",
]


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """Features ``(N, F)`` (float32), integer labels ``(N,)`` and the class names they index."""

    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LinearHead:
    """A fitted softmax classifier over standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (F, K)
    bias: np.ndarray  # (K,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=1)


@dataclass(frozen=True, slots=True)
class Score:
    """Accuracies on the training and held-out rows, and the held-out chance level."""

    train_accuracy: float
    test_accuracy: float
    chance: float
    train_rows: int
    test_rows: int
    classes: tuple[str, ...]


def label_of(source_key: str) -> str:
    """The name of the folder holding the image (``cats/1.jpg`` -> ``cats``)."""
    parent = PurePosixPath(source_key).parent.name
    if not parent:
        raise DatasetError(f"{source_key!r} is not in a folder: no label to take from it")
    return parent


def _key(row: dict[str, str]) -> str:
    # A key too long for S3 metadata is recorded as "sha256:<hex>"; the feature key
    # (<prefix><source key>.npy) sits in the same folder, so it gives the same label.
    key = row.get("source_key", "")
    if not key or key.startswith("sha256:"):
        return row.get("feature_key", "")
    return key


def load_dataset(directory: Path) -> Dataset:
    """Read a ``bottleneck-collect`` directory into features and folder labels."""
    features_path, index_path = directory / "features.npy", directory / "index.csv"
    for path in (features_path, index_path):
        if not path.is_file():
            raise DatasetError(f"{path} is missing: is {directory} a bottleneck-collect output?")
    features = np.load(features_path, mmap_mode="r", allow_pickle=False)
    with index_path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != len(features):
        raise DatasetError(f"index.csv has {len(rows)} rows but features.npy {len(features)}")
    names = [label_of(_key(row)) for row in sorted(rows, key=lambda r: int(r["row"]))]
    classes = tuple(sorted(set(names)))
    lookup = {name: i for i, name in enumerate(classes)}
    labels = np.array([lookup[name] for name in names], dtype=np.int64)
    flat = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    return Dataset(features=flat, labels=labels, classes=classes)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices for training and held-out sets, the same fraction of every class held out.

    A class of one row goes to training only; every other class keeps at least one row on each
    side. The same labels and seed give the same split.
    """
    if not 0 < test_fraction < 1:
        raise DatasetError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        held = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        test_rows.append(rows[:held])
        train_rows.append(rows[held:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def train(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    steps: int = 500,
    learning_rate: float = 0.5,
    l2: float = 1e-3,
) -> LinearHead:
    """Fit softmax regression by full-batch gradient descent (deterministic: zero start)."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0  # constant features stay at zero instead of dividing by zero
    x = (features - mean) / scale
    onehot = np.eye(classes, dtype=np.float64)[labels]
    weights = np.zeros((x.shape[1], classes))
    bias = np.zeros(classes)
    for _ in range(steps):
        logits = x @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        error = (probs - onehot) / len(x)
        weights -= learning_rate * (x.T @ error + l2 * weights)
        bias -= learning_rate * error.sum(axis=0)
    return LinearHead(mean=mean, scale=scale, weights=weights, bias=bias)


def evaluate(
    dataset: Dataset, *, test_fraction: float = 0.25, seed: int = 0, steps: int = 500
) -> Score:
    """Split, train on one side, score on the other."""
    if len(dataset.classes) < 2:
        raise DatasetError(
            f"need at least two classes (folders), found {list(dataset.classes)}: "
            "labels come from each image's folder"
        )
    train_rows, test_rows = stratified_split(dataset.labels, test_fraction, seed)
    if len(test_rows) == 0:
        raise DatasetError("no class has two rows: nothing to hold out")
    x, y = dataset.features, dataset.labels
    head = train(x[train_rows], y[train_rows], len(dataset.classes), steps=steps)
    majority = Counter(y[train_rows].tolist()).most_common(1)[0][0]
    return Score(
        train_accuracy=float(np.mean(head.predict(x[train_rows]) == y[train_rows])),
        test_accuracy=float(np.mean(head.predict(x[test_rows]) == y[test_rows])),
        chance=float(np.mean(y[test_rows] == majority)),
        train_rows=len(train_rows),
        test_rows=len(test_rows),
        classes=dataset.classes,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Train and report; returns the exit status (1 with one line for an unusable dataset)."""
    parser = _Parser(prog="train_head.py", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("directory", type=Path, help="a bottleneck-collect output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.25, help="held-out share (default 0.25)"
    )
    parser.add_argument("--steps", type=int, default=500, help="gradient steps (default 500)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        dataset = load_dataset(args.directory)
        score = evaluate(
            dataset, test_fraction=args.test_fraction, seed=args.seed, steps=args.steps
        )
    except DatasetError as exc:
        sys.stderr.write(f"train_head.py: error: {exc}\n")
        return 1
    if args.json:
        doc: dict[str, Any] = {
            "classes": list(score.classes),
            "train_rows": score.train_rows,
            "test_rows": score.test_rows,
            "train_accuracy": round(score.train_accuracy, 4),
            "test_accuracy": round(score.test_accuracy, 4),
            "chance": round(score.chance, 4),
        }
        print(json.dumps(doc))
    else:
        print(
            f"linear head on {dataset.features.shape[1]}-d features, "
            f"{len(score.classes)} classes ({', '.join(score.classes)})\n"
            f"  trained on {score.train_rows} rows, held out {score.test_rows} (seed {args.seed})\n"
            f"  held-out accuracy {score.test_accuracy:.1%} (chance {score.chance:.1%}; "
            f"training {score.train_accuracy:.1%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
