"""``bottleneck-enqueue``: enqueue every image under an S3 prefix (backfills, re-runs).

    bottleneck-enqueue s3://bucket/prefix/ --queue-url URL [--skip-existing --output s3://...]
                       [--manifest SOURCE] [--list-concurrency N]
                       [--dry-run] [--scale --job-queue Q --job-definition D]

Without ``--manifest`` the prefix is listed in parallel, split at its folders
(``--list-concurrency`` listings at once, see :mod:`bottleneck_tools.listing`). With it, the keys
come from SOURCE instead (a path or ``s3://`` URI): an S3 Inventory ``manifest.json`` (CSV,
Parquet or ORC data files, read in parallel), ``bottleneck-reconcile --json`` output, or a key
list (see :mod:`bottleneck_tools.manifest`); only keys under the prefix with an image suffix are
sent, with the same messages as a listing's. A SOURCE that is not one of these is one line and
exit status 2, before anything is sent.

Flags fall back to the Lambda's environment variables (``BOTTLENECK_QUEUE_URL``,
``BOTTLENECK_OUTPUT``, ``BOTTLENECK_SUFFIXES``, ``BOTTLENECK_JOB_QUEUE``, ...); a flag wins. AWS
endpoints, region and credentials come from the standard variables and chain
(``AWS_ENDPOINT_URL`` and friends), so the same command runs against AWS or a local emulator.

Output: with ``--dry-run``, the message bodies that would be sent, one JSON object a line; always,
a last line with the JSON summary. A progress bar (tqdm, on a terminal only) and JSON log lines go
to stderr. Exit status: 0 done, 1 some images not sent or an AWS error (a data file that cannot
be read included), 2 bad arguments or a malformed ``--manifest``, 130 interrupted (the summary
says what was sent, what failed and what was not sent).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from bottleneck_contract import logs
from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import ImageRef, encode
from bottleneck_contract.retry import no_botocore_retries
from bottleneck_tools.backfill import run_backfill
from bottleneck_tools.cmdline import OneLineParser, parse_validated
from bottleneck_tools.manifest import RECONCILE, Manifest, ManifestError, open_manifest
from bottleneck_tools.redrive import redrive
from producer_lambda.backoff import error_code
from producer_lambda.filters import KeyFilter
from producer_lambda.scaler import scale
from producer_lambda.settings import (
    DEFAULT_JOB_NAME_PREFIX,
    DEFAULT_MAX_JOBS,
    DEFAULT_MESSAGES_PER_JOB,
    DEFAULT_SUFFIXES,
    ScalingSettings,
    SettingsError,
    bottleneck_environ,
    parse_count,
    parse_job_name_prefix,
    parse_location,
    parse_output,
    parse_suffixes,
)

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "Options", "main", "parse", "run"]

PROG = "bottleneck-enqueue"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_LIST_CONCURRENCY = 16
MAX_LIST_CONCURRENCY = 256


@dataclass(frozen=True, slots=True)
class Options:
    """The validated command line."""

    source: S3Location | None
    queue_url: str | None
    output: S3Location | None = None
    skip_existing: bool = False
    suffixes: tuple[str, ...] = ()
    dry_run: bool = False
    concurrency: int = 8
    progress: bool = True
    verbose: bool = False
    scaling: ScalingSettings | None = None
    from_dead_letter: str | None = None
    error_codes: tuple[str, ...] = ()
    manifest: str | None = None
    list_concurrency: int = DEFAULT_LIST_CONCURRENCY


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags only; environment defaults are applied by :func:`parse`)."""
    parser = OneLineParser(
        prog=PROG,
        description="Send a work-queue message for every image under an S3 prefix.",
        epilog="Flags default to the BOTTLENECK_* variables of the Lambda; a flag wins.",
    )
    parser.add_argument("source", nargs="?", help="s3://bucket/prefix/ to list")
    parser.add_argument(
        "--from-dead-letter",
        metavar="URL",
        help="instead of listing S3, send this dead-letter queue's messages back to the work "
        "queue (after a fix), with a summary by error-code",
    )
    parser.add_argument(
        "--error-code",
        action="append",
        default=[],
        metavar="CODE",
        help="with --from-dead-letter: only messages with this error-code (repeatable)",
    )
    parser.add_argument(
        "--manifest",
        metavar="SOURCE",
        help="take the keys from SOURCE (a path or s3:// URI) instead of listing: an S3 Inventory "
        "manifest.json (CSV, Parquet or ORC), bottleneck-reconcile --json output, or a key list "
        "(one key or s3:// URI a line); only keys under the source prefix are sent",
    )
    parser.add_argument(
        "--list-concurrency",
        default=str(DEFAULT_LIST_CONCURRENCY),
        help="listings (split at the prefix's folders) or manifest data files read in parallel "
        f"(default {DEFAULT_LIST_CONCURRENCY}; 1: one paginator)",
    )
    parser.add_argument("--queue-url", help="SQS work queue URL [BOTTLENECK_QUEUE_URL]")
    parser.add_argument(
        "--output",
        help="s3://bucket/prefix/ of the feature files: never enqueued; with --skip-existing, "
        "checked [BOTTLENECK_OUTPUT]",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="send only images without a feature file under --output (one listing, no HEADs)",
    )
    parser.add_argument(
        "--suffixes",
        help="comma-separated image suffixes, any case [BOTTLENECK_SUFFIXES, default "
        f"{','.join(DEFAULT_SUFFIXES)}]",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="send nothing; print the message bodies that would be sent",
    )
    parser.add_argument(
        "--concurrency", default="8", help="SendMessageBatch calls in parallel (default 8)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO lines too")
    scaling = parser.add_argument_group("scaling (--scale)")
    scaling.add_argument(
        "--scale", action="store_true", help="run the Batch scaler once after enqueueing"
    )
    scaling.add_argument("--job-queue", help="Batch job queue [BOTTLENECK_JOB_QUEUE]")
    scaling.add_argument(
        "--job-definition", help="Batch job definition [BOTTLENECK_JOB_DEFINITION]"
    )
    scaling.add_argument(
        "--max-jobs", help=f"most active jobs [BOTTLENECK_MAX_JOBS, default {DEFAULT_MAX_JOBS}]"
    )
    scaling.add_argument(
        "--messages-per-job",
        help="backlog one job is for "
        f"[BOTTLENECK_MESSAGES_PER_JOB, default {DEFAULT_MESSAGES_PER_JOB}]",
    )
    scaling.add_argument(
        "--job-name-prefix",
        help=f"job name prefix [BOTTLENECK_JOB_NAME_PREFIX, default {DEFAULT_JOB_NAME_PREFIX}]",
    )
    return parser


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    """Parse and validate the command line; bad arguments exit 2 with one line."""
    return parse_validated(build_parser(), argv, environ, _options)


