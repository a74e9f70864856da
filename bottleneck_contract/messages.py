"""The work-queue wire format and the S3 notification shapes that feed it.

This module is the one description of what travels on the queue. It is pure (no AWS calls) and
imports only the standard library, because it ships in the Lambda zip and is also imported by the
GPU consumer, which must read exactly what the producer writes.

Shapes understood:

* the project's own body: ``{"bucket": ..., "key": ..., "etag"?, "version_id"?, "size"?}``,
  with the real (not URL-encoded) key;
* an S3 event notification (``{"Records": [{"eventSource": "aws:s3", ...}]}``), keys URL-encoded;
* the same notification inside an SNS envelope (``{"Type": "Notification", "Message": "..."}``)
  or an SNS/SQS Lambda record;
* an EventBridge ``Object Created`` event from ``aws.s3`` (keys URL-encoded like notifications);
* ``s3:TestEvent``, which carries no work.

Deletes (``ObjectRemoved:*`` and ``LifecycleExpiration:*`` records, EventBridge ``Object Deleted``
events) are read by :func:`parse_notification` as a :class:`Removal`, a kind of its own: they are
the producer's business (it removes the feature file of an image that is really gone) and never
work for the consumer, whose :func:`parse_body` returns images only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

__all__ = [
    "ImageRef",
    "MalformedMessage",
    "Removal",
    "Skip",
    "encode",
    "parse_body",
    "parse_notification",
]


class MalformedMessage(ValueError):
    """A body that is not one of the shapes above; the reason is the exception's message."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One S3 object to compute features for; ``key`` is the real key, never URL-encoded."""

    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Removal:
    """An S3 object that a notification says was deleted (or expired); ``key`` is the real key.

    ``event`` names what happened, for logs: the S3 event name (``ObjectRemoved:Delete``,
    ``LifecycleExpiration:DeleteMarkerCreated``, ...) or EventBridge's ``reason`` and
    ``deletion-type``. Whether the object is really gone is for the reader to find out: a later
    upload of the same key may already have replaced it.
    """

    bucket: str
    key: str
    version_id: str | None = None
    event: str = ""


@dataclass(frozen=True, slots=True)
class Skip:
    """A record that carries no work, with a short stable reason (for summaries and logs)."""

    reason: str
    key: str | None = None


def encode(ref: ImageRef) -> str:
    """Serialise ``ref`` as the project's own body (compact JSON, optional fields omitted)."""
    body: dict[str, Any] = {"bucket": ref.bucket, "key": ref.key}
    if ref.etag:
        body["etag"] = ref.etag
    if ref.version_id:
        body["version_id"] = ref.version_id
    if ref.size is not None:
        body["size"] = ref.size
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def parse_body(body: str) -> list[ImageRef]:
    """Parse one work-queue message body into the images it names.

    Notification records that carry no work (deletes, the test event) yield nothing; a body that
    fits none of the known shapes raises :class:`MalformedMessage` naming what is wrong.
    """
    try:
        doc = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"body is JSON {type(doc).__name__}, not an object")
    if "Records" not in doc and "bucket" in doc and "key" in doc:
        return [_own_body(doc)]
    return [item for item in _notification(doc, removals=False) if isinstance(item, ImageRef)]


def parse_notification(doc: Mapping[str, Any]) -> Iterator[ImageRef | Removal | Skip]:
    """Yield an :class:`ImageRef`, a :class:`Removal` or a :class:`Skip` for every record.

    Accepts S3 notifications direct or wrapped in SNS (an SQS body, or a Lambda SNS record), SQS
    Lambda records whose bodies are any shape :func:`parse_body` reads, and EventBridge events.
    """
    return _notification(doc, removals=True)


def _notification(doc: Mapping[str, Any], removals: bool) -> Iterator[ImageRef | Removal | Skip]:
    # removals=False is the consumer's reading (parse_body), exactly as before deletes were read:
    # a delete record is a Skip, and none of the fields only a Removal needs is checked.
    if not isinstance(doc, Mapping):
        raise MalformedMessage(f"notification is {type(doc).__name__}, not an object")
    if doc.get("Event") == "s3:TestEvent":
        yield Skip("test-event")
        return
    if doc.get("Type") == "Notification" and "Message" in doc:
        yield from _notification(_json_object(doc["Message"], "SNS Message"), removals)
        return
    if "detail-type" in doc:
        yield from _eventbridge(doc, removals)
        return
    if "bucket" in doc and "key" in doc and "Records" not in doc:
        yield _own_body(doc)
        return
    records = doc.get("Records")
    if not isinstance(records, list):
        raise MalformedMessage("no 'Records' list, no 'bucket'/'key' and no known envelope")
    for record in records:
        yield from _record(record, removals)


