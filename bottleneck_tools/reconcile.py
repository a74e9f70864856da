"""``bottleneck-reconcile``: which feature files are missing, out of date, or left over; with
``--fix``, put that right.

    bottleneck-reconcile s3://images/prefix/ --output s3://feats/prefix/
                         [--fingerprint FP] [--no-head] [--concurrency N] [--json]
                         [--fix [--queue-url URL] [--dry-run] [--no-progress]]

Four kinds of finding:

* ``missing``: an image (an accepted suffix, outside the output prefix, not empty) with no
  feature file;
* ``stale-etag``: a feature file whose ``source-etag`` differs from its image's current ETag
  (the image was re-uploaded since);
* ``stale-fingerprint``: a feature file whose ``fingerprint`` differs from ``--fingerprint``, or,
  without that flag, from the fingerprint most feature files under the prefix carry (the model
  settings changed for part of the set); a file can be both stale kinds at once;
* ``orphan``: a feature file whose image is gone;
* ``orphan-row``: a shard row whose image is gone (see Shards below).

Shards (``bottleneck-consumer --layout shards``, :mod:`bottleneck_contract.shards`): the output's
``shards/`` folder is listed once and every committed index and tombstone object read (one GET
each, no HEAD: an index names each row's ETag and fingerprint), and the rows a reader takes
(the newest per image, less those a tombstone buries) held in memory. An image is current when
its row for the expected fingerprint has its current ETag; ``stale-etag`` when that row has
another; ``stale-fingerprint`` when it has rows of other fingerprints only; ``missing`` when it
has none. With per-image files too, an image current in either layout is current. Without
``--fingerprint``, the expected fingerprint is then the one most images' rows carry (files are
held to it as well). Shard objects, tombstones and ``_bottleneck/`` are never taken for feature
files. A stale finding for a row names ``<shard .npy key>#<row>`` as its feature key.

How: the image prefix and the matching part of the output prefix are listed side by side and
merge-joined (the same sorted-stream join as ``bottleneck-enqueue --skip-existing``, see
:mod:`bottleneck_tools.backfill`), so memory stays flat however many objects there are. A listing
carries no user metadata, so each feature file *that has an image* costs one HeadObject, made by
``--concurrency`` threads (16 by default) with at most twice that many in flight; ``--no-head``
skips them and reports ``missing`` and ``orphan`` only. Without ``--fingerprint`` the majority is
known only at the end: feature files are then set aside per fingerprint in temporary files
(spilling to disk past a megabyte each) and the minority ones reported last.

Without ``--fix`` this tool only reads. ``--fix`` hands each finding, as it streams by, to
:mod:`bottleneck_tools.reconcile_fix`: ``missing`` and stale images go to the work queue
(``--queue-url`` or ``BOTTLENECK_QUEUE_URL``) with the messages ``bottleneck-enqueue`` sends, and
``orphan`` files are deleted once a HEAD confirms them (an ``orphan-row`` cannot be: rows are
immutable, so a tombstone buries it, once a HEAD of the image answers 404); ``--dry-run``
changes nothing and prints what it would do. That module says how, and what is left in place;
this one classifies, parses the command line, prints the report and chooses the exit status.

Versions: an ``--output`` that is a root of versions (the stack's ``s3://b/features/``, or its
template ``s3://b/features/{model}/{fingerprint}/``; see
:func:`~bottleneck_contract.locations.find_versions`) is reconciled once per
``<model>/<fingerprint>`` folder, each held to the fingerprint in its name: a table says how
complete each is (images with a current file, of the images accepted), then each version's
report follows. With ``--json`` each finding names its ``version``, and the summary line holds
``versions`` (each version's summary, plus ``accepted``, ``with_file``, ``complete`` and
``percent_complete``) and ``other_folders`` (folders under the root in no version). ``--fix``
takes a root holding exactly one version (that version is fixed), and ``--fingerprint`` none:
name one version's prefix instead. A prefix that holds feature files directly is reconciled
as it always was.

Output: with ``--json``, one JSON object per finding, then a summary line; otherwise counts per
kind with the first ``--limit`` keys of each. With ``--fix`` the summary also says what was
deleted, enqueued, left in place, failed and not done (``"fix"`` in the JSON summary), each
failure is one line on stderr, and a progress bar (tqdm, on a terminal only) counts the fixes on
stderr. Exit status: 0 done (findings or not; with ``--fix``, every delete and send done), 1 an
AWS error or a fix that failed, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract.features import (
    FEATURE_SUFFIX,
    FINGERPRINT,
    SOURCE_ETAG,
    feature_key,
    source_key_of,
)
from bottleneck_contract.locations import (
    DEFAULT_FIELDS,
    OutputTemplate,
    S3Location,
    Versions,
    find_versions,
)
from bottleneck_contract.shards import TOMBSTONES, ShardIndex, ShardRow, is_shard_key
from bottleneck_tools.backfill import Listed, in_feature_order, list_objects
from bottleneck_tools.cmdline import OneLineParser, Progress, flag_or_env
from bottleneck_tools.shard_reader import ShardReadError, list_shards, read_shards
from producer_lambda.backoff import error_code
from producer_lambda.filters import KeyFilter
from producer_lambda.settings import (
    SettingsError,
    bottleneck_environ,
    parse_count,
    parse_location,
    parse_output,
    parse_suffixes,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from bottleneck_tools.reconcile_fix import FixReport

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "NOT_FOUND",
    "ORPHAN_ROW",
    "Finding",
    "Pair",
    "Report",
    "head_object",
    "judge",
    "judge_rows",
    "main",
    "merge_join",
    "ordered_map",
    "parse",
    "reconcile",
    "run",
]

PROG = "bottleneck-reconcile"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MISSING = "missing"
STALE_ETAG = "stale-etag"
STALE_FINGERPRINT = "stale-fingerprint"
ORPHAN = "orphan"
KINDS = (MISSING, STALE_ETAG, STALE_FINGERPRINT, ORPHAN)
# Not in KINDS (whose counts the summary's "findings" holds, unchanged): counted apart.
ORPHAN_ROW = "orphan-row"
ALL_KINDS = (*KINDS, ORPHAN_ROW)
# The consumer's own objects beside its feature files: never a feature file or an orphan.
_CONSUMER_FOLDERS = ("_bottleneck/", TOMBSTONES)
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_SPOOL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing out of line: its kind, the image key and the feature key, and what differs.

    ``image`` is the image as listed (missing and stale findings: its message carries the listed
    ETag and size), ``feature`` the feature file as listed (orphans: its delete is conditional on
    that ETag). ``repeat``: the same image was reported under another kind already (a file stale
    in both ways), so ``--fix`` acts on it once.
    """

    kind: str
    key: str
    feature_key: str | None = None
    detail: str = ""
    image: Listed | None = None
    feature: Listed | None = None
    repeat: bool = False
    source_bucket: str = ""  # orphan-row: the gone image's bucket

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "feature_key": self.feature_key,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Pair:
    """One row of the join: an image, its feature file, or both."""

    image: Listed | None
    feature: Listed | None


