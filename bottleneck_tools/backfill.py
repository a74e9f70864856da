"""Backfill: enqueue every image under an S3 prefix, streaming (the engine of the CLI).

Memory stays flat however many keys the prefix holds: listing pages (1,000 keys) flow through the
filter and out in batches of ten, with at most ``2 * concurrency`` batches in flight. With
``skip_existing`` the output prefix is listed once, side by side with the source listing, and the
two sorted streams are merge-joined: no HEAD per image, no set of every feature key.

Order matters for the join. S3 lists keys in UTF-8 binary order, which for Python strings is code
point order (UTF-8 preserves it), so ``str`` comparison is the right one. But the feature file of
``k`` is ``<out>k.npy``, and appending ``.npy`` does not preserve order when one key is a prefix
of another: ``a.jpg`` < ``a.jpg (1).jpg`` while ``a.jpg.npy`` > ``a.jpg (1).jpg.npy`` (space sorts
before '.'). :func:`in_feature_order` re-sorts the source stream by ``k + ".npy"`` with a small
heap that only holds keys while later keys still start with them.

Fast sources. With ``list_concurrency`` above 1 the prefix is listed in parallel, split at its
folders (:class:`bottleneck_tools.listing.ParallelListing`); with a ``manifest`` (an S3 Inventory,
a key list, reconcile's findings: :mod:`bottleneck_tools.manifest`) nothing is listed and the
manifest's data files are read in parallel. Either way each share of the key space (a prefix, a
data file) is filtered and joined on a reading thread, and handed to the one sending thread a few
hundred images at a time (:class:`bottleneck_tools.fanin.FanIn`), so sending starts with the first
page. The join needs key order, which a listing part has and a manifest usually has: a manifest
is joined in runs of keys in order, each run against the output listing from its first key on
(``StartAfter``), so an unordered key list costs one output listing call per out-of-order key.

A listing or reading error (no such bucket, access denied, a corrupt data file) stops the run
like an interrupt and is reported in ``error``; what was read before it is still sent.

Interrupts: Ctrl-C stops the listing, cancels batches not yet started and waits for the ones in
flight, then returns with ``interrupted`` set. Sent and failed counts are tallied by the batches
themselves, so the summary accounts for every image taken from the listing.

The sending (:class:`MessageSender` on a :class:`BoundedPool`) and the message of a listed image
(:func:`image_ref`) have their one home here: ``bottleneck-reconcile --fix`` sends through them
too, so its messages are exactly the ones ``bottleneck-enqueue`` sends.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.features import FEATURE_SUFFIX
from bottleneck_contract.locations import S3Location
from bottleneck_contract.logs import log
from bottleneck_contract.messages import ImageRef
from bottleneck_tools.fanin import FanIn, Stopped
from bottleneck_tools.listing import DELIMITER, Listed, ParallelListing, Part, list_objects
from bottleneck_tools.manifest import Manifest, ManifestError, Row
from producer_lambda.backoff import error_code
from producer_lambda.enqueue import MAX_BATCH, BatchOutcome, send_batch
from producer_lambda.filters import KeyFilter

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "SKIP_EXISTS",
    "BackfillResult",
    "BoundedPool",
    "Listed",
    "MessageSender",
    "image_ref",
    "in_feature_order",
    "key_order_runs",
    "list_objects",
    "run_backfill",
    "without_features",
]

T = TypeVar("T")

SKIP_EXISTS = "feature-exists"
# Images a reading task hands to the sending thread at a time: about a listing page's worth
# after filtering, and few enough that the first batches go out while the page is still young.
HAND_OVER = 200
# Parallel listing: folders are split down to this depth, until this many parts per worker exist.
SPLIT_DEPTH = 3
PARTS_PER_WORKER = 4

_log = logging.getLogger(__name__)


@dataclass
class BackfillResult:
    """Counts of one run; ``not_sent`` are images taken from the listing but never sent."""

    listed: int = 0
    selected: int = 0
    sent: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False
    dry_run: bool = False
    error: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def not_sent(self) -> int:
        return 0 if self.dry_run else self.selected - self.sent - self.failed

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: the counts, the skips by reason, and the first failures."""
        return {
            "listed": self.listed,
            "selected": self.selected,
            "sent": self.sent,
            "failed": self.failed,
            "not_sent": self.not_sent,
            "skipped": dict(sorted(self.skipped.items())),
            "interrupted": self.interrupted,
            "dry_run": self.dry_run,
            "error": self.error,
            "first_failures": self.failures,
        }