def _record(record: Any, removals: bool) -> Iterator[ImageRef | Removal | Skip]:
    if not isinstance(record, Mapping):
        raise MalformedMessage("a record is not an object")
    source = record.get("eventSource") or record.get("EventSource")
    if source == "aws:s3":
        yield _s3_record(record, removals)
    elif source == "aws:sns":
        sns = record.get("Sns")
        if not isinstance(sns, Mapping):
            raise MalformedMessage("SNS record without 'Sns'")
        yield from _notification(_json_object(sns.get("Message"), "SNS Message"), removals)
    elif source == "aws:sqs":
        yield from _notification(_json_object(record.get("body"), "SQS body"), removals)
    else:
        raise MalformedMessage(f"record eventSource {source!r} is not aws:s3, aws:sns or aws:sqs")


# S3 notification event names of a deletion: a DeleteObject(s) call, and lifecycle expirations,
# both either permanent or a delete marker. (ObjectRestore:Delete is a restored copy of an
# archived object expiring: the object itself is still there.)
_REMOVED_PREFIXES = ("ObjectRemoved:", "LifecycleExpiration:")


def _s3_record(record: Mapping[str, Any], removals: bool) -> ImageRef | Removal | Skip:
    event_name = record.get("eventName")
    s3 = record.get("s3")
    if not isinstance(event_name, str) or not isinstance(s3, Mapping):
        raise MalformedMessage("S3 record without 'eventName' or 's3'")
    obj = s3.get("object")
    bucket = s3.get("bucket")
    if not isinstance(obj, Mapping) or not isinstance(bucket, Mapping):
        raise MalformedMessage("S3 record without 's3.object' or 's3.bucket'")
    key = _url_key(obj.get("key"))
    if removals and event_name.startswith(_REMOVED_PREFIXES):
        return Removal(
            bucket=_text(bucket.get("name"), "s3.bucket.name"),
            key=key,
            version_id=_optional_text(obj.get("versionId"), "s3.object.versionId"),
            event=event_name,
        )
    if not event_name.startswith("ObjectCreated:"):
        return Skip(f"event {event_name}", key)
    return ImageRef(
        bucket=_text(bucket.get("name"), "s3.bucket.name"),
        key=key,
        etag=_optional_text(obj.get("eTag"), "s3.object.eTag"),
        version_id=_optional_text(obj.get("versionId"), "s3.object.versionId"),
        size=_optional_size(obj.get("size"), "s3.object.size"),
    )


def _eventbridge(doc: Mapping[str, Any], removals: bool) -> Iterator[ImageRef | Removal | Skip]:
    detail_type = doc.get("detail-type")
    if doc.get("source") != "aws.s3":
        yield Skip(f"event {detail_type}")
        return
    detail = doc.get("detail")
    if not isinstance(detail, Mapping):
        raise MalformedMessage("EventBridge S3 event without 'detail'")
    obj = detail.get("object")
    bucket = detail.get("bucket")
    if not isinstance(obj, Mapping) or not isinstance(bucket, Mapping):
        raise MalformedMessage("EventBridge S3 event without 'detail.object' or 'detail.bucket'")
    key = _url_key(obj.get("key"))
    if removals and detail_type == "Object Deleted":
        # reason: DeleteObject or Lifecycle Expiration; deletion-type: Permanently Deleted or
        # Delete Marker Created. Both pairs mean the same to the producer: look, then remove.
        what = [detail.get("reason"), detail.get("deletion-type")]
        yield Removal(
            bucket=_text(bucket.get("name"), "detail.bucket.name"),
            key=key,
            version_id=_optional_text(obj.get("version-id"), "detail.object.version-id"),
            event=": ".join(str(part) for part in what if part) or str(detail_type),
        )
        return
    if detail_type != "Object Created":
        yield Skip(f"event {detail_type}", key)
        return
    yield ImageRef(
        bucket=_text(bucket.get("name"), "detail.bucket.name"),
        key=key,
        etag=_optional_text(obj.get("etag"), "detail.object.etag"),
        version_id=_optional_text(obj.get("version-id"), "detail.object.version-id"),
        size=_optional_size(obj.get("size"), "detail.object.size"),
    )


def _own_body(doc: Mapping[str, Any]) -> ImageRef:
    return ImageRef(
        bucket=_text(doc.get("bucket"), "bucket"),
        key=_text(doc.get("key"), "key"),
        etag=_optional_text(doc.get("etag"), "etag"),
        version_id=_optional_text(doc.get("version_id"), "version_id"),
        size=_optional_size(doc.get("size"), "size"),
    )


def _url_key(value: Any) -> str:
    # S3 notifications form-encode keys: '+' is a space and a literal '+' arrives as '%2B'.
    return unquote_plus(_text(value, "object key"))


def _json_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} is not a string")
    try:
        doc = json.loads(value)
    except ValueError as exc:
        raise MalformedMessage(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"{what} is not a JSON object")
    return doc


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"field {field!r} must be a non-empty string")
    return value


def _optional_text(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"field {field!r} must be a string")
    return value.strip('"')


def _optional_size(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMessage(f"field {field!r} must be a non-negative integer")
    return value
