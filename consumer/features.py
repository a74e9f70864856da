"""Feature files: where they go, what metadata they carry, their fingerprint and their bytes.

All pure. A feature file for source key ``k`` lives at ``<output prefix>k.npy``; its S3 user
metadata identifies the source (bucket, key, ETag) and the settings that produced the numbers,
summed up in ``fingerprint``, so that an existing file can be judged current or out of date
without reading it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from urllib.parse import quote

import numpy as np

from consumer.errors import PermanentError
from consumer.preprocess import InputSpec

# S3 limits: keys are at most 1024 bytes of UTF-8; user metadata at most 2 KB, counted as the
# UTF-8 bytes of every key and value (without the x-amz-meta- prefix).
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048
# Unreserved URL characters plus "/": ordinary keys stay readable in the metadata.
_KEY_SAFE = "/-_.~!*'()"


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

    def fingerprint(self) -> str:
        """A short hash of every numeric setting (16 hex digits of SHA-256 over canonical JSON)."""
        doc = asdict(self)
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def output_key(prefix: str, source_key: str) -> str:
    """``<prefix><source key>.npy``; a key S3 cannot hold is a permanent failure."""
    key = f"{prefix}{source_key}.npy"
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise PermanentError(
            "key-too-long",
            f"feature key would be {size} bytes of UTF-8; S3 allows {MAX_KEY_BYTES}",
        )
    return key


def encode_key(source_key: str) -> str:
    """Percent-encoded UTF-8 form of a key, safe for (ASCII-only) S3 metadata."""
    return quote(source_key, safe=_KEY_SAFE)


def metadata(
    *,
    source_bucket: str,
    source_key: str,
    source_etag: str,
    settings: FeatureSettings,
    fingerprint: str,
    shape: tuple[int, ...],
) -> dict[str, str]:
    """The contract's user metadata for one feature file, always within S3's 2 KB.

    When a very long key would not fit, ``source-key`` holds ``sha256:<hex>`` of the key: the
    key itself is still recoverable from the feature file's own key.
    """
    meta = {
        "source-bucket": source_bucket,
        "source-key": encode_key(source_key),
        "source-etag": source_etag,
        "model": settings.model,
        "weights": quote(settings.weights, safe=_KEY_SAFE + ":="),
        "pool": settings.pool,
        "shape": "x".join(str(d) for d in shape),
        "dtype": settings.dtype,
        "fingerprint": fingerprint,
    }
    if metadata_size(meta) > MAX_METADATA_BYTES:
        meta["source-key"] = "sha256:" + hashlib.sha256(source_key.encode("utf-8")).hexdigest()
    return meta


def metadata_size(meta: Mapping[str, str]) -> int:
    """Bytes S3 counts against the user-metadata limit."""
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in meta.items())


def is_current(existing: Mapping[str, str], source_etag: str, fingerprint: str) -> bool:
    """Whether an existing file's metadata matches this source version and these settings."""
    return existing.get("source-etag") == source_etag and existing.get("fingerprint") == fingerprint


def serialise(features: np.ndarray, dtype: str) -> bytes:
    """The ``.npy`` bytes of ``features`` in ``dtype`` (loadable with ``allow_pickle=False``)."""
    array = np.ascontiguousarray(features, dtype=np.dtype(dtype))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()
