"""``s3://`` URIs: the one parser, and the one rule for what a prefix means.

A location names a folder: ``s3://feats/resnet50`` and ``s3://feats/resnet50/`` are both the
prefix ``resnet50/``, never the keys that merely start with ``resnet50`` (``resnet50-old/...``);
``s3://feats`` and ``s3://feats/`` are both the bucket root. The consumer writes feature files,
and every tool looks for them, by this rule, so that one spelling cannot send them to different
places. A URI that names one object (``--weights s3://models/r50.safetensors``) is read with
:func:`split_s3_uri`, which keeps the key exactly as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bottleneck_contract.features import feature_key

__all__ = ["InvalidS3Uri", "S3Location", "split_s3_uri"]

# Lenient on purpose: old us-east-1 buckets may have capitals and underscores.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class InvalidS3Uri(ValueError):
    """Not an ``s3://bucket[/key]`` URI; the message is one line, naming the option if given."""


def split_s3_uri(uri: str, option: str = "") -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``, the key exactly as written (possibly empty).

    Surrounding whitespace is ignored. ``option`` (a flag or variable name) starts the error
    message of :class:`InvalidS3Uri`.
    """
    text = uri.strip()
    lead = f"{option} " if option else ""
    if not text.startswith("s3://"):
        raise InvalidS3Uri(f"{lead}must look like s3://bucket/prefix/, got {uri!r}")
    bucket, _, key = text[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidS3Uri(f"{lead}has an invalid bucket name {bucket!r} in {uri!r}")
    return bucket, key


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix that is empty (the bucket root) or ends with ``/``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str, option: str = "") -> S3Location:
        """Parse ``s3://bucket[/prefix[/]]``; a prefix without its trailing ``/`` gains one."""
        bucket, prefix = split_s3_uri(uri, option)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(bucket, prefix)

    def contains(self, bucket: str, key: str) -> bool:
        """Whether ``bucket``/``key`` lies under this location."""
        return bucket == self.bucket and key.startswith(self.prefix)

    def feature_key(self, source_key: str) -> str:
        """The feature file key for a source key: ``<prefix><source key>.npy``."""
        return feature_key(self.prefix, source_key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
