"""Nearest neighbours by cosine similarity over a ``bottleneck-collect`` directory.

The core of ``examples/search.py`` and of the demo's closing step; pure functions that take
arrays and index rows, so that tests call them without the command line.

Memory: ``features.npy`` is memory-mapped and scanned in row blocks of about
:data:`BLOCK_BYTES`; each block (cast to float32 if it is not) is scored against the unit query
as its dot products over its L2 norms, which is the cosine of the normalised rows without
writing them, cut to its best ``k`` with ``np.argpartition``, and the blocks' candidates are
merged. A normalised copy of the whole matrix never exists, so a few million rows x 2048 need
at most one block of memory beyond the page cache (none for float32 files), not twice the file.

Rows whose norm is zero (or not finite) have similarity 0 to everything, never NaN. Unpooled
features (``--pool none``, rows of shape ``(C, H, W)``) are flattened, as ``train_head.py``
does: the file is C-ordered, so this is a free view of the mapping, and cosine over flattened
maps is still a similarity (a stricter one: the same things in the same places), where
refusing would leave those datasets with nothing and pooling here would silently change what
the features are.

The faiss backend (``IndexFlatIP`` over the same normalised rows, added block by block) is
used only when ``faiss`` is importable; it is never a dependency. It returns the same
neighbours up to float rounding and ties, which are broken by row here in both backends.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bottleneck_contract.features import source_key_of
from bottleneck_contract.locations import InvalidS3Uri, S3Location

__all__ = [
    "BACKENDS",
    "Dataset",
    "IndexRow",
    "Neighbour",
    "RequestError",
    "SearchError",
    "choose_backend",
    "cosines",
    "faiss_available",
    "find_query",
    "format_text",
    "load",
    "load_index",
    "nearest",
    "normalise",
    "search",
    "to_json",
    "top_k",
    "top_k_faiss",
]

FEATURES = "features.npy"
INDEX = "index.csv"
MANIFEST = "manifest.json"
# One block of float32 rows: 8,192 rows of 2,048 values. Big enough that the per-block Python
# and argpartition overhead vanishes next to the matrix-vector product, small enough to ignore.
BLOCK_BYTES = 64 << 20
BACKENDS = ("auto", "numpy", "faiss")
# For one query both backends scan every row; faiss's scan is multi-threaded and fused with the
# top-k selection, but it first copies every normalised row into its own memory (N x D x 4
# bytes). numpy's scan of float32 rows ran at 6-10 GB/s on the 2-core development machine
# (250,000 rows x 2048, 1.9 GiB, in 0.3 s with the page cache warm): below this many rows the
# copy is not worth it.
FAISS_MIN_ROWS = 1_000_000
_HASHED = "sha256:"
_REQUIRED_COLUMNS = ("row", "source_bucket", "source_key", "feature_key")


class SearchError(Exception):
    """The dataset cannot be searched as it is; the message says why, in one line."""


class RequestError(SearchError):
    """What was asked cannot be answered: an unknown or ambiguous query, a missing backend."""


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One line of ``index.csv``; ``source_key`` is the image's key, recovered from the feature
    key when the metadata held only its ``sha256:`` stand-in."""

    row: int
    source_bucket: str
    source_key: str
    feature_key: str


