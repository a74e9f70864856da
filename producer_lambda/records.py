"""One invocation's event, sorted: images to enqueue, deleted keys, skips, and whose they are.

Pure: no AWS calls. An SQS batch (the upload function's buffer queue) is read record by record,
and every image and deletion remembers the ids of the records that named it, so that a failure
sends back exactly those records (``batchItemFailures``) and no other. Any other event (an S3
notification invoking the function directly, an EventBridge event, SNS) is one unit: its
records succeed or are retried together. A record that cannot be parsed costs only itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bottleneck_contract.logs import log
from bottleneck_contract.messages import ImageRef, MalformedMessage, Removal, parse_notification
from producer_lambda.filters import KeyFilter

__all__ = ["SKIP_MALFORMED", "Selection", "is_sqs_batch", "select"]

SKIP_MALFORMED = "malformed"
_log = logging.getLogger(__name__)


@dataclass(slots=True)
class Selection:
    """What an event asks for, each image and each deleted key once, in the order first named.

    ``images`` maps each image to the ids of the SQS records that named it, ``removal_ids`` each
    deleted ``(bucket, key)`` (empty tuples when the event is not an SQS batch); ``removals``
    holds one :class:`Removal` per deleted key, the first named. ``record_ids`` is every record id
    of an SQS batch, in order, and ``None`` for any other event.
    """

    images: dict[ImageRef, tuple[str, ...]] = field(default_factory=dict)
    removals: dict[tuple[str, str], Removal] = field(default_factory=dict)
    removal_ids: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    record_ids: tuple[str, ...] | None = None

    def records_of(self, images: Iterable[ImageRef], removals: Iterable[Removal]) -> set[str]:
        """The ids of the SQS records that named any of ``images`` or ``removals``."""
        ids: set[str] = set()
        for ref in images:
            ids.update(self.images.get(ref, ()))
        for removal in removals:
            ids.update(self.removal_ids.get((removal.bucket, removal.key), ()))
        return ids


def is_sqs_batch(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is an SQS event source mapping's batch (every record has a messageId)."""
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(
            isinstance(r, Mapping)
            and r.get("eventSource") == "aws:sqs"
            and isinstance(r.get("messageId"), str)
            for r in records
        )
    )


def select(event: Mapping[str, Any], key_filter: KeyFilter) -> Selection:
    """Sort ``event`` into images, deleted keys and skips (with reasons), by the key filter.

    The filter applies to deletions too, output prefix first: the producer's own removals of
    feature files make ``Object Deleted`` events that must never be read as work of any kind.
    """
    sqs = is_sqs_batch(event)
    selection = Selection(
        record_ids=tuple(r["messageId"] for r in event["Records"]) if sqs else None
    )
    for record_id, item in _items(event, sqs):
        ids = (record_id,) if record_id is not None else ()
        if isinstance(item, str):
            selection.skipped[item] += 1
            continue
        reason = key_filter.reason(
            item.bucket, item.key, item.size if isinstance(item, ImageRef) else None
        )
        if reason is not None:
            selection.skipped[reason] += 1
            log(_log, logging.INFO, "skipped", reason=reason, bucket=item.bucket, key=item.key)
        elif isinstance(item, ImageRef):
            selection.images[item] = _merge(selection.images.get(item, ()), ids)
        else:
            # One removal per key: two events for one key (a delete and its lifecycle twin, or a
            # repeat) need one look at S3, and either record's failure is both records'.
            where = (item.bucket, item.key)
            selection.removals.setdefault(where, item)
            selection.removal_ids[where] = _merge(selection.removal_ids.get(where, ()), ids)
    return selection


def _items(
    event: Mapping[str, Any], sqs: bool
) -> Iterator[tuple[str | None, ImageRef | Removal | str]]:
    # One record at a time, so that a malformed record costs only itself. A Skip comes out as its
    # reason (a str), having been logged here.
    records = event.get("Records")
    if isinstance(records, list) and records:
        docs: list[Mapping[str, Any]] = [{"Records": [record]} for record in records]
    else:
        docs = [event]
    for doc in docs:
        inner = doc.get("Records")
        record = inner[0] if isinstance(inner, list) and inner else None
        message_id = record.get("messageId") if isinstance(record, Mapping) else None
        record_id = message_id if sqs else None
        try:
            items = list(parse_notification(doc))
        except MalformedMessage as exc:
            log(_log, logging.ERROR, "malformed-record", error=str(exc), message_id=message_id)
            yield record_id, SKIP_MALFORMED
            continue
        for item in items:
            if isinstance(item, ImageRef | Removal):
                yield record_id, item
            else:
                log(_log, logging.INFO, "skipped", reason=item.reason, key=item.key)
                yield record_id, item.reason


def _merge(known: tuple[str, ...], more: tuple[str, ...]) -> tuple[str, ...]:
    return known + tuple(i for i in more if i not in known)