def _options(args: argparse.Namespace, env: Mapping[str, str]) -> Options:
    def pick(flag: str, var: str) -> tuple[str | None, str]:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            return value, flag
        if env.get(var, "").strip():
            return env[var].strip(), var
        return None, flag

    if args.manifest is not None:
        if args.from_dead_letter is not None:
            raise SettingsError("--manifest does not go with --from-dead-letter")
        if args.source is None:
            raise SettingsError(
                "--manifest needs the source s3://bucket/prefix/ its keys lie under"
            )
        if not args.manifest.strip():
            raise SettingsError("--manifest must name a file or an s3:// object")
    if (args.source is None) == (args.from_dead_letter is None):
        raise SettingsError("give either s3://bucket/prefix/ or --from-dead-letter URL")
    if args.error_code and not args.from_dead_letter:
        raise SettingsError("--error-code only applies with --from-dead-letter")
    source = parse_location(args.source, "source") if args.source is not None else None
    queue_url, _ = pick("--queue-url", "BOTTLENECK_QUEUE_URL")
    if not queue_url and not args.dry_run:
        raise SettingsError("--queue-url (or BOTTLENECK_QUEUE_URL) is required")
    output_uri, output_name = pick("--output", "BOTTLENECK_OUTPUT")
    # The stack's BOTTLENECK_OUTPUT may be a template (.../{model}/{fingerprint}/): its root is
    # what is never enqueued (every version lies under it).
    template = parse_output(output_uri, output_name) if output_uri else None
    output = template.root if template is not None else None
    if args.skip_existing and output is None:
        raise SettingsError("--skip-existing needs --output (or BOTTLENECK_OUTPUT)")
    if args.skip_existing and template is not None and template.templated:
        root = template.root
        raise SettingsError(
            f"--skip-existing needs one version's prefix "
            f"(s3://{root.bucket}/{root.prefix}<model>/<fingerprint>/), not the template "
            f"{output_uri!r}: which images are done depends on the model (bottleneck-status "
            "lists the versions)"
        )
    suffixes_text, suffixes_name = pick("--suffixes", "BOTTLENECK_SUFFIXES")
    suffixes = parse_suffixes(suffixes_text, suffixes_name)
    concurrency = parse_count(args.concurrency, "--concurrency", 8, 1)
    if concurrency > 64:
        raise SettingsError(f"--concurrency must be <= 64, got {concurrency}")
    list_concurrency = parse_count(
        args.list_concurrency, "--list-concurrency", DEFAULT_LIST_CONCURRENCY, 1
    )
    if list_concurrency > MAX_LIST_CONCURRENCY:
        raise SettingsError(
            f"--list-concurrency must be <= {MAX_LIST_CONCURRENCY}, got {list_concurrency}"
        )

    scaling = None
    if args.scale:
        job_queue, _ = pick("--job-queue", "BOTTLENECK_JOB_QUEUE")
        job_definition, _ = pick("--job-definition", "BOTTLENECK_JOB_DEFINITION")
        if not job_queue:
            raise SettingsError("--scale needs --job-queue (or BOTTLENECK_JOB_QUEUE)")
        if not job_definition:
            raise SettingsError("--scale needs --job-definition (or BOTTLENECK_JOB_DEFINITION)")
        max_jobs, max_jobs_name = pick("--max-jobs", "BOTTLENECK_MAX_JOBS")
        per_job, per_job_name = pick("--messages-per-job", "BOTTLENECK_MESSAGES_PER_JOB")
        prefix, prefix_name = pick("--job-name-prefix", "BOTTLENECK_JOB_NAME_PREFIX")
        scaling = ScalingSettings(
            job_queue=job_queue,
            job_definition=job_definition,
            max_jobs=parse_count(max_jobs, max_jobs_name, DEFAULT_MAX_JOBS, 0),
            messages_per_job=parse_count(per_job, per_job_name, DEFAULT_MESSAGES_PER_JOB, 1),
            job_name_prefix=parse_job_name_prefix(prefix or DEFAULT_JOB_NAME_PREFIX, prefix_name),
        )
    return Options(
        source=source,
        queue_url=queue_url,
        output=output,
        skip_existing=args.skip_existing,
        suffixes=suffixes,
        dry_run=args.dry_run,
        concurrency=concurrency,
        progress=not args.no_progress,
        verbose=args.verbose,
        scaling=scaling,
        from_dead_letter=args.from_dead_letter,
        error_codes=tuple(args.error_code),
        manifest=args.manifest,
        list_concurrency=list_concurrency,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    options = parse(argv, bottleneck_environ())
    logs.configure(logging.INFO if options.verbose else logging.WARNING)
    try:
        s3, sqs, batch = _clients(options.concurrency + options.list_concurrency)
    except BotoCoreError as exc:
        return _fail(f"cannot create AWS clients: {exc}")
    return run(options, s3=s3, sqs=sqs, batch=batch)


def run(
    options: Options,
    *,
    s3: S3Client,
    sqs: SQSClient,
    batch: BatchClient | None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the validated command with the given clients; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    if not options.dry_run:
        assert options.queue_url is not None
        try:
            sqs.get_queue_attributes(QueueUrl=options.queue_url, AttributeNames=["QueueArn"])
        except (ClientError, BotoCoreError) as exc:
            return _fail(f"cannot use queue {options.queue_url}: {error_code(exc)}: {exc}", err)

    if options.from_dead_letter is not None:
        return _redrive(options, sqs, out, err)
    assert options.source is not None
    manifest: Manifest | None = None
    if options.manifest is not None:
        try:
            manifest = open_manifest(options.manifest, s3, options.source.bucket)
        except ManifestError as exc:
            err.write(f"{PROG}: error: --manifest: {exc}\n")
            return EXIT_USAGE
        except OSError as exc:
            err.write(f"{PROG}: error: --manifest: cannot read {options.manifest}: {exc}\n")
            return EXIT_USAGE
        except (ClientError, BotoCoreError) as exc:
            return _fail(
                f"cannot read --manifest {options.manifest}: {error_code(exc)}: {exc}", err
            )
        if manifest.kind == RECONCILE and options.skip_existing:
            # Stale images have a feature file (an out-of-date one): the check would drop them.
            manifest.close()
            err.write(
                f"{PROG}: error: --skip-existing would drop reconcile's stale images (they have "
                "a feature file); its findings need no check\n"
            )
            return EXIT_USAGE

    bar: Any = None
    if options.progress and not options.dry_run:
        from tqdm import tqdm  # only when a bar is drawn

        bar = tqdm(desc="enqueued", unit="img", file=err, disable=None, dynamic_ncols=True)
    bar_lock = threading.Lock()

    def on_sent(count: int) -> None:
        if bar is not None:
            with bar_lock:
                bar.update(count)

    def on_selected(ref: ImageRef) -> None:
        out.write(encode(ref) + "\n")

    result = run_backfill(
        s3=s3,
        sqs=None if options.dry_run else sqs,
        source=options.source,
        queue_url=options.queue_url,
        key_filter=KeyFilter(
            suffixes=options.suffixes or parse_suffixes(None, "--suffixes"),
            input_prefix=options.source.prefix,
            output=options.output,
        ),
        existing=options.output if options.skip_existing else None,
        dry_run=options.dry_run,
        concurrency=options.concurrency,
        on_sent=on_sent,
        on_selected=on_selected,
        list_concurrency=options.list_concurrency,
        manifest=manifest,
    )
    if bar is not None:
        bar.close()
    summary = result.summary()
    status = 0
    if result.failed or result.error:
        status = EXIT_FAILED

    if options.scaling is not None and not options.dry_run and not result.interrupted:
        if batch is None:
            raise ValueError("--scale needs a Batch client")
        try:
            summary["scaler"] = scale(
                sqs, batch, options.queue_url or "", options.scaling
            ).summary()
        except (ClientError, BotoCoreError) as exc:
            summary["scaler"] = {"error": f"{error_code(exc)}: {exc}"}
            err.write(f"{PROG}: error: scaler failed: {error_code(exc)}: {exc}\n")
            status = EXIT_FAILED

    out.write(json.dumps(summary, ensure_ascii=False) + "\n")
    out.flush()
    if result.error:
        err.write(f"{PROG}: error: {result.error}\n")
    if result.interrupted:
        err.write(
            f"{PROG}: interrupted: sent {result.sent}, failed {result.failed}, "
            f"not sent {result.not_sent} ({'reading' if manifest else 'listing'} stopped early)\n"
        )
        return EXIT_INTERRUPTED
    return status


def _redrive(options: Options, sqs: SQSClient, out: TextIO, err: TextIO) -> int:
    """``--from-dead-letter``: dead letters back to the work queue, summarised by error-code."""
    assert options.from_dead_letter is not None
    try:
        result = redrive(
            sqs,
            options.from_dead_letter,
            options.queue_url or "",
            codes=options.error_codes,
            dry_run=options.dry_run,
        )
    except (ClientError, BotoCoreError) as exc:
        return _fail(f"redrive from {options.from_dead_letter}: {error_code(exc)}: {exc}", err)
    out.write(json.dumps(result.summary(), ensure_ascii=False) + "\n")
    out.flush()
    return EXIT_FAILED if result.failed else 0


def _clients(connections: int) -> tuple[S3Client, SQSClient, BatchClient]:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=connections + 4,
        connect_timeout=10,
        read_timeout=30,
    )
    session = boto3.session.Session()
    s3: S3Client = session.client("s3", config=config)
    sqs: SQSClient = session.client("sqs", config=config)
    # The scaler's call_with_backoff is the one layer for Batch (bottleneck_contract.retry).
    no_retries = Config(retries=no_botocore_retries())
    batch: BatchClient = session.client("batch", config=config.merge(no_retries))
    return s3, sqs, batch


def _fail(message: str, err: TextIO | None = None) -> int:
    (err or sys.stderr).write(f"{PROG}: error: {message}\n")
    return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