def in_feature_order(objects: Iterable[Listed], suffix: str = FEATURE_SUFFIX) -> Iterator[Listed]:
    """Re-sort a key-ordered stream into ``key + suffix`` order, holding back as little as possible.

    A key ``t`` already seen can be released once the current key does not start with ``t``: every
    later key is then greater than ``t`` without starting with it, and such keys keep their order
    when ``suffix`` is appended. So the heap holds only chains of keys that prefix one another
    (and the keys that sort after them), a handful in any real bucket.
    """
    heap: list[tuple[str, int, Listed]] = []
    for serial, obj in enumerate(objects):
        while heap and not obj.key.startswith(heap[0][2].key):
            yield heapq.heappop(heap)[2]
        heapq.heappush(heap, (obj.key + suffix, serial, obj))
    while heap:
        yield heapq.heappop(heap)[2]


def without_features(
    images: Iterable[Listed],
    feature_names: Iterable[str],
    skipped: Counter[str],
    suffix: str = FEATURE_SUFFIX,
) -> Iterator[Listed]:
    """The images (in key order) whose ``key + suffix`` is not among ``feature_names``.

    ``feature_names`` are the output listing's keys with the output prefix removed, in listing
    order; a merge-join walks both once. Skipped images are counted under :data:`SKIP_EXISTS`.
    """
    names = iter(feature_names)
    current = next(names, None)
    for image in in_feature_order(images, suffix):
        target = image.key + suffix
        while current is not None and current < target:
            current = next(names, None)
        if current == target:
            skipped[SKIP_EXISTS] += 1
            continue
        yield image


class _Run:
    """One run of :func:`key_order_runs`: ``first``, then the keys that follow it in order."""

    def __init__(self, first: Listed, rest: Iterator[Listed]) -> None:
        self.first = first
        self.next_first: Listed | None = None
        self._rest = rest
        self._walk = self._keys()

    def __iter__(self) -> Iterator[Listed]:
        return self._walk

    def _keys(self) -> Iterator[Listed]:
        previous = self.first
        yield previous
        for obj in self._rest:
            if obj.key < previous.key:
                self.next_first = obj
                return
            yield obj
            previous = obj


def key_order_runs(objects: Iterable[Listed]) -> Iterator[_Run]:
    """Split a stream into its longest runs in key order (equal keys stay in one run).

    A listing is one run; a manifest in key order is one run per data file. Each run is read
    lazily from the stream, and must be read to its end before the next one is asked for.
    """
    rest = iter(objects)
    first = next(rest, None)
    while first is not None:
        run = _Run(first, rest)
        yield run
        for _ in run:  # whatever the reader left of it
            pass
        first = run.next_first


def image_ref(bucket: str, obj: Listed) -> ImageRef:
    """The message for a listed image: its key, and the ETag and size the listing gave.

    The ETag lets a consumer that looks before it computes (``--existing-check head``) tell an
    up-to-date feature file from one made of an earlier upload without fetching the image.
    """
    return ImageRef(bucket=bucket, key=obj.key, etag=obj.etag, size=obj.size)


