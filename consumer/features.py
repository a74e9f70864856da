"""Feature files as the consumer makes them: their fingerprint, their key, metadata and bytes.

All pure. Where a feature file goes and what its metadata says is the shared contract
(:mod:`bottleneck_contract.features`); this module adds what only the consumer knows: the settings
behind the numbers (summed up in ``fingerprint``), S3's key limit as a permanent failure, and the
``.npy`` serialisation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass

import numpy as np

from bottleneck_contract.features import MAX_KEY_BYTES, feature_key, feature_metadata
from consumer.errors import PermanentError
from consumer.preprocess import InputSpec


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """Everything that changes the numbers in a feature file."""

    model: str
    weights: str
    pool: str
    spec: InputSpec
    dtype: str
    precision: str
    decode: str
    head: str  # "keep" or "drop", resolved (never "auto")
    normalize: str
    # The libraries that compute the numbers, major.minor (see library_versions): a patch
    # release must not make every feature file out of date; a minor one may change kernels,
    # resampling or model code.
    libraries: str

    def fingerprint(self) -> str:
        """A short hash of every numeric setting (16 hex digits of SHA-256 over canonical JSON)."""
        doc = asdict(self)
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def major_minor(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14``; a version without a major.minor start stays as it is."""
    match = re.match(r"\d+\.\d+", version)
    return match.group(0) if match else version


def library_versions(versions: dict[str, str]) -> str:
    """``pillow=13.0 timm=1.0 torch=2.14``: the libraries' versions, major.minor, sorted."""
    return " ".join(f"{name}={major_minor(v)}" for name, v in sorted(versions.items()))


def output_key(prefix: str, source_key: str) -> str:
    """``<prefix><source key>.npy``; a key S3 cannot hold is a permanent failure."""
    key = feature_key(prefix, source_key)
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise PermanentError(
            "key-too-long",
            f"feature key would be {size} bytes of UTF-8; S3 allows {MAX_KEY_BYTES}",
        )
    return key


def metadata(
    *,
    source_bucket: str,
    source_key: str,
    source_etag: str,
    settings: FeatureSettings,
    fingerprint: str,
    shape: tuple[int, ...],
    source_sha256: str = "",
) -> dict[str, str]:
    """The contract's user metadata for one feature file written with ``settings``."""
    return feature_metadata(
        source_bucket=source_bucket,
        source_key=source_key,
        source_etag=source_etag,
        model=settings.model,
        weights=settings.weights,
        pool=settings.pool,
        shape=shape,
        dtype=settings.dtype,
        fingerprint=fingerprint,
        head=settings.head,
        normalize=settings.normalize,
        source_sha256=source_sha256,
    )


def serialise(features: np.ndarray, dtype: str) -> bytes:
    """The ``.npy`` bytes of ``features`` in ``dtype`` (loadable with ``allow_pickle=False``):
    exactly what ``np.save`` writes, its header made once per shape and dtype (every image of
    a run has the same), then the raw bytes."""
    array = np.ascontiguousarray(features, dtype=np.dtype(dtype))
    return _npy_header(array.shape, array.dtype.str) + array.tobytes()


@functools.lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    empty = np.zeros(shape, dtype=dtype)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, empty, allow_pickle=False)
    whole = buffer.getvalue()
    return whole[: len(whole) - empty.nbytes]