@dataclass
class Report:
    """Counts of one run; ``fingerprints`` counts the feature files HEADed, per fingerprint."""

    images: int = 0
    accepted: int = 0  # images the key filter takes (not in the summary: a version's only)
    features: int = 0
    checked: int = 0
    vanished: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    fingerprints: Counter[str] = field(default_factory=Counter)
    expected_fingerprint: str | None = None
    majority: bool = False
    heads: bool = True
    interrupted: bool = False
    error: str | None = None
    shards: int = 0  # committed shards under the output
    rows: int = 0  # their rows of this source's images (newest, not buried)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the counts."""
        return {
            "images": self.images,
            "features": self.features,
            "checked": self.checked,
            "vanished": self.vanished,
            "findings": {kind: self.counts.get(kind, 0) for kind in KINDS},
            "fingerprints": dict(self.fingerprints.most_common()),
            "expected_fingerprint": self.expected_fingerprint,
            "expected_is_majority": self.majority,
            "heads": self.heads,
            "shards": self.shards,
            "shard_rows": self.rows,
            "orphan_rows": self.counts.get(ORPHAN_ROW, 0),
            "interrupted": self.interrupted,
            "error": self.error,
        }


# ---------------------------------------------------------------------------- pure parts


def merge_join(
    images: Iterable[Listed], features: Iterable[Listed], output_prefix: str
) -> Iterator[Pair]:
    """Full outer join of images (key order) and feature files (listing order) by feature key.

    ``features`` are the output listing under ``output_prefix + <images prefix>``; objects there
    that do not end in ``.npy`` are not feature files and are passed over. Images are re-sorted
    into ``key + ".npy"`` order with :func:`bottleneck_tools.backfill.in_feature_order`.
    """
    cut = len(output_prefix)
    feature_iter = (f for f in features if f.key.endswith(FEATURE_SUFFIX))
    feature = next(feature_iter, None)
    for image in in_feature_order(images):
        target = feature_key("", image.key)
        while feature is not None and feature.key[cut:] < target:
            yield Pair(None, feature)
            feature = next(feature_iter, None)
        if feature is not None and feature.key[cut:] == target:
            yield Pair(image, feature)
            feature = next(feature_iter, None)
        else:
            yield Pair(image, None)
    while feature is not None:
        yield Pair(None, feature)
        feature = next(feature_iter, None)


