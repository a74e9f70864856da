"""``bottleneck-status``: how far along the work is, what failed and why, and when it will be done.

    bottleneck-status --queue-url URL --output s3://feats/prefix/ [--job-queue NAME]
                      [--dead-letter-url URL] [--watch SECONDS] [--interval SECONDS] [--json]

One view of the whole flow: the work queue's backlog (visible, in flight, delayed), the dead-letter
queue's depth with a count per ``error-code``, Batch jobs per state, the feature files written so
far, and a rate and time-to-drain estimate from two samples (``--interval`` apart for a one-off
view; the previous refreshes with ``--watch``). ``--json`` prints one JSON object per view.

Costs and side effects, so that nobody is surprised:

* Dead letters are *peeked*: received with ``MessageAttributeNames=All`` and a short visibility
  timeout, then released at once with a visibility of 0. While peeked (well under a second
  normally, at most ``--peek-visibility`` seconds if this process dies) those messages are
  hidden from anyone else reading the dead-letter queue, and each peek adds one to their
  ``ApproximateReceiveCount``. At most ``--peek`` messages are sampled (10 a call); with a deeper
  queue the per-code counts are of the sample and say so. With ``--watch`` the queue is peeked
  again only when its depth changes.
* A message moved by SQS itself after ``maxReceiveCount`` failed receives (a transient failure
  that never cleared) carries no ``error-code``; it is counted as ``retries-exhausted``.
* Counting feature files lists the output prefix: one ListObjectsV2 call per 1,000 files, every
  refresh. ``--no-features`` skips it (the rate then comes from the backlog alone).
* Shards (``bottleneck-consumer --layout shards``): the same listing finds the output's
  committed shards (their indexes); per fingerprint the view counts them, their rows (repeats of
  at-least-once delivery included) and the images they hold (newest row each, less those a
  tombstone buries), from one GET per index and tombstone object, each read once per run
  (they are immutable). ``--json``: ``"shards": {<version label, or "">: {<fingerprint>:
  {"shards", "rows", "images"}}}``. Shard objects are never counted as feature files.
* Versions: an output that is a root of versions (``--output s3://b/features/``, or the
  template ``s3://b/features/{model}/{fingerprint}/``) gets one count per ``<model>/<fingerprint>``
  folder, found each refresh by :func:`~bottleneck_contract.locations.find_versions` (a listing
  of the root and one per folder in it; for a root given without placeholders, a ListObjectsV2
  and a HEAD per folder found, to confirm it). A prefix holding no version is counted as before.
* Batch jobs: one ListJobs call per state and page, always with ``jobStatus`` (without it
  ListJobs returns RUNNING jobs only). SUCCEEDED and FAILED count what ListJobs still reports.
* The queue counts are SQS's approximations, which lag by up to a minute: a rate over a few
  seconds is rough, and steadier with a longer ``--interval`` or ``--watch``.

Standard library and boto3 only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.features import FEATURE_SUFFIX
from bottleneck_contract.locations import OutputTemplate, S3Location, find_versions
from bottleneck_contract.queues import redrive_target
from bottleneck_contract.retry import no_botocore_retries
from bottleneck_contract.shards import is_tombstone_key, parse_shard_key
from bottleneck_tools.cmdline import OneLineParser, parse_validated
from bottleneck_tools.shard_reader import Listing, ShardReadError, read_shards
from producer_lambda.backoff import call_with_backoff, error_code, is_transient
from producer_lambda.scaler import BATCH_BACKOFF, Backlog, list_active_jobs, read_backlog
from producer_lambda.settings import (
    SettingsError,
    bottleneck_environ,
    parse_count,
    parse_output,
)

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_batch.literals import JobStatusType
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

__all__ = [
    "JOB_STATES",
    "NO_CODE",
    "DeadLetters",
    "Estimate",
    "Options",
    "Sample",
    "count_by_code",
    "count_features",
    "count_jobs",
    "estimate",
    "format_duration",
    "main",
    "parse",
    "peek_dead_letters",
    "render_text",
    "run",
    "take_sample",
    "to_json",
]

PROG = "bottleneck-status"
EXIT_FAILED = 1
EXIT_USAGE = 2
NO_CODE = "retries-exhausted"
TERMINAL_STATES: tuple[JobStatusType, ...] = ("SUCCEEDED", "FAILED")
JOB_STATES: tuple[str, ...] = (
    "SUBMITTED",
    "PENDING",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
    *TERMINAL_STATES,
)
# --watch estimates the rate over at most this long a window (older samples are dropped).
RATE_WINDOW_S = 300.0


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """The dead-letter queue: its depth and the ``error-code`` counts of a peeked sample."""

    url: str
    depth: int
    sampled: int = 0
    by_code: Mapping[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the sample covers the whole queue (the counts are then exact, not a sample)."""
        return self.sampled >= self.depth


