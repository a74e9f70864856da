"""Deleted images against moto: their feature files go only when the image is really gone.

The events come as the upload function gets them, EventBridge ``Object Deleted`` events in SQS
records, and as S3 notifications. moto differs from AWS where it matters here in one way that
the tests work around: it never redelivers a message, so "the record comes back" is read off
``batchItemFailures`` and the delivery is then repeated by hand.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError

from bottleneck_contract.locations import S3Location
from bottleneck_contract.messages import parse_body
from producer_lambda.handler import RemovalError, handle
from producer_lambda.settings import Settings
from tests.factories import (
    eventbridge_s3_event,
    s3_delete_record,
    s3_event,
    s3_record,
    sns_envelope,
    sqs_event,
)
from tests.fakes import put_feature, put_image
from tests.moto_batch import REGION

IMAGES = "images"
FEATS = "feats"
OUTPUT = S3Location(FEATS, "resnet50/")
NO_DELETES = {
    "deleted": 0,
    "tombstoned": 0,
    "source-exists": 0,
    "already-gone": 0,
    "features-changed": 0,
    "failed": 0,
}


def deleted(
    key: str,
    *,
    reason: str = "DeleteObject",
    deletion_type: str = "Permanently Deleted",
    bucket: str = IMAGES,
) -> dict[str, Any]:
    """An EventBridge ``Object Deleted`` event as S3 sends it."""
    event = eventbridge_s3_event(bucket, key, detail_type="Object Deleted", version_id=None)
    event["detail"].update({"reason": reason, "deletion-type": deletion_type})
    return event


def created(key: str, etag: str) -> dict[str, Any]:
    """An EventBridge ``Object Created`` event."""
    return eventbridge_s3_event(IMAGES, key, etag=etag, size=10, version_id=None)


@pytest.fixture
def s3(aws: None) -> Any:
    """moto S3 with the image and feature buckets."""
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket=IMAGES)
    client.create_bucket(Bucket=FEATS)
    return client


@pytest.fixture
def settings(queue_url: str) -> Settings:
    """The upload function's settings: images under uploads/, features in another bucket."""
    return Settings(queue_url=queue_url, output=OUTPUT, input_prefix="uploads/")