def judge(
    image: Listed, feature_key: str, metadata: Mapping[str, str], expected: str | None
) -> list[Finding]:
    """The stale findings for a matched pair, from the feature file's user metadata.

    ``expected`` is the fingerprint to hold it to; ``None`` checks the ETag only.
    """
    findings: list[Finding] = []
    recorded = metadata.get(SOURCE_ETAG, "").strip('"')
    current = (image.etag or "").strip('"')
    if recorded != current:
        detail = f"source-etag {recorded or '-'} != {current}"
        findings.append(Finding(STALE_ETAG, image.key, feature_key, detail, image=image))
    fingerprint = metadata.get(FINGERPRINT, "")
    if expected is not None and fingerprint != expected:
        findings.append(
            Finding(
                STALE_FINGERPRINT,
                image.key,
                feature_key,
                f"fingerprint {fingerprint or '-'} != {expected}",
                image=image,
                repeat=bool(findings),
            )
        )
    return findings


# An image's rows: fingerprint -> (its shard, the row).
ImageRows = Mapping[str, tuple[ShardIndex, ShardRow]]


def row_name(index: ShardIndex, row: ShardRow) -> str:
    """How a finding names a shard row: ``<shard .npy key>#<row>``."""
    return f"{index.key.npy_key}#{row.row}"


