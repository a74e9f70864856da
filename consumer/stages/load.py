"""Load: fetch each object from S3 (I/O threads), then decode and crop it.

A GET is tens of milliseconds of waiting and about one of CPU; a decode is milliseconds of CPU.
With decode processes (the default) the fetch thread hands its image to an idle process and
waits, so the processes bound how many decodes run and the fetch threads how many encoded objects
are held. Decoding in this process (``--decode-isolation threads``) runs on a second pool of one
thread per core instead. Whatever the path, the encoded bytes held at once are bounded by a
budget (:mod:`consumer.byte_budget`) that each fetch takes its image's size from, before its GET
where the message names the size. The decoded uint8 pixels go to the batch queue; a full queue
blocks whoever decoded, which is how a slow model pushes back.
"""

from __future__ import annotations

import functools
import logging
import threading

from bottleneck_contract.features import is_current
from consumer import storage
from consumer.batch_queue import BatchQueue
from consumer.byte_budget import ByteBudget
from consumer.dedupe import ContentIndex, content_hash
from consumer.errors import classify
from consumer.inflight import InFlight
from consumer.objects import GetAbandoned, ObjectClient
from consumer.preprocess import Preparer
from consumer.stats import Stats
from consumer.task_threads import TaskThreads
from consumer.work import ImageTask

log = logging.getLogger(__name__)


