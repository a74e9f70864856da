"""``bottleneck-reconcile --fix``: act on the findings of :mod:`bottleneck_tools.reconcile` as
they stream by, and account for every one.

* ``missing`` and stale images go to the work queue (``--queue-url`` or ``BOTTLENECK_QUEUE_URL``)
  with the very messages ``bottleneck-enqueue`` sends (bucket, key, and the ETag and size of the
  listing), through its sender (:mod:`bottleneck_tools.backfill`); an image stale in both ways
  is sent once. The consumer replaces an out-of-date file with ``If-Match``: the image's current
  ETag and the consumer's own fingerprint decide, so a ``stale-fingerprint`` file is replaced only
  by a consumer that runs with the expected fingerprint (``--fingerprint`` names it; the majority
  is only a guess).
* ``orphan`` files are deleted with DeleteObjects, up to 1,000 keys a call, each conditional on
  the ETag it was listed with, after a HEAD that confirms it. A file that changed since the
  listing (rewritten for a re-uploaded image), is gone already, or names another
  ``source-bucket`` than the source's is left in place and counted: a mistyped source bucket
  with the right prefix would otherwise make every feature file an orphan.
* ``orphan-row`` shard rows cannot be deleted (a shard is immutable, and deleting it would take
  every other row with it): each gone image is HEADed (the time taken first), and those that
  answer 404 get a tombstone line, all in one create-only object under
  ``<output>shards/tombstones/`` written at the end (the delete handler's own
  :func:`producer_lambda.removals.put_tombstones`). An image that answers 200 is left alone
  (``image-exists``).

Deletes run on a worker thread and sends on ``--concurrency`` threads, never on the main one, so
Ctrl-C stops the listing, cancels what has not started, lets the requests in flight finish and
reports exactly what was done. ``--dry-run`` changes nothing: it prints the files it would delete
(after the same HEADs) and the messages it would send.

:class:`Fixer` is what the command line drives (``take`` each finding, ``flush``, ``finish``);
its :class:`FixReport` says what was deleted, enqueued, left in place, failed and not done
(:func:`render_fix` in one line, ``summary()`` as the ``"fix"`` part of the JSON summary), and
:func:`render_plan` writes a dry run's lines. The option parsing, the report, the exit status
and the clients stay with the command line in :mod:`bottleneck_tools.reconcile`; this module
imports that one (for the findings it acts on), never the other way round at import time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.features import SOURCE_BUCKET
from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import encode
from bottleneck_contract.retry import Backoff
from bottleneck_contract.shards import Tombstone
from bottleneck_tools.backfill import BoundedPool, Listed, MessageSender, image_ref
from bottleneck_tools.reconcile import (
    MISSING,
    NOT_FOUND,
    ORPHAN,
    ORPHAN_ROW,
    Finding,
    head_object,
)
from producer_lambda.backoff import THROTTLING_CODES, error_code
from producer_lambda.enqueue import BatchOutcome
from producer_lambda.removals import put_tombstones

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "DeleteOutcome",
    "Failure",
    "FixReport",
    "Fixer",
    "delete_batch",
    "delete_orphans",
    "fix_group",
    "orphan_check",
    "render_fix",
    "render_plan",
]

STALE = "stale"  # either stale kind, as --fix counts its sends
FIX_GROUPS = (ORPHAN, MISSING, STALE, ORPHAN_ROW)
DELETE_BATCH = 1000  # DeleteObjects' limit
DELETE_BACKOFF = Backoff(attempts=4, base=0.1, cap=2.0)
# Per-key DeleteObjects errors that a later try can get past. botocore never sees them (the call
# itself succeeded), so they are retried here, as SendMessageBatch's failed entries are.
_RETRY_DELETE = THROTTLING_CODES | {
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "ConditionalRequestConflict",
}
# Why an orphan was left in place: none of these is a failure.
ALREADY_GONE = "already-gone"
CHANGED = "changed"
OTHER_SOURCE = "other-source"
KEPT_REASONS = {
    CHANGED: "changed since listed",
    ALREADY_GONE: "already gone",
    OTHER_SOURCE: "names another source bucket",
}
# Failures beyond this many are counted, not listed (a queue that rejects everything would
# otherwise print one line per image of the bucket).
MAX_LISTED_FAILURES = 1000


@dataclass(frozen=True, slots=True)
class Failure:
    """One fix that did not happen: ``delete`` or ``enqueue``, the object, and AWS's reason."""

    action: str
    uri: str
    code: str
    message: str

    def line(self) -> str:
        return f"{self.action} {self.uri}: {self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """What became of a batch of orphans: deleted (or, in a dry run, to be deleted), left in
    place with a reason (``(key, reason)``), or failed."""

    deleted: tuple[str, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()
    failed: tuple[Failure, ...] = ()


def fix_group(finding: Finding) -> str | None:
    """What ``--fix`` does about a finding: ``orphan`` (delete the file), ``missing`` or ``stale``
    (send the image), or ``None`` for an image already acted on under another kind."""
    if finding.repeat:
        return None
    if finding.kind in (ORPHAN, MISSING, ORPHAN_ROW):
        return finding.kind
    return STALE


def orphan_check(listed: Listed, head: Mapping[str, Any] | None, source_bucket: str) -> str | None:
    """Why a listed orphan must be left in place after all, from its HEAD; ``None``: delete it.

    A file changed since it was listed may have been rewritten for a re-uploaded image. A file
    whose ``source-bucket`` is not the source's (or that has none: not the consumer's) is not this
    source's to judge.
    """
    if head is None:
        return ALREADY_GONE
    if (head.get("ETag") or "").strip('"') != (listed.etag or ""):
        return CHANGED
    metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
    if metadata.get(SOURCE_BUCKET) != source_bucket:
        return OTHER_SOURCE
    return None


def delete_batch(
    s3: S3Client,
    bucket: str,
    files: Sequence[Listed],
    *,
    backoff: Backoff = DELETE_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> DeleteOutcome:
    """One ``DeleteObjects`` for up to 1,000 files, each conditional on its listed ETag.

    The call succeeds even when keys fail: they come back in ``Errors``. Keys that failed on S3's
    side (throttling, an internal error) are tried again after a short backoff; a failed
    precondition means the file changed since it was listed (left in place), a missing key that
    it is gone already. A call that raises has had botocore's tries and fails every key still
    pending. Never raises for AWS errors.
    """
    if len(files) > DELETE_BATCH:
        raise ValueError(f"at most {DELETE_BATCH} keys per DeleteObjects, got {len(files)}")
    pending = {f.key: f for f in files}
    last_error: dict[str, tuple[str, str]] = {}
    deleted: list[str] = []
    kept: list[tuple[str, str]] = []
    failed: list[Failure] = []
    for attempt in range(backoff.attempts):
        if not pending:
            break
        if attempt:
            sleep(backoff.delay(attempt - 1))
        objects: list[ObjectIdentifierTypeDef] = [
            {"Key": f.key, "ETag": f'"{f.etag}"'} if f.etag else {"Key": f.key}
            for f in pending.values()
        ]
        try:
            response = s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": False})
        except (ClientError, BotoCoreError) as exc:
            for key in pending:
                last_error[key] = (error_code(exc), str(exc))
            break
        for done in response.get("Deleted", []):
            key = done.get("Key", "")
            if pending.pop(key, None) is not None:
                deleted.append(key)
        answered: set[str] = set()
        for error in response.get("Errors", []):
            key = error.get("Key", "")
            code, message = error.get("Code", "Unknown"), error.get("Message", "")
            answered.add(key)
            if key not in pending:
                continue
            if code in _RETRY_DELETE:
                last_error[key] = (code, message)
                continue
            del pending[key]
            if code == "PreconditionFailed":
                kept.append((key, CHANGED))
            elif code in NOT_FOUND:
                kept.append((key, ALREADY_GONE))
            else:
                failed.append(Failure("delete", f"s3://{bucket}/{key}", code, message))
        for key in pending.keys() - answered:
            last_error[key] = ("Missing", "key not in the DeleteObjects response")
    for key in pending:
        code, message = last_error[key]
        failed.append(Failure("delete", f"s3://{bucket}/{key}", code, message))
    return DeleteOutcome(tuple(deleted), tuple(kept), tuple(failed))


def delete_orphans(
    s3: S3Client,
    bucket: str,
    orphans: Sequence[Listed],
    *,
    source_bucket: str,
    concurrency: int = 16,
    dry_run: bool = False,
    backoff: Backoff = DELETE_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> DeleteOutcome:
    """HEAD each listed orphan (:func:`orphan_check`), then delete the confirmed ones in one
    :func:`delete_batch`. ``dry_run`` deletes nothing: ``deleted`` names what would be."""

    def head(orphan: Listed) -> Mapping[str, Any] | BaseException | None:
        try:
            return head_object(s3, bucket, orphan.key)
        except (ClientError, BotoCoreError) as exc:
            return exc

    with ThreadPoolExecutor(
        max_workers=max(1, min(concurrency, len(orphans))), thread_name_prefix="orphan"
    ) as pool:
        heads = list(pool.map(head, orphans))
    confirmed: list[Listed] = []
    kept: list[tuple[str, str]] = []
    failed: list[Failure] = []
    for orphan, answer in zip(orphans, heads, strict=True):
        if isinstance(answer, BaseException):
            uri = f"s3://{bucket}/{orphan.key}"
            failed.append(Failure("delete", uri, error_code(answer), str(answer)))
        elif (reason := orphan_check(orphan, answer, source_bucket)) is not None:
            kept.append((orphan.key, reason))
        else:
            confirmed.append(orphan)
    if dry_run or not confirmed:
        return DeleteOutcome(tuple(o.key for o in confirmed), tuple(kept), tuple(failed))
    outcome = delete_batch(s3, bucket, confirmed, backoff=backoff, sleep=sleep)
    return DeleteOutcome(outcome.deleted, (*kept, *outcome.kept), (*failed, *outcome.failed))


class OrphanDeleter:
    """Gathers orphans into batches of up to 1,000 and deletes each on a worker thread.

    The worker, not the caller's thread, makes the requests, so a Ctrl-C never cuts a
    DeleteObjects in half: a batch either ran and was counted, or was cancelled before it
    started. A dry run only reads, on the caller's thread. ``on_outcome`` hears of every batch.
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        *,
        source_bucket: str,
        on_outcome: Callable[[DeleteOutcome], None],
        concurrency: int = 16,
        dry_run: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._source_bucket = source_bucket
        self._on_outcome = on_outcome
        self._concurrency = concurrency
        self._dry_run = dry_run
        self._sleep = sleep
        self._pool = BoundedPool(1, backlog=2, name="delete")
        self._batch: list[Listed] = []

    def add(self, feature: Listed) -> None:
        """Queue one orphan; a full batch is handed to the worker (waiting for room)."""
        self._batch.append(feature)
        if len(self._batch) == DELETE_BATCH:
            self._submit()

    def flush(self) -> None:
        """Hand over the last, partial batch (the end of a run that was not stopped)."""
        if self._batch:
            self._submit()

    def close(self, *, stop: bool) -> bool:
        """Wait for the batches (``stop``: only the running one); True if interrupted."""
        return self._pool.close(stop=stop)

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        if self._dry_run:
            self._delete(batch)
        else:
            self._pool.submit(self._delete, batch)

    def _delete(self, batch: list[Listed]) -> None:
        try:
            outcome = delete_orphans(
                self._s3,
                self._bucket,
                batch,
                source_bucket=self._source_bucket,
                concurrency=self._concurrency,
                dry_run=self._dry_run,
                sleep=self._sleep,
            )
        except Exception as exc:  # a bug must still leave every file of the batch accounted for
            outcome = DeleteOutcome(
                failed=tuple(
                    Failure("delete", f"s3://{self._bucket}/{f.key}", error_code(exc), str(exc))
                    for f in batch
                )
            )
        self._on_outcome(outcome)


