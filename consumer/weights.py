"""Where the backbone's weights come from, and the identity that goes into the fingerprint.

``--weights`` takes ``pretrained`` (timm's normal loading from the Hugging Face cache), a local
``.safetensors``/``.pth`` file, an ``s3://`` URI (downloaded once into a cache keyed by the
object's ETag), or ``random`` (seeded; for demos and tests only). Files are identified by the
SHA-256 of their content, so the same weights reached by two paths give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottleneck_contract.locations import split_s3_uri
from consumer import aws
from consumer.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
BAKE_HINT = (
    "bake weights into the image at build time (docker build --build-arg MODEL=<name>, "
    "see the README) or pass --weights /path/to/model.safetensors or s3://bucket/key"
)


@dataclass(frozen=True, slots=True)
class WeightsSource:
    """Resolved ``--weights``: a file to load, timm's pretrained loading, or seeded random."""

    kind: str  # "pretrained" | "file" | "random"
    file: Path | None = None
    digest: str | None = None
    seed: int = 0

    @property
    def identity(self) -> str:
        """Stable text for the fingerprint (pretrained identity is added once the model exists)."""
        if self.kind == "file":
            return f"sha256:{self.digest}"
        if self.kind == "random":
            return f"random:seed={self.seed}"
        return "pretrained"


def resolve_weights(spec: str, *, seed: int, cache_dir: Path, s3: Any = None) -> WeightsSource:
    """Turn the ``--weights`` text into a :class:`WeightsSource`, downloading ``s3://`` once.

    ``s3`` is a boto3 S3 client, needed only for ``s3://`` URIs.
    """
    if spec == "pretrained":
        return WeightsSource("pretrained")
    if spec == "random":
        log.warning(
            "using random weights (--weights random): features are NOT ImageNet features; "
            "for demos and tests only",
            extra={"fields": {"seed": seed}},
        )
        return WeightsSource("random", seed=seed)
    if spec.startswith("s3://"):
        if s3 is None:
            raise ConfigError("--weights: an s3:// URI needs an S3 client")
        path = _download_cached(spec, cache_dir, s3)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"--weights: no such file {spec!r}")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(
            f"--weights: {path.name!r} is not a .safetensors, .pth, .pt or .bin weights file"
        )
    return WeightsSource("file", file=path, digest=file_digest(path))


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (read in 1 MiB chunks)."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _download_cached(uri: str, cache_dir: Path, s3: Any) -> Path:
    try:
        bucket, key = split_s3_uri(uri)
    except ValueError as exc:
        raise ConfigError(f"--weights: {exc}") from None
    if not key or key.endswith("/"):
        raise ConfigError(f"--weights: {uri!r} names a folder, not a weights file")
    try:
        # The consumer's S3 client leaves retries to aws.call (botocore's are off).
        head = aws.call(s3.head_object, Bucket=bucket, Key=key)
    except Exception as exc:
        raise ConfigError(f"--weights: cannot read {uri}: {exc}") from None
    etag = str(head.get("ETag", "")).strip('"') or "no-etag"
    # The ETag is part of the path: a replaced object is downloaded again, never mixed up.
    target = cache_dir / "weights" / bucket / etag / Path(key).name
    if target.is_file() and target.stat().st_size == head.get("ContentLength", -1):
        log.info("weights found in cache", extra={"fields": {"uri": uri, "path": str(target)}})
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target, then rename: a crash never leaves a half file under its name.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    os.close(fd)
    try:
        aws.call(s3.download_file, bucket, key, tmp)
        os.replace(tmp, target)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"--weights: download of {uri} failed: {exc}") from None
    log.info("weights downloaded", extra={"fields": {"uri": uri, "path": str(target)}})
    return target
