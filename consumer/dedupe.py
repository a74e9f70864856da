"""``--dedupe content``: identical bytes under another key get a copy of features, not a pass.

Users store the same photo under many keys (albums, re-imports, backups). The consumer already
records the SHA-256 of the bytes it fetched in each feature file's metadata (``source-sha256``);
with ``--dedupe content`` it also keeps a small index beside the feature files:

``<output prefix>_bottleneck/content/<fingerprint>/<sha256>``: an empty object whose metadata
``feature-key`` (percent-encoded) names a feature file computed from those bytes with those
settings.

After the fetch, an image whose hash is in the index gets a server-side copy of the file the
entry names, with its own source metadata, instead of a decode and a forward pass. The index
is a hint, never trusted: the file it names is used only while its own metadata still says the
same fingerprint and the same ``source-sha256`` (it may have been replaced or deleted since).
An entry is written create-only after a feature file is written; one that names a file that no
longer matches is replaced conditionally on its ETag, so two writers never fight over it.

Costs, per image: one HEAD of the index (a miss) or two HEADs and a COPY (a hit, which saves
the decode, the model and the PUT); per new content one more PUT (the entry). Worth it where
duplicates are common; off by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from urllib.parse import quote, unquote

from bottleneck_contract.features import FINGERPRINT, SOURCE_SHA256, for_source
from consumer.objects import ConditionFailed, Existing, ObjectClient
from consumer.storage import CONTENT_TYPE

log = logging.getLogger(__name__)

CONTENT_INDEX = "_bottleneck/content/"
FEATURE_KEY = "feature-key"
_ENTRY_TYPE = "application/octet-stream"


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (hashlib releases the GIL for buffers over 2 KB)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Found:
    """A current feature file computed from the same bytes with the same settings."""

    key: str
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class ContentIndex:
    """The index of one output prefix and fingerprint, over the hot path's object client."""

    objects: ObjectClient
    bucket: str
    prefix: str
    fingerprint: str

    def entry_key(self, sha256: str) -> str:
        return f"{self.prefix}{CONTENT_INDEX}{self.fingerprint}/{sha256}"

    def find(self, sha256: str) -> Found | None:
        """The feature file the index names for ``sha256``, if it still matches."""
        entry = self.objects.head(self.bucket, self.entry_key(sha256))
        if entry is None:
            return None
        return self._matching(entry, sha256)

    def copy(
        self, found: Found, *, to_key: str, source_bucket: str, source_key: str, source_etag: str
    ) -> None:
        """Copy ``found`` to ``to_key`` server-side with this image's source metadata."""
        meta = for_source(
            found.metadata,
            source_bucket=source_bucket,
            source_key=source_key,
            source_etag=source_etag,
        )
        self.objects.copy(self.bucket, found.key, to_key, metadata=meta, content_type=CONTENT_TYPE)

    def record(self, sha256: str, feature_key: str) -> None:
        """Name ``feature_key`` as the features of ``sha256`` (after it was written)."""
        key = self.entry_key(sha256)
        meta = {FEATURE_KEY: quote(feature_key, safe="/-_.~")}
        try:
            self.objects.put(self.bucket, key, b"", metadata=meta, content_type=_ENTRY_TYPE)
            return
        except ConditionFailed:
            pass
        entry = self.objects.head(self.bucket, key)
        if entry is None or self._matching(entry, sha256) is not None:
            return  # gone again (the next writer records it), or already naming good features
        # Conditional on the stale entry: a writer that replaced it first wins, theirs is as good.
        with contextlib.suppress(ConditionFailed):
            self.objects.put(
                self.bucket, key, b"", metadata=meta, content_type=_ENTRY_TYPE, if_match=entry.etag
            )

    def _matching(self, entry: Existing, sha256: str) -> Found | None:
        named = unquote(entry.metadata.get(FEATURE_KEY, ""))
        if not named:
            return None
        existing = self.objects.head(self.bucket, named)
        if existing is None:
            return None
        meta = existing.metadata
        if meta.get(FINGERPRINT) != self.fingerprint or meta.get(SOURCE_SHA256) != sha256:
            log.info(
                "content index entry names a file that no longer matches",
                extra={"fields": {"entry": self.entry_key(sha256), "feature_key": named}},
            )
            return None
        return Found(named, dict(meta))