@dataclass
class FixReport:
    """What ``--fix`` set out to do and did, per group (``orphan``, ``missing``, ``stale``).

    ``planned`` counts the findings acted on; each ends deleted or enqueued (in a dry run: would
    be), ``kept`` (orphans left in place, by reason), failed, or not done (a stopped run).
    """

    dry_run: bool = False
    planned: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    enqueued: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    failures_left_out: int = 0
    tombstoned: int = 0  # orphan rows buried (in a dry run: to be)
    rows_kept: int = 0  # orphan rows whose image exists again

    def not_done(self, group: str) -> int:
        """Acted on but neither done nor failed: cancelled or never handed over by a stop."""
        if group == ORPHAN:
            done = self.deleted + self.kept.total()
        elif group == ORPHAN_ROW:
            done = self.tombstoned + self.rows_kept
        else:
            done = self.enqueued[group]
        return self.planned[group] - done - self.failed[group]

    @property
    def complete(self) -> bool:
        """Whether everything set out was done: no failure, nothing left undone."""
        return not any(self.failed.values()) and not any(map(self.not_done, FIX_GROUPS))

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``"fix"`` part of the summary)."""
        sent = {
            group: {
                "found": self.planned[group],
                "enqueued": self.enqueued[group],
                "failed": self.failed[group],
                "not_done": self.not_done(group),
            }
            for group in (MISSING, STALE)
        }
        return {
            "dry_run": self.dry_run,
            ORPHAN: {
                "found": self.planned[ORPHAN],
                "deleted": self.deleted,
                "kept": {reason: self.kept[reason] for reason in KEPT_REASONS},
                "failed": self.failed[ORPHAN],
                "not_done": self.not_done(ORPHAN),
            },
            **sent,
            ORPHAN_ROW: {
                "found": self.planned[ORPHAN_ROW],
                "tombstoned": self.tombstoned,
                "kept": {"image-exists": self.rows_kept},
                "failed": self.failed[ORPHAN_ROW],
                "not_done": self.not_done(ORPHAN_ROW),
            },
            "complete": self.complete,
            "failures": [failure.line() for failure in self.failures],
            "failures_left_out": self.failures_left_out,
        }


class Fixer:
    """Acts on findings as they stream by: orphans to an :class:`OrphanDeleter`, missing and stale
    images to the work queue through ``bottleneck-enqueue``'s :class:`MessageSender`.

    ``on_done(n)`` hears of fixes done (for a progress bar, from worker threads); in a dry run
    ``on_plan(action, what)`` hears of each delete (``what`` an ``s3://`` URI) and each send
    (``what`` the message body) instead, on the caller's thread.
    """

    def __init__(
        self,
        *,
        s3: S3Client,
        sqs: SQSClient | None,
        source: S3Location,
        output: S3Location,
        queue_url: str | None,
        concurrency: int = 16,
        dry_run: bool = False,
        on_done: Callable[[int], None] | None = None,
        on_plan: Callable[[str, str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.report = FixReport(dry_run=dry_run)
        self._s3 = s3
        self._concurrency = concurrency
        self._rows: list[Finding] = []  # orphan rows: buried together at flush()
        self._source = source
        self._output = output
        self._on_done = on_done
        self._on_plan = on_plan
        self._lock = threading.Lock()
        self._deleter = OrphanDeleter(
            s3,
            output.bucket,
            source_bucket=source.bucket,
            on_outcome=self._deleted,
            concurrency=concurrency,
            dry_run=dry_run,
            sleep=sleep,
        )
        self._sender: MessageSender | None = None
        if not dry_run:
            if sqs is None or not queue_url:
                raise ValueError("--fix needs an SQS client and a queue URL unless dry_run")
            self._sender = MessageSender(
                sqs, queue_url, concurrency=concurrency, on_outcome=self._sent, sleep=sleep
            )

    def take(self, finding: Finding) -> None:
        """Act on one finding (waits when too much is in flight)."""
        group = fix_group(finding)
        if group is None:
            return
        # Counted before it is handed over: a hand-over can wait for room, and a Ctrl-C there
        # must leave it in not_done.
        self.report.planned[group] += 1
        if group == ORPHAN:
            assert finding.feature is not None
            self._deleter.add(finding.feature)
            return
        if group == ORPHAN_ROW:
            self._rows.append(finding)
            return
        assert finding.image is not None
        ref = image_ref(self._source.bucket, finding.image)
        if self._sender is not None:
            self._sender.add(ref, group)
            return
        self.report.enqueued[group] += 1
        if self._on_plan is not None:
            self._on_plan("enqueue", encode(ref))

    def flush(self) -> None:
        """Hand over the partial batches (the end of a run that was not stopped)."""
        self._deleter.flush()
        if self._sender is not None:
            self._sender.flush()
        self._bury()

    def _bury(self) -> None:
        """HEAD each orphan row's image and write the gone ones' tombstones in one object."""
        rows, self._rows = self._rows, []
        if not rows:
            return

        def gone(finding: Finding) -> Tombstone | BaseException | None:
            # The time first: a re-upload after a 404 is computed, and committed, after it.
            at = datetime.now(UTC)
            try:
                found = head_object(self._s3, finding.source_bucket, finding.key)
            except (ClientError, BotoCoreError) as exc:
                return exc
            return None if found is not None else Tombstone(finding.source_bucket, finding.key, at)

        with ThreadPoolExecutor(max_workers=self._concurrency) as pool:
            results = list(pool.map(gone, rows))
        buried: list[Tombstone] = []
        for finding, result in zip(rows, results, strict=True):
            uri = f"s3://{finding.source_bucket}/{finding.key}"
            if isinstance(result, BaseException):
                self.report.failed[ORPHAN_ROW] += 1
                self._record([Failure("tombstone", uri, error_code(result), str(result))])
            elif result is None:
                self.report.rows_kept += 1
            else:
                buried.append(result)
        if self.report.dry_run:
            self.report.tombstoned += len(buried)
            for tombstone in buried:
                if self._on_plan is not None:
                    self._on_plan("tombstone", f"s3://{tombstone.bucket}/{tombstone.key}")
            return
        if not buried:
            return
        try:
            put_tombstones(self._s3, self._output, buried, datetime.now(UTC))
        except (ClientError, BotoCoreError) as exc:
            self.report.failed[ORPHAN_ROW] += len(buried)
            where = f"s3://{self._output.bucket}/{self._output.prefix}shards/tombstones/"
            self._record([Failure("tombstone", where, error_code(exc), str(exc))])
            return
        self.report.tombstoned += len(buried)
        if self._on_done is not None:
            self._on_done(len(buried))

    def finish(self, *, stop: bool) -> bool:
        """Wait for the work handed over (``stop``: only what is running); True if a Ctrl-C
        came meanwhile. The report is final afterwards."""
        interrupted = self._deleter.close(stop=stop)
        if self._sender is not None:
            interrupted = self._sender.close(stop=stop or interrupted) or interrupted
            with self._lock:
                self.report.enqueued.update(self._sender.sent)
        return interrupted

    def _deleted(self, outcome: DeleteOutcome) -> None:
        with self._lock:
            self.report.deleted += len(outcome.deleted)
            self.report.kept.update(reason for _, reason in outcome.kept)
            self.report.failed[ORPHAN] += len(outcome.failed)
            self._record(outcome.failed)
        if self.report.dry_run:
            if self._on_plan is not None:
                for key in outcome.deleted:
                    self._on_plan("delete", f"s3://{self._output.bucket}/{key}")
        elif self._on_done is not None:
            self._on_done(len(outcome.deleted))

    def _sent(self, outcome: BatchOutcome, group: str) -> None:
        failures = [
            Failure("enqueue", f"s3://{f.ref.bucket}/{f.ref.key}", f.code, f.message)
            for f in outcome.failed
        ]
        with self._lock:
            self.report.failed[group] += len(failures)
            self._record(failures)
        if self._on_done is not None:
            self._on_done(len(outcome.sent))

    def _record(self, failures: Iterable[Failure]) -> None:
        for failure in failures:
            if len(self.report.failures) < MAX_LISTED_FAILURES:
                self.report.failures.append(failure)
            else:
                self.report.failures_left_out += 1


def render_plan(action: str, what: str, as_json: bool) -> str:
    """One line of a dry run: a file it would delete, or a message body it would send."""
    if not as_json:
        return f"would {action} {what}\n"
    if action == "enqueue":
        return json.dumps({"would": action, "message": json.loads(what)}, ensure_ascii=False) + "\n"
    return json.dumps({"would": action, "uri": what}, ensure_ascii=False) + "\n"


def render_fix(fixed: FixReport) -> str:
    """The fix in one line: what was deleted and enqueued (or would be), and what was not."""
    deleted = f"{fixed.deleted:,} orphan{'s' if fixed.deleted != 1 else ''}"
    enqueued = f"{fixed.enqueued[MISSING]:,} missing + {fixed.enqueued[STALE]:,} stale"
    if fixed.dry_run:
        parts = [f"dry run: would delete {deleted}, enqueue {enqueued}"]
    else:
        parts = [f"deleted {deleted}, enqueued {enqueued}"]
    if fixed.planned[ORPHAN_ROW]:
        verb = "would bury" if fixed.dry_run else "buried"
        parts.append(f"{verb} {fixed.tombstoned:,} orphan rows (tombstones)")
        if fixed.rows_kept:
            parts.append(f"left {fixed.rows_kept:,} rows whose image exists again")
    if fixed.kept:
        why = ", ".join(f"{n:,} {KEPT_REASONS[r]}" for r, n in sorted(fixed.kept.items()))
        parts.append(f"left {fixed.kept.total():,} orphans in place ({why})")
    failed_deletes = fixed.failed[ORPHAN] + fixed.failed[ORPHAN_ROW]
    failed_sends = fixed.failed[MISSING] + fixed.failed[STALE]
    if failed_deletes or failed_sends:
        parts.append(f"failed {failed_deletes:,} deletes + {failed_sends:,} sends")
    not_done = {group: fixed.not_done(group) for group in FIX_GROUPS}
    if any(not_done.values()):
        sends = not_done[MISSING] + not_done[STALE]
        deletes = not_done[ORPHAN] + not_done[ORPHAN_ROW]
        parts.append(f"not done {deletes:,} deletes + {sends:,} sends")
    return "; ".join(parts)