@dataclass(frozen=True, slots=True)
class Dataset:
    """Features ``(N, D)`` as collected (memory-mapped, any float dtype), and their index.

    ``row_shape`` is the shape of one feature before flattening: ``(D,)`` for pooled features,
    ``(C, H, W)`` for unpooled ones.
    """

    features: np.ndarray
    index: tuple[IndexRow, ...]
    row_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One result: its rank (1 is the query itself), cosine similarity and image."""

    rank: int
    row: int
    similarity: float
    source_bucket: str
    source_key: str


# ---------------------------------------------------------------------------- loading


def load_index(directory: Path) -> tuple[IndexRow, ...]:
    """Read ``index.csv`` in row order; the rows must be exactly ``0 .. N-1``."""
    path = directory / INDEX
    if not path.is_file():
        raise SearchError(f"{path} is missing: is {directory} a bottleneck-collect output?")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SearchError(f"{path} has no column {', '.join(missing)}")
        lines = list(reader)
    prefix = _source_prefix(directory)
    try:
        rows = sorted(
            (
                IndexRow(
                    row=int(line["row"]),
                    # One string per bucket, not per row: the index of millions of rows is
                    # held in memory, and a handful of buckets repeat on every line.
                    source_bucket=sys.intern(line["source_bucket"]),
                    source_key=_image_key(line["source_key"], line["feature_key"], prefix),
                    feature_key=line["feature_key"],
                )
                for line in lines
            ),
            key=lambda r: r.row,
        )
    except ValueError:
        raise SearchError(f"{path} has a row number that is not a whole number") from None
    if [r.row for r in rows] != list(range(len(rows))):
        raise SearchError(f"{path}: the rows are not numbered 0 to {len(rows) - 1}")
    return tuple(rows)


def _source_prefix(directory: Path) -> str | None:
    # The collected prefix turns a feature key back into its image's key (<prefix><key>.npy).
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        return S3Location.parse(str(manifest["source"])).prefix
    except (OSError, ValueError, KeyError, TypeError, InvalidS3Uri):
        return None


def _image_key(source_key: str, feature_key: str, prefix: str | None) -> str:
    # A key too long for S3 metadata is recorded as "sha256:<hex>"; its feature key holds it.
    if source_key and not source_key.startswith(_HASHED):
        return source_key
    recovered = source_key_of(prefix, feature_key) if prefix is not None else None
    return recovered or feature_key or source_key


def load(directory: Path) -> Dataset:
    """Map ``features.npy`` (never read whole) and read the index; their row counts must agree."""
    path = directory / FEATURES
    if not path.is_file():
        raise SearchError(f"{path} is missing: is {directory} a bottleneck-collect output?")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SearchError(f"{path} is not a readable .npy file: {exc}") from None
    if features.ndim < 2 or len(features) == 0:
        raise SearchError(f"{path} has shape {features.shape}: expected rows of features")
    if not np.issubdtype(features.dtype, np.number) or np.issubdtype(
        features.dtype, np.complexfloating
    ):
        raise SearchError(f"{path} holds {features.dtype}, not real numbers")
    index = load_index(directory)
    if len(index) != len(features):
        raise SearchError(f"{INDEX} has {len(index)} rows but {FEATURES} {len(features)}")
    row_shape = tuple(features.shape[1:])
    if features.ndim > 2:
        features = features.reshape(len(features), -1)  # a view: collect writes C order
    return Dataset(features, index, row_shape)


# ---------------------------------------------------------------------------- the query


def find_query(index: Sequence[IndexRow], query: str) -> int:
    """The row of ``query``: a source key, ``s3://bucket/key`` when the key alone is in
    several buckets, or a feature key. Unknown or ambiguous queries raise
    :class:`RequestError` naming them."""
    matches = [r for r in index if r.source_key == query]
    if not matches and query.startswith("s3://"):
        bucket, _, key = query[len("s3://") :].partition("/")
        matches = [r for r in index if r.source_bucket == bucket and r.source_key == key]
    if not matches:
        matches = [r for r in index if r.feature_key == query]
    if not matches:
        example = f" (keys look like {index[0].source_key!r})" if index else ""
        raise RequestError(f"no image {query!r} in the index{example}")
    if len(matches) > 1:
        buckets = sorted({r.source_bucket for r in matches})
        if len(buckets) > 1:
            spelled = " or ".join(f"s3://{bucket}/{query}" for bucket in buckets)
            raise RequestError(
                f"{query!r} is in {len(matches)} rows, from buckets {', '.join(buckets)}: "
                f"give it as {spelled}"
            )
        # The same image under two feature prefixes (two models collected together).
        raise RequestError(
            f"{query!r} is in {len(matches)} rows: give one of its feature keys, "
            f"{', '.join(r.feature_key for r in matches)}"
        )
    return matches[0].row


# ---------------------------------------------------------------------------- numpy


def normalise(block: np.ndarray) -> np.ndarray:
    """A float32 copy of ``block`` (rows of features) with every row scaled to unit length;
    rows of zero or non-finite norm become zero, so their similarity is 0, never NaN."""
    rows = np.array(block, dtype=np.float32, copy=True)
    if rows.ndim != 2:
        rows = rows.reshape(rows.shape[0], -1)
    norms, usable = _norms(rows)
    with np.errstate(invalid="ignore"):  # inf or NaN times 0: those rows are zeroed below
        rows *= np.divide(1.0, norms, out=np.zeros_like(norms), where=usable)[:, None]
    if not usable.all():
        rows[~usable] = 0.0
    return rows


def cosines(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity (float32) of each row of ``block`` with the unit vector ``query``:
    the rows' dot products divided by their norms, which is :func:`normalise` then a dot
    product without the normalised copy. Rows without a usable norm score 0."""
    rows = block if block.dtype == np.float32 else block.astype(np.float32)
    if rows.ndim != 2:
        rows = rows.reshape(rows.shape[0], -1)
    norms, usable = _norms(rows)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN rows: masked out just below
        dots = rows @ query
    return np.divide(dots, norms, out=np.zeros_like(norms), where=usable)


