"""Realistic AWS event factories for the producer's tests.

The shapes follow what AWS delivers (and what Powertools for AWS Lambda keeps as its event
fixtures): S3 event notifications version 2.1, the ``s3:TestEvent`` S3 sends when a notification
is configured, SNS envelopes as SQS bodies and as Lambda records, SQS Lambda records, EventBridge
``Object Created`` and scheduled events. Keys are URL-encoded the way S3 does it (form encoding:
a space becomes ``+``, a literal ``+`` becomes ``%2B``, non-ASCII becomes percent-encoded UTF-8,
``/`` stays), so every test that uses these factories exercises the decoding.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote_plus

ACCOUNT = "123456789012"
REGION = "us-east-1"
EVENT_TIME = "2024-05-01T12:00:00.000Z"


def s3_url_key(key: str) -> str:
    """A key as S3 writes it into a notification (form-encoded, '/' kept)."""
    return quote_plus(key, safe="/")


def _etag(key: str) -> str:
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


def s3_record(
    bucket: str,
    key: str,
    *,
    event_name: str = "ObjectCreated:Put",
    size: int = 1305107,
    etag: str | None = None,
    version_id: str | None = None,
    sequencer: str = "0C0F6F405D6ED209E1",
) -> dict[str, Any]:
    """One S3 notification record; delete records carry no size or eTag, as on AWS."""
    obj: dict[str, Any] = {"key": s3_url_key(key), "sequencer": sequencer}
    if event_name.startswith("ObjectCreated:"):
        obj["size"] = size
        obj["eTag"] = etag or _etag(key)
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": EVENT_TIME,
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAINPONIXQXHT3IKHL2"},
        "requestParameters": {"sourceIPAddress": "205.255.255.255"},
        "responseElements": {
            "x-amz-request-id": "D82B88E5F771F645",
            "x-amz-id-2": "vlR7PnpV2Ce81l0PRw6jlUpck7Jo5ZsQjryTjKlc5aLWGVHPZLj5NeC6qMa0emYBD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "828aa6fc-f7b5-4305-8584-487c791949c1",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3I5XTEXAMAI3E"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }


def s3_put_record(bucket: str, key: str, **kwargs: Any) -> dict[str, Any]:
    """An ``ObjectCreated:Put`` record."""
    return s3_record(bucket, key, event_name="ObjectCreated:Put", **kwargs)


def s3_delete_record(bucket: str, key: str) -> dict[str, Any]:
    """An ``ObjectRemoved:Delete`` record (no size, no eTag)."""
    return s3_record(bucket, key, event_name="ObjectRemoved:Delete")


def s3_event(*records: dict[str, Any]) -> dict[str, Any]:
    """An S3 event notification, as S3 invokes Lambda or writes to SQS."""
    return {"Records": list(records)}


def s3_test_event(bucket: str = "images") -> dict[str, Any]:
    """The ``s3:TestEvent`` S3 sends once when a notification destination is configured."""
    return {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": EVENT_TIME,
        "Bucket": bucket,
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }


def sns_envelope(message: dict[str, Any]) -> dict[str, Any]:
    """An SNS notification as an SQS body (raw message delivery off)."""
    return {
        "Type": "Notification",
        "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
        "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:image-uploads",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(message),
        "Timestamp": "2024-05-01T12:00:00.123Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQ",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


def sns_lambda_event(message: dict[str, Any]) -> dict[str, Any]:
    """An SNS topic invoking Lambda directly with ``message`` (one ``aws:sns`` record)."""
    envelope = sns_envelope(message)
    return {
        "Records": [
            {
                "EventVersion": "1.0",
                "EventSubscriptionArn": f"{envelope['TopicArn']}:2bcfbf39-05c3-41de-beaa",
                "EventSource": "aws:sns",
                "Sns": {
                    **{k: v for k, v in envelope.items() if not k.endswith("URL")},
                    "SigningCertUrl": envelope["SigningCertURL"],
                    "UnsubscribeUrl": envelope["UnsubscribeURL"],
                    "MessageAttributes": {},
                },
            }
        ]
    }


def sqs_record(body: str | dict[str, Any], message_id: str = "059f36b4") -> dict[str, Any]:
    """One SQS Lambda record carrying ``body`` (a dict is JSON-encoded)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return {
        "messageId": f"{message_id}-87a4-44ab-83d2-661975830a7d",
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
        "body": text,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1714564800000",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1714564800010",
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(text.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:uploads",
        "awsRegion": REGION,
    }


def sqs_event(*bodies: str | dict[str, Any]) -> dict[str, Any]:
    """An SQS-triggered Lambda event, one record per body."""
    return {"Records": [sqs_record(body, f"{i:08x}") for i, body in enumerate(bodies)]}


def eventbridge_s3_event(
    bucket: str,
    key: str,
    *,
    detail_type: str = "Object Created",
    size: int = 5,
    etag: str | None = None,
    version_id: str | None = "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
) -> dict[str, Any]:
    """An EventBridge event from S3 (``Object Created``, ``Object Deleted``, ...)."""
    obj: dict[str, Any] = {"key": s3_url_key(key), "sequencer": "617f08299329d189"}
    if detail_type == "Object Created":
        obj["size"] = size
        obj["etag"] = etag or _etag(key)
    if version_id is not None:
        obj["version-id"] = version_id
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": ACCOUNT,
        "time": "2024-05-01T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": obj,
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": ACCOUNT,
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject",
        },
    }


def scheduled_event(rule: str = "bottleneck-scaler") -> dict[str, Any]:
    """An EventBridge scheduled event (``rate(1 minute)`` and the like)."""
    return {
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": "2024-05-01T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{rule}"],
        "detail": {},
    }


class FakeContext:
    """The few attributes of a Lambda context object the handler reads."""

    function_name = "bottleneck-producer"
    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e812345678"

    def get_remaining_time_in_millis(self) -> int:
        """Plenty of time left."""
        return 300_000