class BoundedPool:
    """Threads whose ``submit`` blocks while ``backlog`` tasks are queued or running.

    A producer that lists faster than the workers send then waits instead of piling up tasks
    (s3transfer's bounded executor), so memory stays flat however long the listing.
    :meth:`close` with ``stop`` cancels the tasks not yet started and waits for the running ones.
    """

    def __init__(self, workers: int, *, backlog: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(backlog)

    def submit(self, fn: Callable[[T], None], arg: T) -> None:
        """Run ``fn(arg)`` on a worker, waiting for room first; ``fn`` must not raise."""

        def task() -> None:
            try:
                fn(arg)
            finally:
                self._slots.release()

        self._slots.acquire()
        self._executor.submit(task)

    def close(self, *, stop: bool) -> bool:
        """Wait for the tasks (``stop``: only the running ones); True if a Ctrl-C came meanwhile.

        A Ctrl-C during the wait turns it into a stopping wait: the running tasks still finish,
        each within its client's timeouts, so what they did is never left uncounted.
        """
        interrupted = False
        while True:
            try:
                self._executor.shutdown(wait=True, cancel_futures=stop or interrupted)
                return interrupted
            except KeyboardInterrupt:
                interrupted = True


class MessageSender:
    """Sends image messages to the work queue, ten per ``SendMessageBatch``, on a bounded pool.

    :meth:`add` takes one image with a ``tag`` (a kind of work, counted apart); batches hold one
    tag each. ``on_outcome(outcome, tag)`` hears of every batch, from a worker thread. ``sent``
    and ``failed`` count images per tag, final once :meth:`close` has returned; images added but
    in neither were not sent (cancelled by a stop, or still in a partial batch).
    """

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        *,
        concurrency: int = 8,
        on_outcome: Callable[[BatchOutcome, str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._on_outcome = on_outcome
        self._sleep = sleep
        self._pool = BoundedPool(concurrency, backlog=2 * concurrency, name="enqueue")
        self._lock = threading.Lock()
        self._chunks: dict[str, list[ImageRef]] = {}
        self.sent: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def add(self, ref: ImageRef, tag: str = "") -> None:
        """Queue one image; a full batch goes out (waiting for room when too many are queued)."""
        chunk = self._chunks.setdefault(tag, [])
        chunk.append(ref)
        if len(chunk) == MAX_BATCH:
            self._submit(tag)

    def flush(self) -> None:
        """Send the partial batches too (the end of a run that was not stopped)."""
        for tag in list(self._chunks):
            self._submit(tag)

    def close(self, *, stop: bool) -> bool:
        """Wait for the batches (``stop``: only those already sending); True if interrupted."""
        return self._pool.close(stop=stop)

    def _submit(self, tag: str) -> None:
        chunk = self._chunks.pop(tag)
        self._pool.submit(self._send, (chunk, tag))

    def _send(self, work: tuple[list[ImageRef], str]) -> None:
        chunk, tag = work
        outcome = send_batch(self._sqs, self._queue_url, chunk, sleep=self._sleep)
        with self._lock:
            self.sent[tag] += len(outcome.sent)
            self.failed[tag] += len(outcome.failed)
        if self._on_outcome is not None:
            self._on_outcome(outcome, tag)


@dataclass
class _Share:
    """What a reading task hands to the sending thread: images, and what it read to find them."""

    images: list[Listed] = field(default_factory=list)
    listed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def take(self) -> _Share | None:
        """What was gathered since the last take (None if nothing); this share starts over."""
        if not (self.images or self.listed or self.skipped):
            return None
        taken = _Share(self.images, self.listed, self.skipped.copy())
        self.images = []
        self.listed = 0
        self.skipped.clear()
        return taken


class _PartReader:
    """Reads one share of the key space on a reading thread: filter, skip what is done, hand over.

    ``rows`` are a part's listing or a manifest data file's rows (a row may be a skip reason
    already: a delete marker, another bucket). Counts travel with the images they were read
    with, so that the run's summary covers exactly what the sending thread took.
    """

    def __init__(
        self,
        s3: S3Client,
        source: S3Location,
        key_filter: KeyFilter,
        existing: S3Location | None,
        hand_over: Callable[[_Share], None],
    ) -> None:
        self._s3 = s3
        self._source = source
        self._filter = key_filter
        self._existing = existing
        self._hand_over = hand_over

    def read(self, part: Part, rows: Iterable[Row]) -> None:
        """Read ``rows`` to the end (or to an error, after handing over what came before it)."""
        share = _Share()

        def accepted() -> Iterator[Listed]:
            for row in rows:
                share.listed += 1
                if isinstance(row, str):
                    share.skipped[row] += 1
                    continue
                reason = self._filter.reason(self._source.bucket, row.key, row.size)
                if reason is None:
                    yield row
                else:
                    share.skipped[reason] += 1

        def hand_over() -> None:
            taken = share.take()
            if taken is not None:
                self._hand_over(taken)

        images: Iterable[Listed] = accepted()
        if self._existing is not None:
            images = self._not_done(part, images, self._existing, share.skipped)
        try:
            for image in images:
                share.images.append(image)
                if len(share.images) >= HAND_OVER:
                    hand_over()
        except Stopped:
            raise
        except BaseException:
            hand_over()
            raise
        hand_over()

    def read_data_file(self, part: Part, rows: Callable[[], Iterable[Row]]) -> None:
        """:meth:`read` a manifest data file, opened here (on the reading thread)."""
        self.read(part, rows())

    def _not_done(
        self, part: Part, images: Iterable[Listed], existing: S3Location, skipped: Counter[str]
    ) -> Iterator[Listed]:
        """The images without a feature file: each run in key order is merge-joined with the
        output listing of the part, from the run's first key on."""
        cut = len(existing.prefix)

        def features_from(first_key: str) -> Iterator[str]:
            for obj in list_objects(
                self._s3,
                existing.bucket,
                existing.prefix + part.prefix,
                # A part of the keys right under a folder has its feature files right under the
                # output's folder: the delimiter keeps the sub-folders' files out of the join.
                delimiter=DELIMITER if part.direct else None,
                # Every feature name of a key >= first_key sorts after <prefix>first_key.
                start_after=existing.prefix + first_key,
            ):
                yield obj.key[cut:]

        for number, run in enumerate(key_order_runs(images)):
            if number == 1:
                log(_log, logging.WARNING, "keys-out-of-order", prefix=part.prefix)
            yield from without_features(run, features_from(run.first.key), skipped)


def run_backfill(
    *,
    s3: S3Client,
    sqs: SQSClient | None,
    source: S3Location,
    queue_url: str | None,
    key_filter: KeyFilter,
    existing: S3Location | None = None,
    dry_run: bool = False,
    concurrency: int = 8,
    on_sent: Callable[[int], None] | None = None,
    on_selected: Callable[[ImageRef], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    list_concurrency: int = 1,
    manifest: Manifest | None = None,
) -> BackfillResult:
    """List ``source`` (or read ``manifest``), keep what ``key_filter`` accepts, send it.

    ``existing``: an output location; images whose feature file is there are skipped. ``dry_run``
    sends nothing and calls ``on_selected`` for every image that would be sent. ``on_sent`` gets
    the number of images of each batch sent (from a worker thread). ``list_concurrency``: listings
    (split at the prefix's folders) or manifest data files read in parallel; 1 lists the prefix
    with one paginator. ``manifest``: read its keys instead of listing (they must still lie under
    ``source``).
    """
    result = BackfillResult(dry_run=dry_run)
    if not dry_run and (sqs is None or queue_url is None):
        raise ValueError("sqs and queue_url are required unless dry_run")
    lock = threading.Lock()
    fan: FanIn[_Share] = FanIn(list_concurrency, backlog=2 * list_concurrency, name="list")
    reader = _PartReader(s3, source, key_filter, existing, fan.emit)
    if manifest is not None:
        for read_rows in manifest.parts:
            fan.submit(functools.partial(reader.read_data_file, Part(source.prefix), read_rows))
    else:
        ParallelListing(
            s3,
            source.bucket,
            submit=fan.submit,
            on_part=reader.read,
            enough=PARTS_PER_WORKER * list_concurrency,
            max_depth=SPLIT_DEPTH if list_concurrency > 1 else 0,
        ).start(source.prefix)
    what = "reading the manifest" if manifest is not None else "listing"

    def shares() -> Iterator[Listed]:
        for share in fan.results():
            # Images count as listed as they are taken: a Ctrl-C amid a share leaves the rest
            # of it unlisted, so that listed = selected + skipped holds to the end.
            result.listed += share.listed - len(share.images)
            result.skipped.update(share.skipped)
            for image in share.images:
                result.listed += 1
                yield image

    if dry_run:
        try:
            for obj in shares():
                result.selected += 1
                if on_selected is not None:
                    on_selected(image_ref(source.bucket, obj))
        except KeyboardInterrupt:
            result.interrupted = True
        except (ClientError, BotoCoreError, ManifestError) as exc:
            result.error = _reading_error(what, exc)
        finally:
            if fan.close():
                result.interrupted = True
        return result

    assert sqs is not None and queue_url is not None

    def on_outcome(outcome: BatchOutcome, _tag: str) -> None:
        with lock:
            for failure in outcome.failed[: max(0, 10 - len(result.failures))]:
                result.failures.append(
                    {"key": failure.ref.key, "code": failure.code, "error": failure.message}
                )
        for failure in outcome.failed:
            log(
                _log,
                logging.WARNING,
                "send-failed",
                bucket=failure.ref.bucket,
                key=failure.ref.key,
                code=failure.code,
                error=failure.message,
            )
        if on_sent is not None and outcome.sent:
            on_sent(len(outcome.sent))

    sender = MessageSender(
        sqs, queue_url, concurrency=concurrency, on_outcome=on_outcome, sleep=sleep
    )
    try:
        for obj in shares():
            # Counted before it is added: an add can wait for room, and a Ctrl-C there drops
            # the batch it completed, which must show in not_sent.
            result.selected += 1
            sender.add(image_ref(source.bucket, obj))
        sender.flush()
    except KeyboardInterrupt:
        result.interrupted = True
    except (ClientError, BotoCoreError, ManifestError) as exc:
        result.error = _reading_error(what, exc)
    finally:
        # A completed run waits for every batch; a stopped one (Ctrl-C, listing error) stops the
        # readers, cancels the queued batches (they stay in not_sent) and waits for the rest.
        stopping = result.interrupted or result.error is not None
        if fan.close():
            result.interrupted = True
        if sender.close(stop=stopping):
            result.interrupted = True
        result.sent = sender.sent.total()
        result.failed = sender.failed.total()
    return result


def _reading_error(what: str, exc: BaseException) -> str:
    log(_log, logging.ERROR, "listing-failed", error=str(exc))
    if isinstance(exc, ManifestError):
        return f"{what} failed: {exc}"
    return f"{what} failed: {error_code(exc)}: {exc}"