@dataclass(frozen=True, slots=True)
class Sample:
    """Everything one look at the system saw; ``None`` where that part was not asked for."""

    at: float  # time.monotonic() when the sample was taken
    taken: datetime
    backlog: Backlog
    dead_letters: DeadLetters | None = None
    jobs: Mapping[str, int] | None = None
    features: int | None = None
    # A root of versions: feature files per <model>/<fingerprint>, and the root's other folders
    # (not counted); None for one concrete prefix.
    versions: Mapping[str, int] | None = None
    other_folders: tuple[str, ...] = ()
    # Shards (--layout shards) per version label ("" for one concrete prefix), then fingerprint.
    shards: Mapping[str, Mapping[str, ShardCount]] | None = None


@dataclass(frozen=True, slots=True)
class ShardCount:
    """One fingerprint's shards under one prefix: committed shards, their rows (repeats
    included), and the images they hold (one row each: newest, less tombstoned)."""

    shards: int = 0
    rows: int = 0
    images: int = 0

    def to_json(self) -> dict[str, int]:
        return {"shards": self.shards, "rows": self.rows, "images": self.images}


@dataclass(frozen=True, slots=True)
class Estimate:
    """Rates between two samples and the time until the backlog is empty at that pace.

    ``drain_per_s``: how fast the backlog shrinks (net of new arrivals; negative when it grows).
    ``features_per_s``: feature files written per second (``None`` when not counted).
    ``eta_s``: 0 when the backlog is empty, ``None`` when it is not shrinking.
    """

    window_s: float
    drain_per_s: float
    features_per_s: float | None
    eta_s: float | None


@dataclass(frozen=True, slots=True)
class Options:
    """The validated command line."""

    queue_url: str
    # One prefix, a root of versions, or a template (whose root is listed for versions).
    output: S3Location | OutputTemplate | None = None
    job_queue: str | None = None
    dead_letter_url: str | None = None
    watch: float | None = None
    interval: float = 5.0
    peek: int = 100
    peek_visibility: int = 30
    json: bool = False


# ---------------------------------------------------------------------------- pure arithmetic


def estimate(old: Sample, new: Sample) -> Estimate | None:
    """The rates between ``old`` and ``new`` and the time to drain; ``None`` without elapsed time.

    The time to drain divides what is left by the net drain rate (backlog before minus after,
    per second), which accounts for images still arriving. When the backlog is not shrinking,
    there is no estimate (``eta_s`` is ``None``) unless it is already empty.
    """
    window = new.at - old.at
    if window <= 0:
        return None
    drain = (old.backlog.total - new.backlog.total) / window
    features: float | None = None
    if old.features is not None and new.features is not None:
        features = max(0, new.features - old.features) / window
    eta: float | None
    if new.backlog.total == 0:
        eta = 0.0
    elif drain > 0:
        eta = new.backlog.total / drain
    else:
        eta = None
    return Estimate(window_s=window, drain_per_s=drain, features_per_s=features, eta_s=eta)


