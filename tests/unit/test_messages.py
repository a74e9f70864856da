"""The work-queue wire format: every body kind the consumer and the Lambda accept, and the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bottleneck_contract.messages import (
    ImageRef,
    MalformedMessage,
    Removal,
    Skip,
    encode,
    parse_body,
    parse_notification,
)
from tests.factories import (
    eventbridge_s3_event,
    s3_delete_record,
    s3_event,
    s3_put_record,
    s3_record,
    s3_test_event,
    s3_url_key,
    scheduled_event,
    sns_envelope,
    sns_lambda_event,
    sqs_event,
)

AWKWARD_KEYS = [
    "photos/cat 1.jpg",
    "photos/c++ 2024+final.png",
    "photos/été/café ☕.jpeg",
    "photos/100%.jpg",
    "photos/a=b&c;d:e.jpg",
    "写真/猫.webp",
]


def test_encode_writes_the_real_key_and_omits_missing_fields() -> None:
    # GIVEN an image with a key that URL-encoding would change
    ref = ImageRef("images", "photos/cat 1+2é.jpg")
    # WHEN it is encoded
    body = encode(ref)
    # THEN the key travels as is, and unset optional fields are left out
    assert json.loads(body) == {"bucket": "images", "key": "photos/cat 1+2é.jpg"}


def test_encode_then_parse_round_trips_every_field() -> None:
    ref = ImageRef("images", "a/b c+d.jpg", etag="abc123", version_id="v1", size=0)
    assert parse_body(encode(ref)) == [ref]


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_s3_notification_keys_are_url_decoded(key: str) -> None:
    # GIVEN an S3 notification whose key S3 has form-encoded
    record = s3_put_record("images", key, size=42, etag="e1")
    assert record["s3"]["object"]["key"] == s3_url_key(key) != key  # really encoded
    body = json.dumps(s3_event(record))
    # WHEN the body is parsed
    refs = parse_body(body)
    # THEN the real key comes back, with size and ETag
    assert refs == [ImageRef("images", key, etag="e1", size=42)]


def test_a_literal_plus_and_a_space_are_told_apart() -> None:
    body = json.dumps(s3_event(s3_put_record("b", "a+b c.jpg")))
    assert "a%2Bb+c.jpg" in body
    assert [r.key for r in parse_body(body)] == ["a+b c.jpg"]


def test_version_id_and_etag_quotes() -> None:
    record = s3_put_record("b", "k.jpg", etag='"quoted"', version_id="3HL4kqtJlcpXroDTDmJ")
    [ref] = parse_body(json.dumps(s3_event(record)))
    assert ref.etag == "quoted"
    assert ref.version_id == "3HL4kqtJlcpXroDTDmJ"


def test_every_record_of_a_notification_is_read_and_deletes_are_removals() -> None:
    # GIVEN a notification with two puts and a delete
    doc = s3_event(
        s3_put_record("b", "one.jpg"),
        s3_delete_record("b", "gone 1+1.jpg"),
        s3_put_record("b", "two.jpg"),
    )
    # WHEN it is parsed record by record
    items = list(parse_notification(doc))
    # THEN the delete is a Removal (for the producer) with its real key, the puts are images
    assert [type(i).__name__ for i in items] == ["ImageRef", "Removal", "ImageRef"]
    assert items[1] == Removal("b", "gone 1+1.jpg", event="ObjectRemoved:Delete")
    # AND the consumer's reading of the same body is the two images only
    assert [r.key for r in parse_body(json.dumps(doc))] == ["one.jpg", "two.jpg"]


@pytest.mark.parametrize(
    "event_name",
    [
        "ObjectRemoved:Delete",
        "ObjectRemoved:DeleteMarkerCreated",
        "LifecycleExpiration:Delete",
        "LifecycleExpiration:DeleteMarkerCreated",
    ],
)
def test_every_kind_of_deletion_is_a_removal(event_name: str) -> None:
    record = s3_record("b", "k.jpg", event_name=event_name, version_id="v9")
    assert list(parse_notification(s3_event(record))) == [
        Removal("b", "k.jpg", version_id="v9", event=event_name)
    ]


def test_removals_inside_every_envelope() -> None:
    # GIVEN the same delete direct, in an SNS envelope, in an SQS record and as an SNS record
    delete = s3_event(s3_delete_record("b", "a b.jpg"))
    wrapped = [
        delete,
        sns_envelope(delete),
        sqs_event(delete),
        sqs_event(sns_envelope(delete)),
        sns_lambda_event(delete),
    ]
    # WHEN each is parsed THEN each gives the one removal
    for doc in wrapped:
        assert list(parse_notification(doc)) == [
            Removal("b", "a b.jpg", event="ObjectRemoved:Delete")
        ]


def test_the_consumer_still_reads_a_delete_as_no_work_even_without_a_bucket_name() -> None:
    # The consumer's path never asks for what only a Removal needs: a delete record that lacks
    # its bucket name was ignored before deletes were read, and still is.
    record = s3_delete_record("b", "k.jpg")
    record["s3"]["bucket"].pop("name")
    assert parse_body(json.dumps(s3_event(record))) == []
    with pytest.raises(MalformedMessage, match=r"s3\.bucket\.name"):
        list(parse_notification(s3_event(record)))


@pytest.mark.parametrize(
    "event_name", ["ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy",
                   "ObjectCreated:CompleteMultipartUpload"],
)  # fmt: skip
def test_every_object_created_event_is_work(event_name: str) -> None:
    refs = parse_body(json.dumps(s3_event(s3_record("b", "k.jpg", event_name=event_name))))
    assert [r.key for r in refs] == ["k.jpg"]


@pytest.mark.parametrize(
    "event_name", ["ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated",
                   "ObjectRestore:Completed", "ObjectTagging:Put"],
)  # fmt: skip
def test_other_events_carry_no_work(event_name: str) -> None:
    assert parse_body(json.dumps(s3_event(s3_record("b", "k.jpg", event_name=event_name)))) == []


def test_the_test_event_carries_no_work() -> None:
    assert parse_body(json.dumps(s3_test_event())) == []
    assert list(parse_notification(s3_test_event())) == [Skip("test-event")]


def test_sns_envelope_around_a_notification() -> None:
    body = json.dumps(sns_envelope(s3_event(s3_put_record("b", "x y.png", size=7, etag="e"))))
    assert parse_body(body) == [ImageRef("b", "x y.png", etag="e", size=7)]


def test_sns_envelope_around_the_test_event() -> None:
    assert parse_body(json.dumps(sns_envelope(s3_test_event()))) == []


def test_sns_lambda_record() -> None:
    event = sns_lambda_event(s3_event(s3_put_record("b", "über.jpg")))
    [ref] = list(parse_notification(event))
    assert isinstance(ref, ImageRef)
    assert ref.key == "über.jpg"


def test_sqs_lambda_records_with_every_body_kind() -> None:
    # GIVEN an SQS batch holding a notification, an SNS envelope, the project's body and a test
    event = sqs_event(
        s3_event(s3_put_record("b", "1.jpg")),
        sns_envelope(s3_event(s3_put_record("b", "2 2.jpg"))),
        encode(ImageRef("b", "3+3.jpg")),
        s3_test_event(),
    )
    # WHEN it is parsed
    items = list(parse_notification(event))
    # THEN each record gives what its body names
    assert [i.key for i in items if isinstance(i, ImageRef)] == ["1.jpg", "2 2.jpg", "3+3.jpg"]
    assert items[-1] == Skip("test-event")


def test_eventbridge_object_created() -> None:
    event = eventbridge_s3_event("b", "dir/a b+c.jpg", size=5, etag="e", version_id="v")
    assert list(parse_notification(event)) == [
        ImageRef("b", "dir/a b+c.jpg", etag="e", version_id="v", size=5)
    ]
    assert parse_body(json.dumps(event)) == [ImageRef("b", "dir/a b+c.jpg", "e", "v", 5)]


def test_eventbridge_object_deleted_is_a_removal_and_foreign_events_are_skipped() -> None:
    deleted = eventbridge_s3_event("b", "k 1.jpg", detail_type="Object Deleted", version_id=None)
    deleted["detail"].update({"reason": "DeleteObject", "deletion-type": "Permanently Deleted"})
    assert list(parse_notification(deleted)) == [
        Removal("b", "k 1.jpg", event="DeleteObject: Permanently Deleted")
    ]
    assert list(parse_notification(scheduled_event())) == [Skip("event Scheduled Event")]
    tagged = eventbridge_s3_event("b", "k.jpg", detail_type="Object Tags Added")
    assert list(parse_notification(tagged)) == [Skip("event Object Tags Added", "k.jpg")]


def test_a_lifecycle_expiration_is_a_removal() -> None:
    # GIVEN what EventBridge sends when a lifecycle rule expires an object in a versioned bucket
    expired = eventbridge_s3_event("b", "k.jpg", detail_type="Object Deleted", version_id="v2")
    expired["detail"].update(
        {"reason": "Lifecycle Expiration", "deletion-type": "Delete Marker Created"}
    )
    # THEN it is a removal like any other, and never work for the consumer
    assert list(parse_notification(expired)) == [
        Removal("b", "k.jpg", version_id="v2", event="Lifecycle Expiration: Delete Marker Created")
    ]
    assert parse_body(json.dumps(expired)) == []


def _s3_body(**changes: Any) -> str:
    record = s3_put_record("b", "k.jpg")
    for path, value in changes.items():
        target: Any = record
        *parents, leaf = path.split("__")
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return json.dumps(s3_event(record))


_DELETE = object()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "JSON list"),
        ('"a string"', "JSON str"),
        ("null", "JSON NoneType"),
        ("{}", "no 'Records'"),
        ('{"bucket": "b"}', "no 'Records'"),
        ('{"bucket": "b", "key": ""}', "'key'"),
        ('{"bucket": "b", "key": 7}', "'key'"),
        ('{"bucket": 1, "key": "k"}', "'bucket'"),
        ('{"bucket": "b", "key": "k", "size": -1}', "'size'"),
        ('{"bucket": "b", "key": "k", "size": "12"}', "'size'"),
        ('{"bucket": "b", "key": "k", "size": true}', "'size'"),
        ('{"bucket": "b", "key": "k", "etag": 5}', "'etag'"),
        ('{"Records": "x"}', "no 'Records' list"),
        ('{"Records": [1]}', "not an object"),
        ('{"Records": [{"eventSource": "aws:dynamodb"}]}', "aws:dynamodb"),
        ('{"Records": [{"eventSource": "aws:s3"}]}', "'eventName'"),
        ('{"Type": "Notification", "Message": "{not json"}', "SNS Message is not JSON"),
        ('{"Type": "Notification", "Message": 5}', "SNS Message is not a string"),
        ('{"Type": "Notification", "Message": "[]"}', "not a JSON object"),
        (_s3_body(s3__object=_DELETE), "'s3.object'"),
        (_s3_body(s3__object__key=_DELETE), "object key"),
        (_s3_body(s3__object__key=""), "object key"),
        (_s3_body(s3__bucket__name=None), "s3.bucket.name"),
        (_s3_body(s3__object__size="big"), "s3.object.size"),
        (_s3_body(eventName=None), "'eventName'"),
        (
            json.dumps({"source": "aws.s3", "detail-type": "Object Created", "detail": 3}),
            "without 'detail'",
        ),
        (
            json.dumps({"source": "aws.s3", "detail-type": "Object Created", "detail": {}}),
            "detail.object",
        ),
    ],
)
def test_malformed_bodies_raise_with_a_reason(body: str, reason: str) -> None:
    # WHEN a body fits none of the known shapes THEN MalformedMessage names what is wrong
    with pytest.raises(MalformedMessage, match=reason.replace("(", r"\(")):
        parse_body(body)


def test_a_malformed_sqs_record_body_is_malformed() -> None:
    event = {"Records": [{"eventSource": "aws:sqs", "body": "not json"}]}
    with pytest.raises(MalformedMessage, match="SQS body is not JSON"):
        list(parse_notification(event))


def test_parse_notification_rejects_a_non_object() -> None:
    with pytest.raises(MalformedMessage, match="not an object"):
        list(parse_notification([]))  # type: ignore[arg-type]