@pytest.fixture
def s3_calls(s3: Any) -> Counter[str]:
    """S3 operations the moto client makes, by name."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    s3.meta.events.register("before-call.s3", count)
    return calls


def feature_exists(s3: Any, source_key: str) -> bool:
    key = OUTPUT.feature_key(source_key)
    listed = s3.list_objects_v2(Bucket=FEATS, Prefix=key).get("Contents", [])
    return any(item["Key"] == key for item in listed)


def queued(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while got := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [json.loads(m["Body"]) for m in got]
    return bodies


def test_an_upload_then_a_delete_leaves_no_feature_file(
    settings: Settings, s3: Any, sqs: Any, queue_url: str
) -> None:
    # GIVEN an uploaded image, enqueued by the function, and its features written by a consumer
    etag = put_image(s3, "uploads/cat 1.jpg")
    first = handle(
        sqs_event(created("uploads/cat 1.jpg", etag)), settings, sqs=sqs, s3=s3, batch=None
    )
    assert first["enqueued"] == 1
    assert [b["key"] for b in queued(sqs, queue_url)] == ["uploads/cat 1.jpg"]
    put_feature(s3, OUTPUT.prefix, "uploads/cat 1.jpg", etag=etag)
    # WHEN the image is deleted and its event handled
    s3.delete_object(Bucket=IMAGES, Key="uploads/cat 1.jpg")
    summary = handle(sqs_event(deleted("uploads/cat 1.jpg")), settings, sqs=sqs, s3=s3, batch=None)
    # THEN the feature file is gone, nothing was enqueued, and the summary says so
    assert not feature_exists(s3, "uploads/cat 1.jpg")
    assert summary["deletes"] == NO_DELETES | {"deleted": 1}
    assert summary["enqueued"] == 0
    assert summary["batchItemFailures"] == []
    assert queued(sqs, queue_url) == []


@pytest.mark.parametrize("order", ["delete-first", "create-first"])
def test_a_delete_then_a_reupload_keeps_the_new_features_whatever_the_order(
    order: str, settings: Settings, s3: Any, sqs: Any, queue_url: str
) -> None:
    # GIVEN an image with features, deleted, then uploaded again with new bytes, and the new
    # image's features already written, all before the delete event is handled
    old = put_image(s3, "uploads/a.jpg", b"old bytes")
    put_feature(s3, OUTPUT.prefix, "uploads/a.jpg", etag=old)
    s3.delete_object(Bucket=IMAGES, Key="uploads/a.jpg")
    new = put_image(s3, "uploads/a.jpg", b"new bytes")
    put_feature(s3, OUTPUT.prefix, "uploads/a.jpg", etag=new)
    events = [deleted("uploads/a.jpg"), created("uploads/a.jpg", new)]
    if order == "create-first":
        events.reverse()
    # WHEN both events arrive in one batch, in either order
    summary = handle(sqs_event(*events), settings, sqs=sqs, s3=s3, batch=None)
    # THEN the new image's features stay, and the upload is enqueued (the consumer finds them
    # current and writes nothing)
    head = s3.head_object(Bucket=FEATS, Key=OUTPUT.feature_key("uploads/a.jpg"))
    assert head["Metadata"]["source-etag"] == new
    assert summary["deletes"] == NO_DELETES | {"source-exists": 1}
    assert [b["key"] for b in queued(sqs, queue_url)] == ["uploads/a.jpg"]


def test_a_delete_handled_before_the_reupload_happens_is_followed_by_new_work(
    settings: Settings, s3: Any, sqs: Any, queue_url: str
) -> None:
    # GIVEN an image with features, deleted, and its delete event handled at once
    old = put_image(s3, "uploads/a.jpg", b"old bytes")
    put_feature(s3, OUTPUT.prefix, "uploads/a.jpg", etag=old)
    s3.delete_object(Bucket=IMAGES, Key="uploads/a.jpg")
    gone = handle(sqs_event(deleted("uploads/a.jpg")), settings, sqs=sqs, s3=s3, batch=None)
    assert gone["deletes"]["deleted"] == 1
    # WHEN the key is uploaded again afterwards
    new = put_image(s3, "uploads/a.jpg", b"new bytes")
    handle(sqs_event(created("uploads/a.jpg", new)), settings, sqs=sqs, s3=s3, batch=None)
    # THEN the new image is work, with its own ETag
    assert queued(sqs, queue_url) == [
        {"bucket": IMAGES, "key": "uploads/a.jpg", "etag": new, "size": 10}
    ]


def test_features_written_again_during_the_check_are_kept(
    settings: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN an image deleted with features, and a re-upload whose features land after the
    # function looked at the feature file but before it deletes it
    old = put_image(s3, "uploads/a.jpg", b"old")
    put_feature(s3, OUTPUT.prefix, "uploads/a.jpg", etag=old)
    s3.delete_object(Bucket=IMAGES, Key="uploads/a.jpg")

    class ConsumerInBetween:
        """The moto client; the source's HEAD answers 404, and meanwhile new features land."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def head_object(self, **kwargs: Any) -> Any:
            if kwargs["Bucket"] == IMAGES:
                new = np.ones(4, np.float32)  # another image's numbers: another ETag
                put_feature(s3, OUTPUT.prefix, "uploads/a.jpg", etag="new", array=new)
            return self.real.head_object(**kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    # WHEN the delete event is handled
    racing: Any = ConsumerInBetween(s3)
    summary = handle(sqs_event(deleted("uploads/a.jpg")), settings, sqs=sqs, s3=racing, batch=None)
    # THEN the conditional delete did not match the new file, and it stays
    assert summary["deletes"] == NO_DELETES | {"features-changed": 1}
    head = s3.head_object(Bucket=FEATS, Key=OUTPUT.feature_key("uploads/a.jpg"))
    assert head["Metadata"]["source-etag"] == "new"


def test_a_delete_of_an_image_that_never_had_features_is_a_no_op(
    settings: Settings, s3: Any, sqs: Any, queue_url: str, s3_calls: Counter[str]
) -> None:
    # GIVEN a versioned feature bucket, and an image deleted before any consumer saw it
    s3.put_bucket_versioning(Bucket=FEATS, VersioningConfiguration={"Status": "Enabled"})
    put_image(s3, "uploads/never.jpg")
    s3.delete_object(Bucket=IMAGES, Key="uploads/never.jpg")
    s3_calls.clear()
    # WHEN its delete event is handled
    summary = handle(sqs_event(deleted("uploads/never.jpg")), settings, sqs=sqs, s3=s3, batch=None)
    # THEN one look at the feature file settles it (and one listing, per invocation, says the
    # output holds no shards): nothing deleted, nothing enqueued, and no delete marker left
    # behind in the versioned bucket
    assert summary["deletes"] == NO_DELETES | {"already-gone": 1}
    assert (summary["enqueued"], summary["batchItemFailures"]) == (0, [])
    assert s3_calls == Counter({"HeadObject": 1, "ListObjectsV2": 1})
    assert queued(sqs, queue_url) == []
    assert "DeleteMarkers" not in s3.list_object_versions(Bucket=FEATS)


def test_a_second_delete_event_is_a_no_op(settings: Settings, s3: Any, sqs: Any) -> None:
    # GIVEN an image with features, deleted
    etag = put_image(s3, "uploads/twice.jpg")
    put_feature(s3, OUTPUT.prefix, "uploads/twice.jpg", etag=etag)
    s3.delete_object(Bucket=IMAGES, Key="uploads/twice.jpg")
    event = sqs_event(deleted("uploads/twice.jpg"))
    # WHEN its event is handled twice (SQS delivers at least once)
    first = handle(event, settings, sqs=sqs, s3=s3, batch=None)
    second = handle(event, settings, sqs=sqs, s3=s3, batch=None)
    # THEN the first deleted the features, the second found them already gone
    assert first["deletes"] == NO_DELETES | {"deleted": 1}
    assert second["deletes"] == NO_DELETES | {"already-gone": 1}
    assert not feature_exists(s3, "uploads/twice.jpg")


class Refusing:
    """The moto client, with chosen calls failing as AWS would fail them.

    ``failures``: (operation, bucket) -> how many calls fail with ``error`` before the real
    client answers.
    """

    def __init__(self, real: Any, failures: dict[tuple[str, str], int], error: ClientError):
        self.real = real
        self.failures = dict(failures)
        self.error = error
        self.only_key: str | None = None  # fail calls for this key only, if set

    def _maybe_fail(self, operation: str, bucket: str, key: str) -> None:
        if self.only_key is not None and self.only_key not in key:
            return
        if self.failures.get((operation, bucket), 0) > 0:
            self.failures[(operation, bucket)] -= 1
            raise self.error

    def head_object(self, **kwargs: Any) -> Any:
        self._maybe_fail("head_object", kwargs["Bucket"], kwargs["Key"])
        return self.real.head_object(**kwargs)

    def delete_object(self, **kwargs: Any) -> Any:
        self._maybe_fail("delete_object", kwargs["Bucket"], kwargs["Key"])
        return self.real.delete_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _error(status: int, code: str, operation: str) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


def test_a_403_on_the_image_is_not_read_as_gone(settings: Settings, s3: Any, sqs: Any) -> None:
    # GIVEN two deleted images with features, and a role that may not tell a missing key from a
    # forbidden one for the first (S3 answers 403 for both without s3:ListBucket)
    for key in ("uploads/secret.jpg", "uploads/plain.jpg"):
        put_feature(s3, OUTPUT.prefix, key, etag="e")
    forbidden = Refusing(s3, {("head_object", IMAGES): 1}, _error(403, "403", "HeadObject"))
    forbidden.only_key = "uploads/secret.jpg"
    event = sqs_event(deleted("uploads/secret.jpg"), deleted("uploads/plain.jpg"))
    # WHEN the batch is handled
    summary = handle(event, settings, sqs=sqs, s3=forbidden, batch=None)  # type: ignore[arg-type]
    # THEN the 403 is a failure: its record alone goes back to SQS, and its features stay
    assert summary["deletes"] == NO_DELETES | {"deleted": 1, "failed": 1}
    assert summary["batchItemFailures"] == [{"itemIdentifier": event["Records"][0]["messageId"]}]
    assert feature_exists(s3, "uploads/secret.jpg")
    assert not feature_exists(s3, "uploads/plain.jpg")


@pytest.mark.parametrize("wrap", [sqs_event, lambda event: event], ids=["sqs-batch", "direct"])
def test_a_delete_that_fails_alone_is_raised(
    wrap: Callable[[dict[str, Any]], dict[str, Any]], settings: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN one delete event whose image answers 403, as the only record of a batch or as an
    # EventBridge event invoking the function directly (no batch to report items of)
    put_feature(s3, OUTPUT.prefix, "uploads/secret.jpg", etag="e")
    forbidden = Refusing(s3, {("head_object", IMAGES): 99}, _error(403, "403", "HeadObject"))
    # WHEN it is handled THEN the invocation fails (Lambda delivers the event again), and the
    # features are still there
    with pytest.raises(RemovalError, match=r"1 removals failed \(first: .*secret.jpg: 403\)"):
        handle(wrap(deleted("uploads/secret.jpg")), settings, sqs=sqs, s3=forbidden, batch=None)  # type: ignore[arg-type]
    assert feature_exists(s3, "uploads/secret.jpg")


def test_a_failed_removal_sends_back_its_record_only_and_succeeds_when_redelivered(
    settings: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN two deleted images with features, and S3 failing the first feature delete with a
    # transient error that outlived botocore's retries
    for key in ("uploads/a.jpg", "uploads/b.jpg"):
        put_feature(s3, OUTPUT.prefix, key, etag="e")
    flaky = Refusing(s3, {("delete_object", FEATS): 1}, _error(503, "SlowDown", "DeleteObject"))
    event = sqs_event(deleted("uploads/a.jpg"), deleted("uploads/b.jpg"))
    ids = [record["messageId"] for record in event["Records"]]
    # WHEN the batch is handled (removals run in parallel: either may meet the failure)
    summary = handle(event, settings, sqs=sqs, s3=flaky, batch=None)  # type: ignore[arg-type]
    # THEN exactly one record comes back, and its image's features are still there
    assert summary["deletes"] == NO_DELETES | {"deleted": 1, "failed": 1}
    (failure,) = summary["batchItemFailures"]
    index = ids.index(failure["itemIdentifier"])
    key = ["uploads/a.jpg", "uploads/b.jpg"][index]
    assert feature_exists(s3, key)
    # WHEN SQS delivers that record again
    again = handle({"Records": [event["Records"][index]]}, settings, sqs=sqs, s3=flaky, batch=None)  # type: ignore[arg-type]
    # THEN its features go too
    assert again["deletes"] == NO_DELETES | {"deleted": 1}
    assert again["batchItemFailures"] == []
    assert not feature_exists(s3, key)


def test_deletes_under_the_output_prefix_are_ignored(
    settings: Settings, s3: Any, sqs: Any, s3_calls: Counter[str]
) -> None:
    # GIVEN the Object Deleted event that removing a feature file makes (the loop guard's case),
    # and deletes outside the input prefix or without an image suffix
    key = put_feature(s3, OUTPUT.prefix, "uploads/x.jpg", etag="e")
    put_feature(s3, OUTPUT.prefix, "uploads/y.jpg", etag="e")
    events = [
        deleted(key, bucket=FEATS),
        deleted(OUTPUT.feature_key("uploads/y.jpg").removesuffix(".npy"), bucket=FEATS),
        deleted("elsewhere/x.jpg"),
        deleted("uploads/notes.txt"),
    ]
    s3_calls.clear()
    # WHEN they are handled
    summary = handle(sqs_event(*events), settings, sqs=sqs, s3=s3, batch=None)
    # THEN none costs an S3 request or touches a file
    assert summary["skipped"] == {"output-prefix": 2, "outside-input-prefix": 1, "suffix": 1}
    assert summary["deletes"] == NO_DELETES
    assert s3_calls == Counter()
    assert feature_exists(s3, "uploads/x.jpg") and feature_exists(s3, "uploads/y.jpg")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda: sqs_event(deleted("uploads/old.jpg", reason="Lifecycle Expiration")),
        lambda: sqs_event(
            deleted(
                "uploads/old.jpg",
                reason="Lifecycle Expiration",
                deletion_type="Delete Marker Created",
            )
        ),
        lambda: s3_event(
            s3_record(IMAGES, "uploads/old.jpg", event_name="LifecycleExpiration:Delete")
        ),
        lambda: s3_event(s3_delete_record(IMAGES, "uploads/old.jpg")),
        lambda: sqs_event(s3_event(s3_delete_record(IMAGES, "uploads/old.jpg"))),
        lambda: sqs_event(sns_envelope(s3_event(s3_delete_record(IMAGES, "uploads/old.jpg")))),
    ],
    ids=[
        "lifecycle",
        "lifecycle-marker",
        "s3-lifecycle",
        "s3-direct",
        "sqs-s3",
        "sqs-sns-s3",
    ],
)
def test_every_shape_of_deletion_removes_the_features(
    wrap: Callable[[], dict[str, Any]], settings: Settings, s3: Any, sqs: Any, queue_url: str
) -> None:
    etag = put_image(s3, "uploads/old.jpg")
    put_feature(s3, OUTPUT.prefix, "uploads/old.jpg", etag=etag)
    s3.delete_object(Bucket=IMAGES, Key="uploads/old.jpg")
    summary = handle(wrap(), settings, sqs=sqs, s3=s3, batch=None)
    assert summary["deletes"] == NO_DELETES | {"deleted": 1}
    assert not feature_exists(s3, "uploads/old.jpg")
    assert queued(sqs, queue_url) == []


def test_a_delete_marker_in_a_versioned_bucket_is_gone(
    settings: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN a versioned image bucket, an image with features, then a plain delete (a marker)
    s3.put_bucket_versioning(Bucket=IMAGES, VersioningConfiguration={"Status": "Enabled"})
    etag = put_image(s3, "uploads/v.jpg")
    put_feature(s3, OUTPUT.prefix, "uploads/v.jpg", etag=etag)
    s3.delete_object(Bucket=IMAGES, Key="uploads/v.jpg")
    assert s3.list_object_versions(Bucket=IMAGES)["DeleteMarkers"]
    event = sqs_event(deleted("uploads/v.jpg", deletion_type="Delete Marker Created"))
    # WHEN its event is handled THEN the HEAD's 404 counts as gone
    summary = handle(event, settings, sqs=sqs, s3=s3, batch=None)
    assert summary["deletes"] == NO_DELETES | {"deleted": 1}


def test_deleting_one_old_version_keeps_the_features_of_the_current_one(
    settings: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN a versioned image bucket with two versions of a key, and features of the current one
    s3.put_bucket_versioning(Bucket=IMAGES, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=IMAGES, Key="uploads/v.jpg", Body=b"one")
    first = s3.list_object_versions(Bucket=IMAGES)["Versions"][0]["VersionId"]
    etag = put_image(s3, "uploads/v.jpg", b"two")
    put_feature(s3, OUTPUT.prefix, "uploads/v.jpg", etag=etag)
    # WHEN the old version is deleted for good
    s3.delete_object(Bucket=IMAGES, Key="uploads/v.jpg", VersionId=first)
    summary = handle(sqs_event(deleted("uploads/v.jpg")), settings, sqs=sqs, s3=s3, batch=None)
    # THEN the image is still there, and so are its features
    assert summary["deletes"] == NO_DELETES | {"source-exists": 1}
    assert feature_exists(s3, "uploads/v.jpg")


@pytest.mark.parametrize(
    "body",
    [
        s3_event(s3_delete_record(IMAGES, "uploads/a.jpg")),
        s3_event(
            s3_record(IMAGES, "uploads/a.jpg", event_name="ObjectRemoved:DeleteMarkerCreated")
        ),
        s3_event(s3_record(IMAGES, "uploads/a.jpg", event_name="LifecycleExpiration:Delete")),
        sns_envelope(s3_event(s3_delete_record(IMAGES, "uploads/a.jpg"))),
        deleted("uploads/a.jpg"),
    ],
    ids=["s3", "s3-marker", "s3-lifecycle", "sns", "eventbridge"],
)
def test_the_consumer_still_reads_deletes_as_no_work(body: dict[str, Any]) -> None:
    # The consumer's one parser: a delete on the work queue is never an image to compute.
    assert parse_body(json.dumps(body)) == []


# ---------------------------------------------------------------------------- templated outputs

ROOT = S3Location(FEATS, "features/")
TEMPLATE = "s3://feats/features/{model}/{fingerprint}/"
FP_A, FP_B = "0123456789abcdef", "fedcba9876543210"
VERSIONS = (
    S3Location(FEATS, f"features/resnet50.a1_in1k/{FP_A}/"),
    S3Location(FEATS, f"features/test_vit/{FP_B}/"),
)


@pytest.fixture
def versioned(queue_url: str) -> Settings:
    """The stack's upload function: BOTTLENECK_OUTPUT with placeholders."""
    env = {
        "BOTTLENECK_QUEUE_URL": queue_url,
        "BOTTLENECK_OUTPUT": TEMPLATE,
        "BOTTLENECK_INPUT_PREFIX": "uploads/",
    }
    return Settings.from_env(env)


def in_version(s3: Any, version: S3Location, source_key: str) -> bool:
    key = version.feature_key(source_key)
    listed = s3.list_objects_v2(Bucket=FEATS, Prefix=key).get("Contents", [])
    return any(item["Key"] == key for item in listed)


def _env() -> dict[str, str]:
    return {"BOTTLENECK_QUEUE_URL": "https://q.example/1/work", "BOTTLENECK_OUTPUT": TEMPLATE}


def test_a_templated_output_is_read_as_its_root_and_its_versions(versioned: Settings) -> None:
    assert versioned.output == ROOT  # the loop guard: every version lies under it
    assert str(versioned.feature_output) == TEMPLATE
    assert (
        Settings.from_env({**_env(), "BOTTLENECK_OUTPUT": "s3://feats/v1"}).output_template is None
    )


def test_a_bad_template_is_one_line_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=r"^BOTTLENECK_OUTPUT has '\{modle\}'"):
        Settings.from_env({**_env(), "BOTTLENECK_OUTPUT": "s3://feats/f/{modle}/"})


def test_an_upload_then_a_delete_removes_the_file_of_every_version(
    versioned: Settings, s3: Any, sqs: Any, s3_calls: Counter[str]
) -> None:
    # GIVEN three images with features under two versions (two models), beside a flat output's
    # leftover folder and the consumer's own folder, all deleted
    keys = ["uploads/a.jpg", "uploads/b.jpg", "uploads/c.jpg"]
    for key in keys:
        etag = put_image(s3, key)
        for version in VERSIONS:
            put_feature(s3, version.prefix, key, etag=etag)
        s3.delete_object(Bucket=IMAGES, Key=key)
    put_feature(s3, "features/", "uploads/a.jpg", etag="flat")
    s3.put_object(Bucket=FEATS, Key=f"{VERSIONS[0].prefix}_bottleneck/running/m", Body=b"")
    s3_calls.clear()
    # WHEN the delete events arrive in one batch
    event = sqs_event(*(deleted(key) for key in keys))
    summary = handle(event, versioned, sqs=sqs, s3=s3, batch=None)
    calls = Counter(s3_calls)
    # THEN every version's file is gone, one outcome per file; the folders outside any version
    # are left alone
    assert summary["deletes"] == NO_DELETES | {"deleted": 6}
    assert summary["batchItemFailures"] == []
    assert not any(in_version(s3, v, key) for v in VERSIONS for key in keys)
    assert in_version(s3, ROOT, "uploads/a.jpg")
    # AND the versions were listed once for the batch: the root, then each folder in it (two
    # models and the leftover uploads/), and each version's shards/ once (none there); per image
    # a HEAD per version, one HEAD of the image, a DELETE per file
    assert calls == Counter(
        {"ListObjectsV2": 1 + 3 + 2, "HeadObject": 3 * (2 + 1), "DeleteObject": 3 * 2}
    )


def test_a_delete_then_a_reupload_keeps_the_files_of_every_version(
    versioned: Settings, s3: Any, sqs: Any
) -> None:
    # GIVEN an image deleted and uploaded again, with both versions' features of the new image
    # written before the delete event is handled
    old = put_image(s3, "uploads/a.jpg", b"old bytes")
    s3.delete_object(Bucket=IMAGES, Key="uploads/a.jpg")
    new = put_image(s3, "uploads/a.jpg", b"new bytes")
    for version in VERSIONS:
        put_feature(s3, version.prefix, "uploads/a.jpg", etag=new)
    assert old != new
    # WHEN the delete event comes
    summary = handle(sqs_event(deleted("uploads/a.jpg")), versioned, sqs=sqs, s3=s3, batch=None)
    # THEN the image is there again: both files stay
    assert summary["deletes"] == NO_DELETES | {"source-exists": 2}
    assert all(in_version(s3, v, "uploads/a.jpg") for v in VERSIONS)


def test_a_version_without_the_file_and_a_root_without_versions(
    versioned: Settings, s3: Any, sqs: Any, s3_calls: Counter[str]
) -> None:
    # GIVEN a deleted image whose features exist in one of two versions only
    put_feature(s3, VERSIONS[0].prefix, "uploads/a.jpg", etag="e")
    put_feature(s3, VERSIONS[1].prefix, "uploads/other.jpg", etag="e")
    summary = handle(sqs_event(deleted("uploads/a.jpg")), versioned, sqs=sqs, s3=s3, batch=None)
    # THEN that one goes, and the other version counts as already gone
    assert summary["deletes"] == NO_DELETES | {"deleted": 1, "already-gone": 1}
    assert not in_version(s3, VERSIONS[0], "uploads/a.jpg")
    # GIVEN no version at all under the root
    for version in VERSIONS:
        s3.delete_object(Bucket=FEATS, Key=version.feature_key("uploads/other.jpg"))
    s3_calls.clear()
    # WHEN a delete comes THEN the root's listing settles it: one outcome, no HEAD
    summary = handle(sqs_event(deleted("uploads/x.jpg")), versioned, sqs=sqs, s3=s3, batch=None)
    assert summary["deletes"] == NO_DELETES | {"already-gone": 1}
    assert s3_calls == Counter({"ListObjectsV2": 1})


def test_a_failed_listing_sends_every_delete_back(versioned: Settings, s3: Any, sqs: Any) -> None:
    # GIVEN a role that may not list the feature bucket
    put_feature(s3, VERSIONS[0].prefix, "uploads/a.jpg", etag="e")

    class NoList:
        def __init__(self, real: Any) -> None:
            self.real = real

        def get_paginator(self, name: str) -> Any:
            raise _error(403, "AccessDenied", "ListObjectsV2")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    event = sqs_event(deleted("uploads/a.jpg"), deleted("uploads/b.jpg"))
    # WHEN the batch is handled THEN every record fails (raised: all of them) and nothing goes
    with pytest.raises(RemovalError, match=r"2 removals failed .*AccessDenied"):
        handle(event, versioned, sqs=sqs, s3=NoList(s3), batch=None)  # type: ignore[arg-type]
    assert in_version(s3, VERSIONS[0], "uploads/a.jpg")


def test_events_under_any_version_are_ignored(
    versioned: Settings, s3: Any, sqs: Any, s3_calls: Counter[str]
) -> None:
    # GIVEN the delete event of a feature file in a version (what the removal itself causes)
    key = put_feature(s3, VERSIONS[1].prefix, "uploads/x.jpg", etag="e")
    s3_calls.clear()
    event = sqs_event(deleted(key.removesuffix(".npy"), bucket=FEATS))
    # WHEN it is handled THEN it is skipped without a request: the root is the loop guard
    summary = handle(event, versioned, sqs=sqs, s3=s3, batch=None)
    assert summary["skipped"] == {"output-prefix": 1}
    assert s3_calls == Counter()