def count_by_code(messages: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Count received SQS messages by their ``error-code`` attribute (:data:`NO_CODE` if none)."""
    counts: Counter[str] = Counter()
    for message in messages:
        attribute = message.get("MessageAttributes", {}).get("error-code", {})
        counts[str(attribute.get("StringValue") or NO_CODE)] += 1
    return counts


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    if total >= 86400:
        return f"{total // 86400}d{(total % 86400) // 3600:02d}h"
    if total >= 3600:
        return f"{total // 3600}h{(total % 3600) // 60:02d}m"
    if total >= 60:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total}s"


def to_json(sample: Sample, rate: Estimate | None) -> dict[str, Any]:
    """A JSON-ready dict of one view (stable keys, for scripts)."""
    doc: dict[str, Any] = {
        "time": sample.taken.isoformat().replace("+00:00", "Z"),
        "backlog": {
            "visible": sample.backlog.visible,
            "in_flight": sample.backlog.in_flight,
            "delayed": sample.backlog.delayed,
            "total": sample.backlog.total,
        },
        "dead_letters": None,
        "jobs": None if sample.jobs is None else dict(sample.jobs),
        "features": sample.features,
        "rate": None,
    }
    if sample.shards is not None:
        doc["shards"] = {
            label: {fp: count.to_json() for fp, count in by_fp.items()}
            for label, by_fp in sample.shards.items()
        }
    if sample.versions is not None:
        doc["versions"] = dict(sample.versions)
        doc["other_folders"] = list(sample.other_folders)
    if sample.dead_letters is not None:
        dlq = sample.dead_letters
        doc["dead_letters"] = {
            "depth": dlq.depth,
            "sampled": dlq.sampled,
            "complete": dlq.complete,
            "by_code": dict(sorted(dlq.by_code.items())),
        }
    if rate is not None:
        doc["rate"] = {
            "window_s": round(rate.window_s, 3),
            "drain_per_s": round(rate.drain_per_s, 3),
            "features_per_s": (
                None if rate.features_per_s is None else round(rate.features_per_s, 3)
            ),
            "eta_s": None if rate.eta_s is None else round(rate.eta_s, 1),
        }
    return doc


def render_text(sample: Sample, rate: Estimate | None, options: Options) -> str:
    """The human view of one sample, a few aligned lines (no trailing newline)."""
    backlog = sample.backlog
    lines = [
        f"bottleneck status at {sample.taken:%Y-%m-%d %H:%M:%S}Z",
        f"  backlog       {backlog.total:,} messages (visible {backlog.visible:,}, "
        f"in flight {backlog.in_flight:,}, delayed {backlog.delayed:,})",
    ]
    dlq = sample.dead_letters
    if dlq is None:
        lines.append("  dead letters  - (no --dead-letter-url and no redrive policy)")
    else:
        codes = ", ".join(f"{code} {count:,}" for code, count in _by_count(dlq.by_code))
        text = f"  dead letters  {dlq.depth:,}"
        if codes:
            text += f": {codes}"
        if dlq.depth and not dlq.complete:
            text += f" (codes from a sample of {dlq.sampled:,})"
        lines.append(text)
    if sample.jobs is not None:
        jobs = ", ".join(f"{state} {n:,}" for state, n in sample.jobs.items() if n) or "none"
        lines.append(f"  batch jobs    {jobs}  [{options.job_queue}]")
    if sample.features is not None:
        lines.extend(_features_lines(sample, options))
    for label, by_fp in (sample.shards or {}).items():
        for fp, count in by_fp.items():
            where = f"{label}: " if label else ""
            lines.append(
                f"  shards        {where}{fp} {count.shards:,} committed, {count.rows:,} rows, "
                f"{count.images:,} images (newest row each, less tombstoned)"
            )
    if rate is None:
        lines.append("  rate          - (needs two samples: --interval or --watch)")
    else:
        parts = [f"backlog {_signed(-rate.drain_per_s)}/s"]
        if rate.features_per_s is not None:
            parts.insert(0, f"{rate.features_per_s:,.1f} files/s")
        if rate.eta_s == 0:
            eta = "drained"
        elif rate.eta_s is None:
            eta = "not draining"
        else:
            eta = f"drained in ~{format_duration(rate.eta_s)}"
        lines.append(
            f"  rate          {', '.join(parts)} over {format_duration(rate.window_s)}: {eta}"
        )
    return "\n".join(lines)


def _features_lines(sample: Sample, options: Options) -> list[str]:
    where = _root(options.output) if sample.versions is not None else options.output
    head = f"  features      {sample.features:,} files in {where}"
    if sample.versions is None:
        return [head]
    count = len(sample.versions)
    lines = [f"{head} ({count} version{'s' * (count != 1)}: <model>/<fingerprint>, files)"]
    width = max((len(label) for label in sample.versions), default=0)
    for label, count in sample.versions.items():
        lines.append(f"                {label:<{width}}  {count:,}")
    if sample.other_folders:
        root = _root(options.output)
        cut = len(root.prefix) if root is not None else 0
        folders = ", ".join(folder[cut:] for folder in sample.other_folders)
        lines.append(f"                also under it, in no version (not counted): {folders}")
    return lines


def _root(output: S3Location | OutputTemplate | None) -> S3Location | None:
    return output.root if isinstance(output, OutputTemplate) else output


def _by_count(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _signed(value: float) -> str:
    return f"{value:+,.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


# ---------------------------------------------------------------------------- AWS reads


def peek_dead_letters(
    sqs: SQSClient,
    url: str,
    *,
    limit: int = 100,
    visibility: int = 30,
    wait_seconds: int = 1,
) -> DeadLetters:
    """The dead-letter depth and the ``error-code`` counts of up to ``limit`` peeked messages.

    Messages are received (hidden for ``visibility`` seconds, so that the next receive returns
    others) and all released with visibility 0 before returning, also on error. See the module
    docstring for what peeking costs.
    """
    depth = read_backlog(sqs, url)
    total = depth.visible + depth.in_flight + depth.delayed
    held: list[dict[str, Any]] = []
    try:
        while len(held) < min(limit, depth.visible):
            got = sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=max(1, min(10, limit - len(held))),
                MessageAttributeNames=["All"],
                VisibilityTimeout=visibility,
                WaitTimeSeconds=wait_seconds,
            ).get("Messages", [])
            if not got:
                break
            held.extend(dict(message) for message in got)
    finally:
        _release(sqs, url, held)
    counts = count_by_code(held)
    return DeadLetters(url=url, depth=total, sampled=len(held), by_code=dict(counts))


def _release(sqs: SQSClient, url: str, messages: Sequence[Mapping[str, Any]]) -> None:
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        # A failed entry (a stale handle) reappears on its own when its short timeout ends.
        sqs.change_message_visibility_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(chunk)
            ],
        )


def count_jobs(
    batch: BatchClient, job_queue: str, *, sleep: Callable[[float], None] = time.sleep
) -> dict[str, int]:
    """Jobs of ``job_queue`` per state (:data:`JOB_STATES`, every one present, zeros included).

    Active states come from :func:`producer_lambda.scaler.list_active_jobs` (each job once, at
    its latest seen state); SUCCEEDED and FAILED are counted page by page.
    """
    counts = dict.fromkeys(JOB_STATES, 0)
    for job in list_active_jobs(batch, job_queue, sleep=sleep):
        counts[job.status] = counts.get(job.status, 0) + 1
    for status in TERMINAL_STATES:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"jobQueue": job_queue, "jobStatus": status}
            if token:
                kwargs["nextToken"] = token
            page = call_with_backoff(
                partial(batch.list_jobs, **kwargs),
                backoff=BATCH_BACKOFF,
                retry_if=is_transient,
                sleep=sleep,
            )
            counts[status] += len(page.get("jobSummaryList", []))
            token = page.get("nextToken")
            if not token:
                break
    return counts


def count_features(s3: S3Client, output: S3Location) -> int:
    """How many per-image ``.npy`` files lie under ``output`` (one ListObjectsV2 call per 1,000
    objects); shards' objects are not feature files."""
    return count_output(s3, output)[0]


def count_output(
    s3: S3Client, output: S3Location, cache: dict[str, Any] | None = None
) -> tuple[int, dict[str, ShardCount]]:
    """Per-image feature files under ``output``, and its shards per fingerprint: one listing,
    then one GET per committed index and tombstone object not in ``cache`` (immutable objects:
    ``--watch`` reads each once)."""
    files = 0
    listing = Listing()
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=output.bucket, Prefix=output.prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            shard = parse_shard_key(output.prefix, key)
            if shard is not None:
                if shard.is_index:
                    listing.indexes[key] = (shard, obj["LastModified"])
            elif is_tombstone_key(output.prefix, key):
                listing.tombstones.append(key)
            elif key.endswith(FEATURE_SUFFIX):
                files += 1
    if not listing.indexes:
        return files, {}
    shards = read_shards(s3, output.bucket, listing, strict=False, cache=cache)
    counts: dict[str, ShardCount] = {}
    for index in shards.indexes:
        old = counts.get(index.key.fingerprint, ShardCount())
        counts[index.key.fingerprint] = replace(
            old, shards=old.shards + 1, rows=old.rows + len(index.rows)
        )
    for _, _, fp in shards.rows:
        old = counts.get(fp, ShardCount())
        counts[fp] = replace(old, images=old.images + 1)
    return files, dict(sorted(counts.items()))


def take_sample(
    options: Options,
    *,
    sqs: SQSClient,
    s3: S3Client | None,
    batch: BatchClient | None,
    dead_letter_url: str | None,
    previous: Sample | None = None,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    shard_cache: dict[str, Any] | None = None,
) -> Sample:
    """One look at everything ``options`` asks for.

    The dead-letter queue is peeked only when its depth differs from ``previous``'s: the codes
    are carried over otherwise, so that ``--watch`` does not keep hiding dead letters.
    """
    backlog = read_backlog(sqs, options.queue_url)
    dead_letters: DeadLetters | None = None
    if dead_letter_url is not None:
        known = previous.dead_letters if previous is not None else None
        depth = read_backlog(sqs, dead_letter_url)
        if known is not None and known.depth == depth.total and known.url == dead_letter_url:
            dead_letters = known
        elif options.peek > 0 and depth.visible:
            dead_letters = peek_dead_letters(
                sqs, dead_letter_url, limit=options.peek, visibility=options.peek_visibility
            )
        else:
            dead_letters = DeadLetters(url=dead_letter_url, depth=depth.total)
    jobs = None
    if options.job_queue and batch is not None:
        jobs = count_jobs(batch, options.job_queue)
    features = None
    versions: dict[str, int] | None = None
    others: tuple[str, ...] = ()
    if options.output is not None and s3 is not None:
        template = options.output
        if isinstance(template, S3Location):
            template = OutputTemplate(template)
        found = find_versions(s3, template)
        shards = {}
        if found.found:
            versions = {}
            for version in found.found:
                label = found.label(version)
                versions[label], by_fp = count_output(s3, version, shard_cache)
                if by_fp:
                    shards[label] = by_fp
            others = found.others
            features = sum(versions.values())
        elif template.templated:
            versions, features = {}, 0  # a template's root without a version yet
        else:
            features, by_fp = count_output(s3, template.root, shard_cache)
            if by_fp:
                shards[""] = by_fp
    return Sample(
        at=clock(),
        taken=now(),
        backlog=backlog,
        dead_letters=dead_letters,
        jobs=jobs,
        features=features,
        versions=versions,
        other_folders=others,
        shards=shards if features is not None else None,
    )


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (environment defaults are applied by :func:`parse`)."""
    parser = OneLineParser(
        prog=PROG,
        description="Backlog, dead letters by error code, Batch jobs, feature files, and a rate.",
        epilog="Flags default to the BOTTLENECK_* variables; a flag wins. Peeking hides up to "
        "--peek dead letters for a moment (see the module documentation).",
    )
    parser.add_argument("--queue-url", help="SQS work queue URL [BOTTLENECK_QUEUE_URL]")
    parser.add_argument(
        "--output",
        help="s3://bucket/prefix/ of the feature files; a root of versions (or a template "
        "ending in {model}/{fingerprint}/) is counted per version [BOTTLENECK_OUTPUT]",
    )
    parser.add_argument("--job-queue", help="Batch job queue [BOTTLENECK_JOB_QUEUE]")
    parser.add_argument(
        "--dead-letter-url",
        help="dead-letter queue URL [BOTTLENECK_DLQ_URL, default: the work queue's redrive target]",
    )
    parser.add_argument("--watch", metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        default="5",
        help="without --watch: seconds between the two samples of the rate (0: no rate; default 5)",
    )
    parser.add_argument(
        "--peek",
        metavar="N",
        default="100",
        help="most dead letters sampled for error codes (0: depth only; default 100)",
    )
    parser.add_argument(
        "--peek-visibility",
        metavar="SECONDS",
        default="30",
        help="how long a peeked dead letter stays hidden if it cannot be released (default 30)",
    )
    parser.add_argument("--no-features", action="store_true", help="do not list the output prefix")
    parser.add_argument("--json", action="store_true", help="one JSON object per view")
    return parser


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    """Parse and validate the command line; bad arguments exit 2 with one line."""
    return parse_validated(build_parser(), argv, environ, _options)


def _seconds(value: str | None, option: str, *, minimum: float) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{option} must be a number of seconds, got {value!r}") from None
    if not number >= minimum or number == float("inf"):
        raise SettingsError(f"{option} must be >= {minimum:g} seconds, got {value!r}")
    return number


def _options(args: argparse.Namespace, env: Mapping[str, str]) -> Options:
    def pick(value: str | None, var: str) -> tuple[str | None, str]:
        if value is not None:
            return value.strip(), ""
        return (env.get(var, "").strip() or None), var

    queue_url, _ = pick(args.queue_url, "BOTTLENECK_QUEUE_URL")
    if not queue_url:
        raise SettingsError("--queue-url (or BOTTLENECK_QUEUE_URL) is required")
    output = None
    if not args.no_features:
        output_uri, var = pick(args.output, "BOTTLENECK_OUTPUT")
        if output_uri:
            output = parse_output(output_uri, var or "--output")
    job_queue, _ = pick(args.job_queue, "BOTTLENECK_JOB_QUEUE")
    dead_letter_url, _ = pick(args.dead_letter_url, "BOTTLENECK_DLQ_URL")
    peek = parse_count(args.peek, "--peek", 100, 0)
    if peek > 1000:
        raise SettingsError(f"--peek must be <= 1000, got {peek}")
    visibility = parse_count(args.peek_visibility, "--peek-visibility", 30, 1)
    if visibility > 600:
        raise SettingsError(f"--peek-visibility must be <= 600 seconds, got {visibility}")
    return Options(
        queue_url=queue_url,
        output=output,
        job_queue=job_queue,
        dead_letter_url=dead_letter_url,
        watch=_seconds(args.watch, "--watch", minimum=1),
        interval=_seconds(args.interval, "--interval", minimum=0) or 0.0,
        peek=peek,
        peek_visibility=visibility,
        json=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    options = parse(argv, bottleneck_environ())
    try:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        sqs: SQSClient = session.client("sqs")
        s3: S3Client = session.client("s3")
        # The scaler's call_with_backoff is the one layer for Batch (bottleneck_contract.retry).
        no_retries = Config(retries=no_botocore_retries())
        batch: BatchClient = session.client("batch", config=no_retries)
    except BotoCoreError as exc:
        sys.stderr.write(f"{PROG}: error: cannot create AWS clients: {exc}\n")
        return EXIT_FAILED
    return run(options, sqs=sqs, s3=s3, batch=batch)


def run(
    options: Options,
    *,
    sqs: SQSClient,
    s3: S3Client | None,
    batch: BatchClient | None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    max_views: int | None = None,
) -> int:
    """Show the status once (two samples ``interval`` apart) or every ``watch`` seconds.

    ``max_views`` stops ``--watch`` after that many views (for tests). Returns the exit status:
    0, or 1 with one line on stderr when an AWS call fails.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    in_place = options.watch is not None and not options.json and out.isatty()
    try:
        dlq_url = options.dead_letter_url or redrive_target(sqs, options.queue_url)
        shard_cache: dict[str, Any] = {}  # shard indexes and tombstones: read once per run

        def sample(previous: Sample | None) -> Sample:
            return take_sample(
                options,
                sqs=sqs,
                s3=s3,
                batch=batch,
                dead_letter_url=dlq_url,
                previous=previous,
                clock=clock,
                now=now,
                shard_cache=shard_cache,
            )

        def show(current: Sample, rate: Estimate | None) -> None:
            if options.json:
                out.write(json.dumps(to_json(current, rate)) + "\n")
            else:
                # Home and clear-to-end: the view is redrawn where it stands, without flicker.
                out.write(
                    ("\x1b[H\x1b[J" if in_place else "") + render_text(current, rate, options)
                )
                out.write("\n" if in_place else "\n\n" if options.watch is not None else "\n")
            out.flush()

        first = sample(None)
        if options.watch is None:
            rate = None
            current = first
            if options.interval > 0:
                sleep(options.interval)
                current = sample(first)
                rate = estimate(first, current)
            show(current, rate)
            return 0

        history: deque[Sample] = deque([first])
        show(first, None)
        views = 1
        while max_views is None or views < max_views:
            sleep(options.watch)
            current = sample(history[-1])
            while len(history) > 1 and current.at - history[0].at > RATE_WINDOW_S:
                history.popleft()
            show(current, estimate(history[0], current))
            history.append(current)
            views += 1
        return 0
    except KeyboardInterrupt:
        return 0
    except (ClientError, BotoCoreError) as exc:
        err.write(f"{PROG}: error: {error_code(exc)}: {exc}\n")
        return EXIT_FAILED
    except ShardReadError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
