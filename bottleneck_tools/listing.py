"""Listing S3 keys: one prefix with one paginator, or a whole key space in parallel.

One ListObjectsV2 paginator walks a prefix one page (1,000 keys) after another, each page a
round trip: a billion keys are a million sequential calls, most of a day. S3 serves different
prefixes in parallel, so :class:`ParallelListing` splits the key space where its folders are:
a listing with ``Delimiter='/'`` returns the keys right under a prefix and, apart, its common
prefixes (the sub-folders), each of which is then listed by its own task on a thread pool.
Sub-folders are split again, down to ``max_depth`` levels or until ``enough`` prefixes are known;
the rest are listed whole, without a delimiter. Every key is listed exactly once: it lies either
right under the prefix it was found at (no further ``/``) or under exactly one of its common
prefixes, whatever the folders look like (``a//b``, a leading ``/``, a key that ends in ``/``).

Memory stays flat however many folders there are: at most ``max_queued`` listings wait for a
thread; past that, the task that finds a folder lists it itself before it reads on (a bucket of
a million user folders would otherwise queue a million tasks).

What it cannot split is a flat key space (no ``/`` below the prefix): that is one sequential
listing still, and an S3 Inventory (``bottleneck-enqueue --manifest``) is the way to go fast.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["DELIMITER", "Listed", "ParallelListing", "Part", "list_objects", "listed"]

DELIMITER = "/"


@dataclass(frozen=True, slots=True)
class Listed:
    """One object from a listing: key, ETag (quotes stripped) and size."""

    key: str
    etag: str | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """A share of the key space: the keys under ``prefix``, or with ``direct`` only those right
    under it (no ``/`` after the prefix: the rest belong to the parts of its sub-folders)."""

    prefix: str
    direct: bool = False


def listed(obj: Any) -> Listed:
    """A listing's ``Contents`` entry as a :class:`Listed`."""
    etag = obj.get("ETag")
    return Listed(key=obj["Key"], etag=etag.strip('"') if etag else None, size=obj.get("Size"))


def list_objects(
    s3: S3Client,
    bucket: str,
    prefix: str,
    *,
    delimiter: str | None = None,
    start_after: str | None = None,
    on_prefix: Callable[[str], None] | None = None,
) -> Iterator[Listed]:
    """Every object under ``prefix``, in S3's order, one page in memory at a time.

    With ``delimiter`` only the objects right under ``prefix``; the common prefixes go to
    ``on_prefix``, each as its page arrives. ``start_after``: only keys after this one.
    """
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if delimiter is not None:
        params["Delimiter"] = delimiter
    if start_after is not None:
        params["StartAfter"] = start_after
    for page in s3.get_paginator("list_objects_v2").paginate(**params):
        if on_prefix is not None:
            for common in page.get("CommonPrefixes", []):
                on_prefix(common["Prefix"])
        for obj in page.get("Contents", []):
            yield listed(obj)


class ParallelListing:
    """Lists everything under a prefix as parts, each on a task of ``submit``.

    ``on_part(part, objects)`` runs on a worker for every part and must consume ``objects``
    (the part's listing, read as it is consumed): that is where the sub-folders it finds are
    submitted. ``max_depth`` 0 lists the whole prefix as one part, as a single paginator would.
    ``max_queued``: listings submitted and not started yet, at most.
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        *,
        submit: Callable[[Callable[[], None]], None],
        on_part: Callable[[Part, Iterator[Listed]], None],
        enough: int,
        max_depth: int,
        max_queued: int = 1024,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._submit = submit
        self._on_part = on_part
        self._enough = enough
        self._max_depth = max_depth
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._known = 0
        self._queued = 0

    def start(self, prefix: str) -> None:
        """Submit the listing of ``prefix`` (the tasks then submit the rest)."""
        self._schedule(prefix, 0)

    def _schedule(self, prefix: str, depth: int) -> None:
        with self._lock:
            self._known += 1
            split = depth < self._max_depth and self._known < self._enough
            queue = self._queued < self._max_queued
            self._queued += queue
        if not queue:
            # Enough waiting already: list it here (whole: there are folders enough to share).
            self._whole(prefix)
        elif split:
            self._submit(functools.partial(self._dequeued, self._split, prefix, depth))
        else:
            self._submit(functools.partial(self._dequeued, self._whole, prefix))

    def _dequeued(self, listing: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._queued -= 1
        listing(*args)

    def _split(self, prefix: str, depth: int) -> None:
        objects = list_objects(
            self._s3,
            self._bucket,
            prefix,
            delimiter=DELIMITER,
            on_prefix=lambda sub: self._schedule(sub, depth + 1),
        )
        self._on_part(Part(prefix, direct=True), objects)

    def _whole(self, prefix: str) -> None:
        self._on_part(Part(prefix), list_objects(self._s3, self._bucket, prefix))