class _SizeWaits(GetAbandoned):
    """An object's size does not fit the budget now: its GET ends with the body unread."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class Loader:
    """Fetch threads (and, decoding in this process, decode threads) feeding the batch queue."""

    def __init__(
        self,
        *,
        s3: ObjectClient,
        inflight: InFlight,
        out: BatchQueue[ImageTask],
        stats: Stats,
        halted: threading.Event,
        prepare: Preparer,
        fetch_concurrency: int,
        decode_threads: int,
        output_bucket: str,
        fingerprint: str,
        head_first: bool,
        content_index: ContentIndex | None = None,
        decode_on_device: bool = False,
        decode_inline: bool = False,
        budget: ByteBudget | None = None,
    ) -> None:
        self.s3 = s3
        self.inflight = inflight
        self.out = out
        self.stats = stats
        self.halted = halted
        self.prepare = prepare
        self.max_bytes = prepare.limits.max_bytes
        self.output_bucket = output_bucket
        self.fingerprint = fingerprint
        self.head_first = head_first
        self.content_index = content_index
        # --decode cuda: the inference thread decodes whole micro-batches on the device, so
        # the encoded bytes go straight to the batch queue.
        self.decode_on_device = decode_on_device
        # The encoded bytes held between the GETs and the decodes (consumer.byte_budget).
        self.budget = budget
        # Decode processes (the default) do the work and admit one image per child; the thread
        # that fetched an image then only waits for one, so it decodes the image itself: a
        # second pool would add a hand-off and a thread's wake-up per image and nothing else.
        self.fetch_pool = TaskThreads(fetch_concurrency, "fetch")
        self.decode_pool = (
            None if decode_inline or decode_on_device else TaskThreads(decode_threads, "decode")
        )

    def submit(self, task: ImageTask) -> None:
        self.fetch_pool.submit(self._fetch, task)

    def shutdown(self) -> None:
        if self.budget is not None:
            self.budget.close()  # fetches waiting for bytes give up: the worker is halted
        self.fetch_pool.shutdown(wait=False, cancel_pending=True)
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_pending=True)

    def _abandoned(self, task: ImageTask) -> bool:
        """A lost message's image is dropped; a halted worker leaves it for the release."""
        if task.message.lost:
            self.inflight.done(task, "dropped")
            return True
        return self.halted.is_set()

    def _fetch(self, task: ImageTask) -> None:
        if self._abandoned(task):
            return None
        try:
            if self.head_first and self._already_done(task, task.ref.etag):
                return None
            # The budget bounds the downloads, not only what waits for decode: the size the
            # message names is taken before the GET; the object's own size (a message that
            # names none, or another: replaced since) once the GET's headers are in, before
            # its body is read. No connection waits: where that size does not fit at once,
            # the body is left unread, the budget waited for, and the GET sent again.
            named = task.ref.size if (task.ref.size or 0) <= self.max_bytes else None
            if (
                named is not None
                and self.budget is not None
                and not self._hold_before_get(task, named)
            ):
                return None  # halted, or lost, while it waited for the budget
            on_size = None if self.budget is None else functools.partial(self._hold_body, task)
            fetched, size = None, 0
            while fetched is None:
                try:
                    fetched = storage.fetch(
                        self.s3, task.ref, max_bytes=self.max_bytes, on_size=on_size
                    )
                except _SizeWaits as waits:
                    size = waits.size
                # Waited for outside the except block: its traceback holds the GET's frames.
                if fetched is None and not self._hold_before_get(task, size):
                    return None  # halted, or lost, while it waited for the budget
            # A client that reports no size before the body: held now, as it is.
            if task.budget is None and not self._hold(task, len(fetched.data)):
                return None
            task.source_etag = fetched.etag
            task.data = fetched.data
            task.content_sha256 = content_hash(fetched.data)
            if self.head_first and not task.ref.etag and self._already_done(task, fetched.etag):
                return None
            if self.content_index is not None and self._copied(task, self.content_index):
                return None
        except Exception as exc:
            if self._deleted_since_sent(task, exc):
                return None
            return self._fail(task, exc)
        if self.decode_on_device:
            return self._hand_over(task)
        if self.decode_pool is None:
            return self._decode(task)
        try:
            self.decode_pool.submit(self._decode, task)
        except RuntimeError:
            if not self.halted.is_set():
                raise
            # Halted, the decode threads shut down under this fetch: its message is released.
        return None

    def _hold(self, task: ImageTask, size: int) -> bool:
        """Take ``size`` bytes of the budget for ``task``, waiting while it is spent (``False``
        once the worker halts). Given back by :meth:`ImageTask.drop_data`, which resolving the
        image calls in any case."""
        if self.budget is None:
            return True
        if not self.budget.take(size):
            return False
        task.budget, task.budgeted = self.budget, size
        return True

    def _hold_before_get(self, task: ImageTask, size: int) -> bool:
        """Hold ``size`` bytes before a GET; ``False`` (holding nothing) if the worker halted or
        the message was lost while it waited."""
        if not self._hold(task, size):
            return False
        if self._abandoned(task):
            task.drop_data()  # a halt resolves nothing: the share would stay taken
            return False
        return True

    def _hold_body(self, task: ImageTask, size: int) -> None:
        """The GET's ``on_size``: hold the object's size before its body is read, if it fits
        now; else end the GET unread (:class:`_SizeWaits`) for the fetch to wait without it."""
        if task.budget is not None:
            if size == task.budgeted:
                return  # as its message said, or as held before this GET
            # Replaced since its message named a size: the share is given back and the real
            # size taken afresh (one that waited holding a share could wait on another).
            task.drop_data()
        assert self.budget is not None  # on_size is given only with a budget
        if not self.budget.try_take(size):
            raise _SizeWaits(size)
        task.budget, task.budgeted = self.budget, size

    def _already_done(self, task: ImageTask, etag: str | None) -> bool:
        """``--existing-check head``: skip an image whose current feature file is there."""
        if not etag:
            return False
        existing = storage.head(self.s3, self.output_bucket, task.output_key)
        if existing is None or not is_current(existing.metadata, etag.strip('"'), self.fingerprint):
            return False
        self.stats.image_done("exists")
        self.inflight.done(task, "exists")
        return True

    def _copied(self, task: ImageTask, index: ContentIndex) -> bool:
        """``--dedupe content``: the same bytes have current features: copy them, no pass."""
        found = index.find(task.content_sha256)
        if found is None:
            return False
        if found.key == task.output_key and found.metadata.get("source-etag") == task.source_etag:
            outcome = "exists"  # our own file, from an earlier delivery
        else:
            index.copy(
                found,
                to_key=task.output_key,
                source_bucket=task.ref.bucket,
                source_key=task.ref.key,
                source_etag=task.source_etag,
            )
            outcome = "copied"
        task.drop_data()
        self.stats.image_done(outcome)
        self.inflight.done(task, outcome)
        return True

    def _deleted_since_sent(self, task: ImageTask, exc: BaseException) -> bool:
        """A missing image whose message names its ETag existed when the message was sent (an
        upload event or a listing): it was deleted since, which is no failure, and no feature
        file is owed. Without an ETag a missing image may never have existed: a dead letter."""
        if not task.ref.etag or classify(exc).error_code != "not-found":
            return False
        log.info(
            "image deleted before it was fetched",
            extra={"fields": {"bucket": task.ref.bucket, "key": task.ref.key}},
        )
        self.stats.image_done("source-gone")
        self.inflight.done(task, "source-gone")
        return True

    def _decode(self, task: ImageTask) -> None:
        if self._abandoned(task):
            return None
        try:
            assert task.data is not None
            task.pixels = self.prepare(task.data)
            task.drop_data()  # the encoded bytes are no longer needed: keep memory bounded
        except Exception as exc:
            if self.halted.is_set():  # the decoders stopped under it: released, not failed
                return None
            return self._fail(task, exc)
        return self._hand_over(task)

    def _hand_over(self, task: ImageTask) -> None:
        """To the batch queue; a full queue blocks here, which is how a slow model pushes back."""
        while not self.halted.is_set():
            if self.out.put(task, timeout=0.2):
                return None
        return None  # halted: the message is released with its other unfinished images

    def _fail(self, task: ImageTask, exc: BaseException) -> None:
        failure = classify(exc)
        self.stats.image_failed(failure.error_code, permanent=failure.permanent)
        log.log(
            logging.WARNING if failure.permanent else logging.INFO,
            "image failed",
            extra={
                "fields": {
                    "bucket": task.ref.bucket,
                    "key": task.ref.key,
                    "error_code": failure.error_code,
                    "permanent": failure.permanent,
                    "detail": failure.detail,
                }
            },
        )
        self.inflight.failed(task, failure)
