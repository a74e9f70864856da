"""Write: serialise each image's features and put the feature file idempotently."""

from __future__ import annotations

import logging
import threading

from consumer import storage
from consumer.dedupe import ContentIndex
from consumer.errors import classify
from consumer.features import FeatureSettings, metadata, serialise
from consumer.inflight import InFlight
from consumer.objects import ObjectClient
from consumer.stats import Stats
from consumer.task_threads import TaskThreads
from consumer.work import ImageTask

log = logging.getLogger(__name__)

# Outcomes after which the file at the output key holds features computed here.
_NEW_FEATURES = (storage.WriteOutcome.WRITTEN, storage.WriteOutcome.REPLACED)


class Writer:
    """A pool of PUT workers; each resolves its image with the write's outcome."""

    def __init__(
        self,
        *,
        s3: ObjectClient,
        inflight: InFlight,
        stats: Stats,
        halted: threading.Event,
        settings: FeatureSettings,
        fingerprint: str,
        output_bucket: str,
        overwrite: bool,
        orphan_check: bool,
        concurrency: int,
        content_index: ContentIndex | None = None,
    ) -> None:
        self.s3 = s3
        self.inflight = inflight
        self.stats = stats
        self.halted = halted
        self.settings = settings
        self.fingerprint = fingerprint
        self.output_bucket = output_bucket
        self.overwrite = overwrite
        self.orphan_check = orphan_check
        self.content_index = content_index
        self.pool = TaskThreads(concurrency, "write")

    def submit(self, task: ImageTask) -> None:
        self.pool.submit(self._write, task)

    def shutdown(self, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_pending=not wait)

    def _write(self, task: ImageTask) -> None:
        if task.message.lost:
            self.inflight.done(task, "dropped")
            return
        try:
            assert task.features is not None
            body = serialise(task.features, self.settings.dtype)
            meta = metadata(
                source_bucket=task.ref.bucket,
                source_key=task.ref.key,
                source_etag=task.source_etag,
                settings=self.settings,
                fingerprint=self.fingerprint,
                shape=tuple(task.features.shape),
                source_sha256=task.content_sha256,
            )
            outcome = storage.write_feature(
                self.s3,
                bucket=self.output_bucket,
                key=task.output_key,
                body=body,
                metadata=meta,
                source=task.ref,
                source_etag=task.source_etag,
                fingerprint=self.fingerprint,
                overwrite=self.overwrite,
                orphan_check=self.orphan_check,
            )
            if self.content_index is not None and outcome in _NEW_FEATURES:
                self.content_index.record(task.content_sha256, task.output_key)
        except Exception as exc:
            failure = classify(exc)
            self.stats.image_failed(failure.error_code, permanent=failure.permanent)
            log.warning(
                "write failed",
                extra={"fields": {"key": task.output_key, "error_code": failure.error_code}},
            )
            self.inflight.failed(task, failure)
            return
        task.features = None
        self.stats.image_done(outcome.value)
        self.inflight.done(task, outcome.value)