def judge_rows(image: Listed, rows: ImageRows, expected: str | None) -> list[Finding] | None:
    """The stale findings for an image's shard rows: ``None`` when a row is current (its ETag,
    and the expected fingerprint unless ``expected`` is ``None``), ``[]`` when it has no row."""
    current = (image.etag or "").strip('"')
    if expected is None:
        matching = [pair for pair in rows.values() if pair[1].etag == current]
        if matching or not rows:
            return None if matching else []
        index, row = next(iter(rows.values()))
        detail = f"source-etag {row.etag or '-'} != {current}"
        return [Finding(STALE_ETAG, image.key, row_name(index, row), detail, image=image)]
    if expected in rows:
        index, row = rows[expected]
        if row.etag == current:
            return None
        detail = f"source-etag {row.etag or '-'} != {current}"
        return [Finding(STALE_ETAG, image.key, row_name(index, row), detail, image=image)]
    if not rows:
        return []
    found = sorted(rows)
    index, row = rows[found[0]]
    detail = f"fingerprint {', '.join(found)} != {expected}"
    return [Finding(STALE_FINGERPRINT, image.key, row_name(index, row), detail, image=image)]


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    concurrency: int,
    wanted: Callable[[Any], bool] = lambda _: True,
) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` in input order, ``fn`` on ``concurrency`` threads; ``None`` where
    ``wanted(item)`` is false. At most ``2 * concurrency`` items are held; an exception from
    ``fn`` is raised when its item's turn comes (the pool then finishes what it started)."""
    window: deque[tuple[Any, Future[Any] | None]] = deque()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="head") as pool:
        try:
            for item in items:
                window.append((item, pool.submit(fn, item) if wanted(item) else None))
                while len(window) > 2 * concurrency:
                    head, future = window.popleft()
                    yield head, None if future is None else future.result()
            while window:
                head, future = window.popleft()
                yield head, None if future is None else future.result()
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()


# ---------------------------------------------------------------------------- the run


def head_object(s3: S3Client, bucket: str, key: str) -> Mapping[str, Any] | None:
    """The HeadObject response, or ``None`` when there is no such object (``--fix`` confirms
    orphans with it too)."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in NOT_FOUND:
            return None
        raise


def _head_metadata(s3: S3Client, bucket: str, key: str) -> dict[str, str] | None:
    response = head_object(s3, bucket, key)
    if response is None:
        return None
    return {k.lower(): v for k, v in response.get("Metadata", {}).items()}


def reconcile(
    s3: S3Client,
    source: S3Location,
    output: S3Location,
    *,
    key_filter: KeyFilter | None = None,
    fingerprint: str | None = None,
    heads: bool = True,
    concurrency: int = 16,
    report: Report | None = None,
    root: S3Location | None = None,
) -> Generator[Finding, None, None]:
    """Stream the findings for ``source`` against ``output``; counts accumulate in ``report``.

    Objects of ``source`` under ``root`` (default ``output``; a version's root of versions, so
    that no version's files count as images) are not images. A feature file
    deleted between the listing and its HEAD is counted in ``report.vanished``. Without
    ``fingerprint`` (and with ``heads``) the ``stale-fingerprint`` findings come last, once the
    majority fingerprint is known. AWS errors are raised.
    """
    report = report if report is not None else Report()
    report.heads = heads
    report.expected_fingerprint = fingerprint
    accept = key_filter or KeyFilter(input_prefix=source.prefix, output=root or output)
    outside = root or output

    def images() -> Iterator[Listed]:
        for obj in list_objects(s3, source.bucket, source.prefix):
            if not outside.contains(source.bucket, obj.key):
                report.images += 1
                report.accepted += accept.reason(source.bucket, obj.key, obj.size) is None
                yield obj

    def features() -> Iterator[Listed]:
        for obj in list_objects(s3, output.bucket, output.prefix + source.prefix):
            if _consumers_own(output.prefix, obj.key):
                continue  # a shard, a tombstone, a marker: no image's feature file
            report.features += obj.key.endswith(FEATURE_SUFFIX)
            yield obj

    def head(pair: Pair) -> dict[str, str] | None:
        assert pair.feature is not None
        return _head_metadata(s3, output.bucket, pair.feature.key)

    by_image = _shard_rows(s3, source, output, concurrency, report)
    if by_image and heads and fingerprint is None:
        # Rows name their fingerprint: the majority is known before the join, and files are
        # held to it too (one expected fingerprint for the image, whichever layout has it).
        spread = Counter(fp for rows in by_image.values() for fp in rows)
        top = max(spread.values())
        fingerprint = min(fp for fp, n in spread.items() if n == top)
        report.expected_fingerprint = fingerprint
        report.majority = True
    seen: set[str] = set()  # images listed that have rows: the other rows are orphans

    def rows_of(image: Listed) -> ImageRows:
        rows = by_image.get(image.key)
        if rows is None:
            return {}
        seen.add(image.key)
        return rows

    spools: dict[str, IO[str]] = {}
    try:
        pairs = merge_join(images(), features(), output.prefix)
        for pair, metadata in ordered_map(
            head,
            pairs,
            concurrency=concurrency,
            wanted=lambda p: heads and p.image is not None and p.feature is not None,
        ):
            if pair.feature is None:
                assert pair.image is not None
                rows = rows_of(pair.image)
                if accept.reason(source.bucket, pair.image.key, pair.image.size) is None:
                    verdict = judge_rows(pair.image, rows, fingerprint if heads else None)
                    if not rows:
                        yield _count(report, Finding(MISSING, pair.image.key, image=pair.image))
                    elif heads and verdict:
                        for finding in verdict:
                            yield _count(report, finding)
                continue
            if pair.image is None:
                name = source_key_of(output.prefix, pair.feature.key) or pair.feature.key
                orphan = Finding(
                    ORPHAN, name, pair.feature.key, "image is gone", feature=pair.feature
                )
                yield _count(report, orphan)
                continue
            rows = rows_of(pair.image)
            if not heads:
                continue
            if metadata is None:
                report.vanished += 1
                continue
            report.checked += 1
            found = metadata.get(FINGERPRINT, "")
            report.fingerprints[found] += 1
            stale = judge(pair.image, pair.feature.key, metadata, fingerprint)
            if stale and rows and judge_rows(pair.image, rows, fingerprint) is None:
                stale = []  # a current row stands for the image
            for finding in stale:
                yield _count(report, finding)
            if fingerprint is None:
                spool = spools.get(found)
                if spool is None:
                    spool = spools[found] = _spool()
                image = pair.image
                # Whether the image was reported stale already: --fix then sends it once.
                row = [image.key, pair.feature.key, image.etag, image.size, bool(stale)]
                spool.write(json.dumps(row) + "\n")
        if fingerprint is None and report.fingerprints:
            # Ties go to the lexically first fingerprint, so that reruns agree.
            top = max(report.fingerprints.values())
            majority = min(fp for fp, n in report.fingerprints.items() if n == top)
            report.expected_fingerprint = majority
            report.majority = True
            for found in sorted(spools):
                if found == majority:
                    continue
                spool = spools[found]
                spool.seek(0)
                for line in spool:
                    key, feature_key, etag, size, repeat = json.loads(line)
                    detail = f"fingerprint {found or '-'} != {majority} (majority)"
                    finding = Finding(
                        STALE_FINGERPRINT,
                        key,
                        feature_key,
                        detail,
                        image=Listed(key, etag, size),
                        repeat=repeat,
                    )
                    yield _count(report, finding)
        for key in sorted(by_image.keys() - seen):
            # Rows are immutable: --fix buries them with a tombstone once the image is gone.
            index, shard_row = next(iter(by_image[key].values()))
            orphan = Finding(
                ORPHAN_ROW,
                key,
                row_name(index, shard_row),
                "image is gone; its row stays in the shard",
                source_bucket=source.bucket,
            )
            yield _count(report, orphan)
    finally:
        for spool in spools.values():
            spool.close()


def _consumers_own(prefix: str, key: str) -> bool:
    """Whether ``key`` is one of the consumer's own objects under output ``prefix``."""
    return is_shard_key(prefix, key) or key[len(prefix) :].startswith(_CONSUMER_FOLDERS)


def _shard_rows(
    s3: S3Client, source: S3Location, output: S3Location, concurrency: int, report: Report
) -> dict[str, dict[str, tuple[ShardIndex, ShardRow]]]:
    """The rows of ``source``'s images in ``output``'s shards (newest, not buried), by image key
    then fingerprint; empty (one listing) without shards. A damaged shard is an error."""
    listing = list_shards(s3, output.bucket, output.prefix)
    if not listing.indexes:
        return {}
    try:
        shards = read_shards(s3, output.bucket, listing, concurrency, strict=False)
    except ShardReadError as exc:
        raise ShardsUnreadable(str(exc)) from None
    report.shards = len(shards.indexes)
    by_image: dict[str, dict[str, tuple[ShardIndex, ShardRow]]] = {}
    for (bucket, key, fp), pair in shards.rows.items():
        if bucket == source.bucket and key.startswith(source.prefix):
            by_image.setdefault(key, {})[fp] = pair
            report.rows += 1
    return by_image


class ShardsUnreadable(Exception):
    """A damaged shard index or tombstone object under the output, in one line."""


def _spool() -> IO[str]:
    return tempfile.SpooledTemporaryFile(  # closed by reconcile's finally
        max_size=_SPOOL_BYTES, mode="w+", encoding="utf-8", newline="\n"
    )


def _count(report: Report, finding: Finding) -> Finding:
    report.counts[finding.kind] += 1
    return finding


# ---------------------------------------------------------------------------- command line


@dataclass(frozen=True, slots=True)
class Options:
    """The validated command line."""

    source: S3Location
    output: S3Location  # a template's root
    fingerprint: str | None = None
    suffixes: tuple[str, ...] = ()
    heads: bool = True
    concurrency: int = 16
    limit: int = 10
    json: bool = False
    fix: bool = False
    dry_run: bool = False
    queue_url: str | None = None
    progress: bool = True
    # --output with {model}/{fingerprint}: its versions are reconciled (output is its root).
    output_template: OutputTemplate | None = None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (environment defaults are applied by :func:`parse`)."""
    parser = OneLineParser(
        prog=PROG,
        description="Report images without a feature file, out-of-date feature files "
        "(re-uploaded image, changed settings) and feature files whose image is gone; "
        "with --fix, enqueue the images and delete the left-over files.",
        epilog="Read-only unless --fix. One HeadObject per feature file that has an image, "
        "unless --no-head; with --fix, one more per orphan before it is deleted.",
    )
    parser.add_argument("source", help="s3://bucket/prefix/ of the images")
    parser.add_argument(
        "--output",
        help="s3://bucket/prefix/ of the feature files; a root of versions (or a template "
        "ending in {model}/{fingerprint}/) is reconciled per version [BOTTLENECK_OUTPUT]",
    )
    parser.add_argument(
        "--fingerprint",
        help="the fingerprint current files must carry (default: the most common one)",
    )
    parser.add_argument(
        "--suffixes",
        help="comma-separated image suffixes [BOTTLENECK_SUFFIXES, default as the producer's]",
    )
    parser.add_argument(
        "--no-head",
        action="store_true",
        help="listings only: report missing and orphan files, not stale ones",
    )
    parser.add_argument(
        "--concurrency",
        default="16",
        help="requests in parallel, per kind (HEADs, sends) (default 16, max 64)",
    )
    parser.add_argument(
        "--limit", default="10", help="keys shown per kind without --json (default 10)"
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per finding, then a summary line"
    )
    fixing = parser.add_argument_group("fixing (--fix)")
    fixing.add_argument(
        "--fix",
        action="store_true",
        help="enqueue missing and stale images (the messages bottleneck-enqueue sends) and "
        "delete orphaned feature files",
    )
    fixing.add_argument("--queue-url", help="SQS work queue URL [BOTTLENECK_QUEUE_URL]")
    fixing.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing; print the files --fix would delete and the messages it would send",
    )
    fixing.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    """Parse and validate the command line; bad arguments exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        source = parse_location(args.source, "source")
        output_uri = args.output or environ.get("BOTTLENECK_OUTPUT", "").strip()
        if not output_uri:
            raise SettingsError("--output (or BOTTLENECK_OUTPUT) is required")
        template = parse_output(output_uri, "--output" if args.output else "BOTTLENECK_OUTPUT")
        suffixes_text = args.suffixes or environ.get("BOTTLENECK_SUFFIXES")
        suffixes = parse_suffixes(suffixes_text, "--suffixes" if args.suffixes else "suffixes")
        concurrency = parse_count(args.concurrency, "--concurrency", 16, 1)
        if concurrency > 64:
            raise SettingsError(f"--concurrency must be <= 64, got {concurrency}")
        fingerprint = args.fingerprint.strip() if args.fingerprint is not None else None
        if fingerprint == "":
            raise SettingsError("--fingerprint must not be empty")
        if fingerprint is not None and args.no_head:
            raise SettingsError("--fingerprint needs the HEADs that --no-head turns off")
        if not args.fix:
            if args.dry_run:
                raise SettingsError("--dry-run only applies with --fix")
            if args.queue_url is not None:
                raise SettingsError("--queue-url only applies with --fix")
        queue_url, _ = flag_or_env(args, "--queue-url", "BOTTLENECK_QUEUE_URL", environ)
        if args.fix and not args.dry_run and not queue_url:
            raise SettingsError("--fix needs --queue-url (or BOTTLENECK_QUEUE_URL)")
        return Options(
            source=source,
            output=template.root,
            output_template=template if template.templated else None,
            fingerprint=fingerprint,
            suffixes=suffixes,
            heads=not args.no_head,
            concurrency=concurrency,
            limit=parse_count(args.limit, "--limit", 10, 0),
            json=args.json,
            fix=args.fix,
            dry_run=args.dry_run,
            queue_url=queue_url if args.fix else None,
            progress=not args.no_progress,
        )
    except SettingsError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    options = parse(argv, bottleneck_environ())
    try:
        import boto3
        from botocore.config import Config

        # With --fix, the orphans' HEADs run beside the stale checks' HEADs.
        pools = 2 if options.fix else 1
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=pools * options.concurrency + 4,
        )
        session = boto3.session.Session()
        s3: S3Client = session.client("s3", config=config)
        sqs: SQSClient | None = None
        if options.fix and not options.dry_run:
            sqs = session.client("sqs", config=config)
    except BotoCoreError as exc:
        sys.stderr.write(f"{PROG}: error: cannot create AWS clients: {exc}\n")
        return EXIT_FAILED
    return run(options, s3=s3, sqs=sqs)


def run(
    options: Options,
    *,
    s3: S3Client,
    sqs: SQSClient | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the validated command with the given clients (``sqs`` only for ``--fix`` without
    ``--dry-run``); returns the exit status."""
    # Imported here, not at the top: the fix module imports this one (the findings it acts on).
    from bottleneck_tools.reconcile_fix import Fixer, render_fix, render_plan

    out = stdout or sys.stdout
    err = stderr or sys.stderr
    template = options.output_template or OutputTemplate(options.output)
    try:
        versions = find_versions(s3, template)
    except (ClientError, BotoCoreError) as exc:
        err.write(f"{PROG}: error: cannot list {template}: {error_code(exc)}: {exc}\n")
        return EXIT_FAILED
    if versions.found or template.templated:
        problem = _versions_problem(options, template, versions)
        if problem:
            err.write(f"{PROG}: error: {problem}\n")
            return EXIT_USAGE
        if not options.fix:
            return run_versions(options, template, versions, s3=s3, stdout=out, stderr=err)
        # --fix on a root of one version: that version, held to its own fingerprint.
        (version,) = versions.found
        fingerprint = _fingerprint_of(template, versions.label(version)) if options.heads else None
        options = replace(options, output=version, fingerprint=fingerprint)
    sending = options.fix and not options.dry_run
    if sending:
        if sqs is None or options.queue_url is None:
            raise ValueError("--fix needs an SQS client and a queue URL")
        try:
            sqs.get_queue_attributes(QueueUrl=options.queue_url, AttributeNames=["QueueArn"])
        except (ClientError, BotoCoreError) as exc:
            err.write(
                f"{PROG}: error: cannot use queue {options.queue_url}: {error_code(exc)}: {exc}\n"
            )
            return EXIT_FAILED

    progress = Progress("fixed", "file", err, enabled=sending and options.progress)

    def plan(action: str, what: str) -> None:
        out.write(render_plan(action, what, options.json))

    fixer: Fixer | None = None
    if options.fix:
        fixer = Fixer(
            s3=s3,
            sqs=sqs,
            source=options.source,
            output=options.output,
            queue_url=options.queue_url,
            concurrency=options.concurrency,
            dry_run=options.dry_run,
            on_done=progress.update,
            on_plan=plan,
            sleep=sleep,
        )
    report = Report()
    shown: dict[str, list[Finding]] = {kind: [] for kind in ALL_KINDS}
    findings = reconcile(
        s3,
        options.source,
        options.output,
        key_filter=KeyFilter(
            suffixes=options.suffixes or parse_suffixes(None, "--suffixes"),
            input_prefix=options.source.prefix,
            output=options.output,
        ),
        fingerprint=options.fingerprint,
        heads=options.heads,
        concurrency=options.concurrency,
        report=report,
    )
    try:
        with closing(findings):
            for finding in findings:
                if options.json:
                    out.write(json.dumps(finding.to_json(), ensure_ascii=False) + "\n")
                elif len(shown[finding.kind]) < options.limit:
                    shown[finding.kind].append(finding)
                if fixer is not None:
                    fixer.take(finding)
        if fixer is not None:
            fixer.flush()
    except KeyboardInterrupt:
        report.interrupted = True
    except (ClientError, BotoCoreError) as exc:
        report.error = f"{error_code(exc)}: {exc}"
    except ShardsUnreadable as exc:
        report.error = str(exc)
    finally:
        # A stopped run (Ctrl-C, a listing error) cancels the work not yet started and waits for
        # the requests in flight, so that the report says exactly what was done.
        stopping = report.interrupted or report.error is not None
        if fixer is not None and fixer.finish(stop=stopping):
            report.interrupted = True
        progress.close()

    fixed = fixer.report if fixer is not None else None
    if options.json:
        summary = report.summary()
        if fixed is not None:
            summary["fix"] = fixed.summary()
        out.write(json.dumps({"summary": summary}, ensure_ascii=False) + "\n")
    else:
        out.write(render_text(report, shown, options, fixed) + "\n")
    out.flush()
    if fixed is not None:
        for failure in fixed.failures:
            err.write(f"{PROG}: failed: {failure.line()}\n")
        if fixed.failures_left_out:
            err.write(f"{PROG}: failed: {fixed.failures_left_out:,} more, not listed\n")
    if report.error:
        err.write(f"{PROG}: error: {report.error}\n")
        return EXIT_FAILED
    if report.interrupted:
        done = f"{render_fix(fixed)}; " if fixed is not None else ""
        err.write(f"{PROG}: interrupted: {done}the counts cover only what was listed\n")
        return EXIT_INTERRUPTED
    if fixed is not None and not fixed.complete:
        return EXIT_FAILED
    return 0


def _fields(template: OutputTemplate) -> tuple[str, ...]:
    return template.fields or DEFAULT_FIELDS


def _fingerprint_of(template: OutputTemplate, label: str) -> str | None:
    """The fingerprint a version's name holds (``None`` for a ``{model}``-only template)."""
    fields = _fields(template)
    return label.split("/")[fields.index("fingerprint")] if "fingerprint" in fields else None


def _versions_problem(options: Options, template: OutputTemplate, versions: Versions) -> str:
    """Why the options do not fit a root of versions ('' when they do), in one line."""
    names = ", ".join(versions.labels) or "none yet"
    example = versions.found[0] if versions.found else f"{versions.root}<model>/<fingerprint>/"
    one = f"give one version's prefix, such as {example}"
    if options.fingerprint is not None:
        return (
            f"--fingerprint: {versions.root} is a root of versions ({names}), each held to the "
            f"fingerprint in its name; {one}"
        )
    if options.fix and len(versions.found) != 1:
        return (
            f"--fix: {versions.root} holds {len(versions.found)} versions ({names}): the "
            f"messages would feed whichever model the consumer runs; {one}"
        )
    return ""


@dataclass
class VersionReport:
    """One version's reconciliation, and the distinct stale images in it."""

    label: str
    location: S3Location
    report: Report
    shown: dict[str, list[Finding]]
    stale_images: int = 0

    @property
    def with_file(self) -> int:
        return max(0, self.report.accepted - self.report.counts.get(MISSING, 0))

    @property
    def complete(self) -> int | None:
        """Images with a current file (``None`` without the HEADs that judge them)."""
        return max(0, self.with_file - self.stale_images) if self.report.heads else None

    @property
    def percent(self) -> float | None:
        done = self.complete if self.complete is not None else self.with_file
        return round(100 * done / self.report.accepted, 1) if self.report.accepted else None

    def summary(self) -> dict[str, Any]:
        return {
            **self.report.summary(),
            "accepted": self.report.accepted,
            "with_file": self.with_file,
            "complete": self.complete,
            "percent_complete": self.percent,
        }

    def line(self, width: int) -> str:
        accepted = self.report.accepted
        done = self.complete if self.complete is not None else self.with_file
        what = "current" if self.complete is not None else "with a file (--no-head)"
        percent = f" ({self.percent:.1f}%)" if self.percent is not None else ""
        text = (
            f"  {self.label:<{width}}  {self.report.features:,} files, {done:,} of "
            f"{accepted:,} images {what}{percent}"
        )
        counts = [
            f"{kind} {self.report.counts[kind]:,}" for kind in ALL_KINDS if self.report.counts[kind]
        ]
        return text + (f": {', '.join(counts)}" if counts else "")


def run_versions(
    options: Options,
    template: OutputTemplate,
    versions: Versions,
    *,
    s3: S3Client,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """Reconcile the images against each version under a root (read-only); the exit status."""
    done: list[VersionReport] = []
    stopped: tuple[str, str] | None = None  # ("interrupted" | "error", text)
    accept = KeyFilter(
        suffixes=options.suffixes or parse_suffixes(None, "--suffixes"),
        input_prefix=options.source.prefix,
        output=versions.root,
    )
    for version in versions.found:
        label = versions.label(version)
        result = VersionReport(label, version, Report(), {kind: [] for kind in ALL_KINDS})
        done.append(result)
        findings = reconcile(
            s3,
            options.source,
            version,
            key_filter=accept,
            fingerprint=_fingerprint_of(template, label) if options.heads else None,
            heads=options.heads,
            concurrency=options.concurrency,
            report=result.report,
            root=versions.root,
        )
        try:
            with closing(findings):
                for finding in findings:
                    if finding.kind in (STALE_ETAG, STALE_FINGERPRINT) and not finding.repeat:
                        result.stale_images += 1
                    if options.json:
                        line = {**finding.to_json(), "version": label}
                        stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
                    elif len(result.shown[finding.kind]) < options.limit:
                        result.shown[finding.kind].append(finding)
        except KeyboardInterrupt:
            result.report.interrupted = True
            stopped = ("interrupted", "the counts cover only what was listed")
        except (ClientError, BotoCoreError) as exc:
            result.report.error = f"{error_code(exc)}: {exc}"
            stopped = ("error", result.report.error)
        except ShardsUnreadable as exc:
            result.report.error = str(exc)
            stopped = ("error", result.report.error)
        if stopped:
            break
    if options.json:
        summary = {
            "root": str(versions.root),
            "versions": {result.label: result.summary() for result in done},
            "other_folders": list(versions.others),
        }
        stdout.write(json.dumps({"summary": summary}, ensure_ascii=False) + "\n")
    else:
        stdout.write(render_versions(options, versions, done) + "\n")
    stdout.flush()
    if stopped is not None:
        stderr.write(f"{PROG}: {stopped[0]}: {stopped[1]}\n")
        return EXIT_INTERRUPTED if stopped[0] == "interrupted" else EXIT_FAILED
    return 0


def render_versions(options: Options, versions: Versions, done: Sequence[VersionReport]) -> str:
    """The table of versions (how complete each is), then each version's own report."""
    count = len(versions.found)
    lines = [
        f"{options.source} -> {versions.root}: {count} version{'s' * (count != 1)} "
        "(<model>/<fingerprint>)"
    ]
    if not count:
        lines.append("  no version yet: nothing has been written under this root")
    width = max((len(result.label) for result in done), default=0)
    lines += [result.line(width) for result in done]
    if versions.others:
        cut = len(versions.root.prefix)
        folders = ", ".join(folder[cut:] for folder in versions.others)
        lines.append(f"  also under it, in no version (not compared): {folders}")
    for result in done:
        lines.append("")
        version = replace(options, output=result.location)
        lines.append(render_text(result.report, result.shown, version, None, "its folder's name"))
    return "\n".join(lines)


def render_text(
    report: Report,
    shown: Mapping[str, Sequence[Finding]],
    options: Options,
    fixed: FixReport | None = None,
    expected_from: str | None = None,
) -> str:
    """The human report: what was compared, then each kind with its count and first keys, then
    what ``--fix`` did. ``expected_from`` says where the expected fingerprint came from when
    neither the majority nor ``--fingerprint`` gave it (a version's name)."""
    checked = f", {report.checked:,} checked by HEAD" if report.heads else " (--no-head)"
    lines = [
        f"{options.source} -> {options.output}: {report.images:,} objects, "
        f"{report.features:,} feature files{checked}"
    ]
    if report.shards:
        lines.append(
            f"  shards: {report.shards:,} committed, {report.rows:,} rows of these images "
            "(newest per image, less tombstoned)"
        )
    if report.expected_fingerprint is not None:
        how = "majority of files" if report.majority else expected_from or "--fingerprint"
        lines.append(f"  expected fingerprint {report.expected_fingerprint} ({how})")
    if len(report.fingerprints) > 1:
        spread = ", ".join(f"{fp or '-'} {n:,}" for fp, n in report.fingerprints.most_common())
        lines.append(f"  fingerprints seen: {spread}")
    for kind in ALL_KINDS:
        if not options.heads and kind in (STALE_ETAG, STALE_FINGERPRINT):
            continue
        if kind == ORPHAN_ROW and not report.shards:
            continue
        count = report.counts.get(kind, 0)
        lines.append(f"  {kind:<18} {count:,}")
        for finding in shown.get(kind, ()):
            plain = kind in (ORPHAN, ORPHAN_ROW)
            detail = f"  ({finding.detail})" if finding.detail and not plain else ""
            named = finding.feature_key if kind in (ORPHAN, ORPHAN_ROW) else finding.key
            lines.append(f"      {named}{detail}")
        if count > len(shown.get(kind, ())):
            lines.append(
                f"      ... and {count - len(shown.get(kind, ())):,} more (--json lists all)"
            )
    if report.vanished:
        lines.append(f"  {report.vanished:,} feature files vanished between listing and HEAD")
    if not any(report.counts.values()) and not report.error and not report.interrupted:
        lines.append("  everything is in order")
    if fixed is not None:
        from bottleneck_tools.reconcile_fix import render_fix  # see run()

        lines.append(f"  fix: {render_fix(fixed)}")
        if report.counts.get(STALE_FINGERPRINT) and report.majority:
            lines.append(
                "  note: a consumer replaces stale-fingerprint files only if its own fingerprint "
                f"is {report.expected_fingerprint} (--fingerprint names the one to hold files to)"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