def _norms(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Zero rows and rows with NaN or inf (or squares past float32's range) have no direction.
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return norms, np.isfinite(norms) & (norms > 0)


def block_rows_for(dim: int) -> int:
    """Rows per block: about :data:`BLOCK_BYTES` of float32."""
    return max(1, BLOCK_BYTES // (4 * max(dim, 1)))


def top_k(
    features: np.ndarray, query: np.ndarray, k: int, *, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``features`` most similar to the unit vector ``query``.

    Returns ``(rows, similarities)``, best first; ties go to the lower row, and ``k`` beyond
    the row count gives every row. Each block of ``block_rows`` rows is read from the mapping,
    scored by :func:`cosines` and cut to its best ``k`` on its own; the running best and each
    block's are merged the same way.
    """
    n = len(features)
    step = block_rows or block_rows_for(int(np.prod(features.shape[1:])))
    best_rows = np.empty(0, np.int64)
    best_sims = np.empty(0, np.float32)
    for start in range(0, n, step):
        sims = cosines(features[start : start + step], query)
        keep = _best(sims, np.arange(start, start + len(sims)), k)
        rows = np.concatenate([best_rows, start + keep])
        sims = np.concatenate([best_sims, sims[keep]])
        keep = _best(sims, rows, k)
        best_rows, best_sims = rows[keep], sims[keep]
    return _ordered(best_rows, best_sims)


def _best(sims: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest ``sims`` (unordered); ties at the cut go to lower rows."""
    if len(sims) <= k:
        return np.arange(len(sims))
    cut = len(sims) - k
    part = np.argpartition(sims, cut)
    top = part[cut:]
    kth = sims[part[cut]]
    # argpartition splits equal values at the cut arbitrarily. Ties are common (every zero
    # vector scores exactly 0), and the rows decide them, or blocks and brute force would differ.
    if np.count_nonzero(sims == kth) > np.count_nonzero(sims[top] == kth):
        above = np.flatnonzero(sims > kth)
        tied = np.flatnonzero(sims == kth)
        tied = tied[np.argsort(rows[tied], kind="stable")][: k - len(above)]
        top = np.concatenate([above, tied])
    return top


def _ordered(rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Rounding can take a unit vector's dot with itself a hair past 1.
    sims = np.clip(sims, -1.0, 1.0)
    order = np.lexsort((rows, -sims))
    return rows[order], sims[order]


# ---------------------------------------------------------------------------- faiss


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported (``pip install faiss-cpu``); it is never required."""
    return importlib.util.find_spec("faiss") is not None


def choose_backend(requested: str, rows: int, available: bool) -> str:
    """``numpy`` or ``faiss``: ``auto`` takes faiss when it is importable and there are at
    least :data:`FAISS_MIN_ROWS` rows; asking for faiss without it is a :class:`RequestError`."""
    if requested not in BACKENDS:
        raise RequestError(f"unknown backend {requested!r}: choose from {', '.join(BACKENDS)}")
    if requested == "faiss" and not available:
        raise RequestError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
    if requested == "auto":
        return "faiss" if available and rows >= FAISS_MIN_ROWS else "numpy"
    return requested


def top_k_faiss(
    features: np.ndarray, query: np.ndarray, k: int, *, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` through a faiss ``IndexFlatIP`` of the normalised rows (inner product of
    unit vectors is cosine similarity); rows are added a block at a time, so the only full
    copy is faiss's own."""
    import faiss

    n = len(features)
    dim = int(np.prod(features.shape[1:]))
    step = block_rows or block_rows_for(dim)
    index = faiss.IndexFlatIP(dim)
    for start in range(0, n, step):
        index.add(normalise(features[start : start + step]))
    sims, rows = index.search(np.ascontiguousarray(query[None, :], np.float32), min(k, n))
    found = rows[0] >= 0  # faiss pads with -1 when it has fewer than k
    return _ordered(rows[0][found].astype(np.int64), sims[0][found].astype(np.float32))


# ---------------------------------------------------------------------------- search

_BACKEND_FUNCTIONS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "numpy": top_k,
    "faiss": top_k_faiss,
}


def nearest(
    features: np.ndarray,
    row: int,
    k: int,
    *,
    backend: str = "numpy",
    block_rows: int | None = None,
) -> list[tuple[int, float]]:
    """The ``k`` rows nearest to row ``row`` as ``(row, similarity)``, the query itself first.

    The query is rank 1 by construction, not by score: an identical copy under another key
    scores the same 1.0 and could otherwise come first by rounding or row order; and an
    all-zero query (similarity 0 to everything) still leads its own list.
    """
    if k < 1:
        raise RequestError(f"k must be at least 1, got {k}")
    query = normalise(features[row : row + 1])[0]
    rows, sims = _BACKEND_FUNCTIONS[backend](features, query, k, block_rows=block_rows)
    itself = float(np.clip(query @ query, -1.0, 1.0))
    others = [(int(r), float(s)) for r, s in zip(rows, sims, strict=True) if r != row]
    return [(row, itself), *others[: k - 1]]


def search(
    dataset: Dataset,
    query: str,
    k: int,
    *,
    backend: str = "numpy",
    block_rows: int | None = None,
) -> list[Neighbour]:
    """The ``k`` images nearest to ``query`` (see :func:`find_query`), the query first."""
    row = find_query(dataset.index, query)
    found = nearest(dataset.features, row, k, backend=backend, block_rows=block_rows)
    return [
        Neighbour(
            rank=rank,
            row=r,
            similarity=similarity,
            source_bucket=dataset.index[r].source_bucket,
            source_key=dataset.index[r].source_key,
        )
        for rank, (r, similarity) in enumerate(found, start=1)
    ]


def format_text(neighbours: Sequence[Neighbour], *, with_bucket: bool = False) -> str:
    """One line per neighbour: rank, similarity to 4 decimals, and the image's key (as
    ``s3://bucket/key`` with ``with_bucket``, for datasets that span several buckets)."""
    width = len(str(len(neighbours)))
    lines = []
    for n in neighbours:
        key = f"s3://{n.source_bucket}/{n.source_key}" if with_bucket else n.source_key
        # + 0.0 turns a -0.0 from rounding into 0.0, so it never prints as "-0.0000".
        lines.append(f"{n.rank:>{width}}  {round(n.similarity, 4) + 0.0:.4f}  {key}")
    return "".join(line + "\n" for line in lines)


def to_json(neighbours: Sequence[Neighbour], *, backend: str) -> dict[str, Any]:
    """The result as a JSON-ready object: the query, the backend, and every neighbour."""
    items = [
        {
            "rank": n.rank,
            "similarity": round(n.similarity, 6) + 0.0,
            "row": n.row,
            "source_bucket": n.source_bucket,
            "source_key": n.source_key,
        }
        for n in neighbours
    ]
    return {"query": items[0] if items else None, "backend": backend, "neighbours": items}
