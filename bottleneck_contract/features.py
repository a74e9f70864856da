"""Feature files as every side sees them: where one lies, and what its S3 user metadata says.

Pure, standard library only. The consumer writes feature files by these rules; the tools find,
judge and collect them by the same rules. A feature file for source key ``k`` under an output
prefix ``p`` is ``p + k + ".npy"``; its user metadata names the source (bucket, percent-encoded
key, ETag) and the settings behind the numbers, summed up in ``fingerprint``, so that an existing
file can be judged current or out of date without reading it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from urllib.parse import quote, unquote

__all__ = [
    "DTYPE",
    "FEATURE_SUFFIX",
    "FINGERPRINT",
    "HEAD",
    "MAX_KEY_BYTES",
    "MAX_METADATA_BYTES",
    "METADATA_KEYS",
    "MODEL",
    "NORMALIZE",
    "POOL",
    "SHAPE",
    "SOURCE_BUCKET",
    "SOURCE_ETAG",
    "SOURCE_KEY",
    "SOURCE_SHA256",
    "WEIGHTS",
    "decode_key",
    "decode_weights",
    "encode_key",
    "feature_key",
    "feature_metadata",
    "for_source",
    "is_current",
    "metadata_size",
    "source_key_of",
]

FEATURE_SUFFIX = ".npy"
# S3 limits: keys are at most 1024 bytes of UTF-8; user metadata at most 2 KB, counted as the
# UTF-8 bytes of every key and value (without the x-amz-meta- prefix).
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048

# The user-metadata keys of every feature file (INTERFACE.md, "Feature files").
SOURCE_BUCKET = "source-bucket"
SOURCE_KEY = "source-key"
SOURCE_ETAG = "source-etag"
MODEL = "model"
WEIGHTS = "weights"
POOL = "pool"
SHAPE = "shape"
DTYPE = "dtype"
FINGERPRINT = "fingerprint"
# Beyond INTERFACE.md's keys: what the pooled vector is (the model's head kept or dropped) and
# whether it was L2-normalised, so a reader knows which space the numbers are in.
HEAD = "head"
NORMALIZE = "normalize"
# Beyond INTERFACE.md's keys: SHA-256 of the image bytes the features were computed from (what
# --dedupe content matches on; also lets a user find identical images).
SOURCE_SHA256 = "source-sha256"
METADATA_KEYS = (
    SOURCE_BUCKET,
    SOURCE_KEY,
    SOURCE_ETAG,
    MODEL,
    WEIGHTS,
    POOL,
    SHAPE,
    DTYPE,
    FINGERPRINT,
)

# Unreserved URL characters plus "/": ordinary keys stay readable in the metadata.
_KEY_SAFE = "/-_.~!*'()"
# Weights identities also hold "s3://..." and "pretrained:timm/...=...".
_WEIGHTS_SAFE = _KEY_SAFE + ":="
_HASHED = "sha256:"


def feature_key(prefix: str, source_key: str) -> str:
    """``<prefix><source key>.npy``: the one mapping from an image to its feature file."""
    return f"{prefix}{source_key}{FEATURE_SUFFIX}"


def source_key_of(prefix: str, key: str) -> str | None:
    """The source key a feature key under ``prefix`` belongs to; ``None`` if it is not one."""
    if not key.startswith(prefix) or not key.endswith(FEATURE_SUFFIX):
        return None
    return key[len(prefix) : -len(FEATURE_SUFFIX)]


def encode_key(source_key: str) -> str:
    """Percent-encoded UTF-8 form of a key, safe for (ASCII-only) S3 metadata."""
    return quote(source_key, safe=_KEY_SAFE)


def decode_key(value: str) -> str:
    """The key that :func:`encode_key` encoded (a ``sha256:`` stand-in comes back unchanged)."""
    return unquote(value)


def decode_weights(value: str) -> str:
    """The weights identity as the consumer knew it, from the ``weights`` metadata value."""
    return unquote(value)


def feature_metadata(
    *,
    source_bucket: str,
    source_key: str,
    source_etag: str,
    model: str,
    weights: str,
    pool: str,
    shape: tuple[int, ...],
    dtype: str,
    fingerprint: str,
    source_sha256: str = "",
    head: str = "",
    normalize: str = "",
) -> dict[str, str]:
    """The contract's user metadata for one feature file, always within S3's 2 KB.

    When a very long key would not fit, ``source-key`` holds ``sha256:<hex>`` of the key: the
    key itself is still recoverable from the feature file's own key.
    """
    meta = {
        SOURCE_BUCKET: source_bucket,
        SOURCE_KEY: encode_key(source_key),
        SOURCE_ETAG: source_etag,
        MODEL: model,
        WEIGHTS: quote(weights, safe=_WEIGHTS_SAFE),
        POOL: pool,
        SHAPE: "x".join(str(d) for d in shape),
        DTYPE: dtype,
        FINGERPRINT: fingerprint,
    }
    if source_sha256:
        meta[SOURCE_SHA256] = source_sha256
    if head:
        meta[HEAD] = head
    if normalize:
        meta[NORMALIZE] = normalize
    return _fit(meta, source_key)


def for_source(
    meta: Mapping[str, str], *, source_bucket: str, source_key: str, source_etag: str
) -> dict[str, str]:
    """``meta`` of one feature file made to name another image with the same bytes (a copy's,
    ``--dedupe content``), within S3's 2 KB by the same rule as :func:`feature_metadata`."""
    moved = dict(meta)
    moved[SOURCE_BUCKET] = source_bucket
    moved[SOURCE_KEY] = encode_key(source_key)
    moved[SOURCE_ETAG] = source_etag
    return _fit(moved, source_key)


def _fit(meta: dict[str, str], source_key: str) -> dict[str, str]:
    """When a very long key would push ``meta`` over 2 KB, its ``sha256:<hex>`` stands in."""
    if metadata_size(meta) > MAX_METADATA_BYTES:
        meta[SOURCE_KEY] = _HASHED + hashlib.sha256(source_key.encode("utf-8")).hexdigest()
    return meta


def metadata_size(meta: Mapping[str, str]) -> int:
    """Bytes S3 counts against the user-metadata limit."""
    # Two joins, not a loop over the pairs: UTF-8 lengths add up under concatenation.
    return len("".join(meta).encode("utf-8")) + len("".join(meta.values()).encode("utf-8"))


def is_current(existing: Mapping[str, str], source_etag: str, fingerprint: str) -> bool:
    """Whether an existing file's metadata matches this source version and these settings."""
    return existing.get(SOURCE_ETAG) == source_etag and existing.get(FINGERPRINT) == fingerprint
