"""Every outcome of :func:`consumer.storage.write_feature`, through both object clients.

One table: what is in S3 before the write (no feature file, a current one, an out-of-date one, a
source re-uploaded or deleted since it was read or while it was written, a writer that keeps
winning, a file deleted under us, a create whose response was lost), and what the write must
report and leave behind.
Each row runs through obstore and through boto3, against a moto server over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import boto3
import pytest

from bottleneck_contract.messages import ImageRef
from consumer.errors import TransientError
from consumer.objects import Existing, Fetched, ObjectClient, SizeCallback
from consumer.objects.boto import BotoObjects
from consumer.objects.native import RETRY, NativeObjects
from consumer.storage import CONTENT_TYPE, WriteOutcome, write_feature
from tests.faults import Fault, Faulty, FaultyEndpoint

IMAGES, FEATS = "images", "feats"
SOURCE = ImageRef(IMAGES, "photos/cat.jpg")
KEY = "v1/photos/cat.jpg.npy"
FINGERPRINT = "fp-new"
BODY = b"new features"


def ours(source_etag: str) -> dict[str, str]:
    """The metadata our write carries."""
    return {"source-etag": source_etag, "fingerprint": FINGERPRINT, "model": "m"}


@dataclass
class World:
    """The buckets, and the source image's ETag as uploaded."""

    s3: Any
    source_etag: str
    versions_before: int = 0

    def put_feature(self, source_etag: str, fingerprint: str, body: bytes = b"old") -> None:
        meta = {"source-etag": source_etag, "fingerprint": fingerprint, "model": "m"}
        self.s3.put_object(Bucket=FEATS, Key=KEY, Body=body, Metadata=meta)

    def versions(self) -> int:
        listed = self.s3.list_object_versions(Bucket=FEATS, Prefix=KEY).get("Versions", [])
        return len(listed)


class Racing:
    """Another writer replaces the feature file just before each of our PUTs."""

    name = "racing"

    def __init__(self, inner: ObjectClient, world: World) -> None:
        self.inner = inner
        self.world = world
        self.rounds = 0

    def get(
        self, bucket: str, key: str, *, max_bytes: int, on_size: SizeCallback | None = None
    ) -> Fetched:
        return self.inner.get(bucket, key, max_bytes=max_bytes, on_size=on_size)

    def head(self, bucket: str, key: str) -> Existing | None:
        return self.inner.head(bucket, key)

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str,
        if_match: str | None = None,
    ) -> str:
        self.rounds += 1
        self.world.put_feature(
            self.world.source_etag, "fp-theirs", f"theirs {self.rounds}".encode()
        )
        return self.inner.put(
            bucket, key, body, metadata=metadata, content_type=content_type, if_match=if_match
        )

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        return self.inner.delete(bucket, key, if_match=if_match)

    def copy(self, bucket: str, source_key: str, key: str, **options: Any) -> None:
        self.inner.copy(bucket, source_key, key, **options)


class Vanishing(Racing):
    """The out-of-date feature file is deleted between our failed create and our HEAD."""

    def head(self, bucket: str, key: str) -> Existing | None:
        if key == KEY and self.rounds == 1:
            self.world.s3.delete_object(Bucket=FEATS, Key=KEY)
        return self.inner.head(bucket, key)

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str,
        if_match: str | None = None,
    ) -> str:
        self.rounds += 1
        return self.inner.put(
            bucket, key, body, metadata=metadata, content_type=content_type, if_match=if_match
        )


class DeletedInFlight(Vanishing):
    """The image is deleted after we read it, just before our PUT."""

    def head(self, bucket: str, key: str) -> Existing | None:
        return self.inner.head(bucket, key)

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str,
        if_match: str | None = None,
    ) -> str:
        self.world.s3.delete_object(Bucket=IMAGES, Key=SOURCE.key)
        return super().put(
            bucket, key, body, metadata=metadata, content_type=content_type, if_match=if_match
        )


class ReplacedBeforeOurDelete(DeletedInFlight):
    """...and, before we remove our file, another writer (the image uploaded again) replaces it."""

    def delete(self, bucket: str, key: str, *, if_match: str) -> bool:
        self.world.put_feature("etag-of-the-new-upload", FINGERPRINT, b"theirs")
        return self.inner.delete(bucket, key, if_match=if_match)


@dataclass(frozen=True)
class Case:
    """GIVEN ``arrange``, WHEN we write (having read ``read_etag`` of the source), THEN
    ``outcome`` (or ``raises``) and the feature file holds ``body_after``."""

    arrange: Callable[[World], None]
    outcome: WriteOutcome | None
    body_after: bytes | None
    new_versions: int
    overwrite: bool = False
    read_etag: str | None = None  # default: the source's current ETag
    wrap: Callable[[ObjectClient, World], ObjectClient] | None = None
    lost_put_response: bool = False
    raises: str | None = None
    orphan_check: bool = True


def nothing(world: World) -> None:
    return None


def current_file(world: World) -> None:
    world.put_feature(world.source_etag, FINGERPRINT)


def other_settings(world: World) -> None:
    world.put_feature(world.source_etag, "fp-old")


def older_source(world: World) -> None:
    world.put_feature("etag-of-an-older-upload", FINGERPRINT)


def reuploaded_since_read(world: World) -> None:
    # The file was written from the newest upload; we read an older one before it replaced it.
    world.put_feature(world.source_etag, FINGERPRINT, b"from the newest upload")


def source_deleted(world: World) -> None:
    world.put_feature("etag-of-an-older-upload", FINGERPRINT)
    world.s3.delete_object(Bucket=IMAGES, Key=SOURCE.key)


CASES: dict[str, Case] = {
    "written": Case(nothing, WriteOutcome.WRITTEN, BODY, 1),
    "exists": Case(current_file, WriteOutcome.EXISTS, b"old", 0),
    "exists-after-a-lost-create-response": Case(
        nothing, WriteOutcome.EXISTS, BODY, 1, lost_put_response=True
    ),
    "replaced-overwrite": Case(current_file, WriteOutcome.REPLACED, BODY, 1, overwrite=True),
    "replaced-new-settings": Case(other_settings, WriteOutcome.REPLACED, BODY, 1),
    "replaced-reuploaded-image": Case(older_source, WriteOutcome.REPLACED, BODY, 1),
    "superseded-reuploaded-since-read": Case(
        reuploaded_since_read,
        WriteOutcome.SUPERSEDED,
        b"from the newest upload",
        0,
        read_etag="etag-we-read-earlier",
    ),
    "superseded-source-deleted-no-orphan-check": Case(
        source_deleted,
        WriteOutcome.SUPERSEDED,
        b"old",
        0,
        read_etag="etag-we-read-earlier",
        orphan_check=False,
    ),
    "source-gone-out-of-date-file-removed": Case(
        source_deleted, WriteOutcome.SOURCE_GONE, None, 0, read_etag="etag-we-read-earlier"
    ),
    "source-gone-file-just-written-removed": Case(
        nothing, WriteOutcome.SOURCE_GONE, None, 1, wrap=DeletedInFlight
    ),
    "source-gone-no-orphan-check-keeps-the-file": Case(
        nothing, WriteOutcome.WRITTEN, BODY, 1, wrap=DeletedInFlight, orphan_check=False
    ),
    "source-gone-newer-file-kept": Case(
        nothing, WriteOutcome.SOURCE_GONE, b"theirs", 2, wrap=ReplacedBeforeOurDelete
    ),
    "written-after-the-file-vanished": Case(
        other_settings, WriteOutcome.WRITTEN, BODY, 1, wrap=Vanishing
    ),
    "conflict-writer-keeps-winning": Case(
        nothing, None, b"theirs 4", 4, wrap=Racing, raises="write-conflict"
    ),
}

IMPLEMENTATIONS = ("obstore", "boto3")


@pytest.fixture
def world(moto_server: str) -> World:
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in (IMAGES, FEATS):
        s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=FEATS, VersioningConfiguration={"Status": "Enabled"})
    etag = s3.put_object(Bucket=IMAGES, Key=SOURCE.key, Body=b"jpeg")["ETag"].strip('"')
    return World(s3, etag)


@pytest.fixture
def client_for(moto_server: str, world: World) -> Iterator[Callable[[str, bool], ObjectClient]]:
    """The implementation named, optionally losing the response of the first PUT it makes."""
    proxies: list[FaultyEndpoint] = []
    lost = {"put_object": Fault("closed", calls={1}, after=True)}

    def make(implementation: str, lose_first_put_response: bool) -> ObjectClient:
        if implementation == "boto3":
            s3 = Faulty(world.s3, lost) if lose_first_put_response else world.s3
            return BotoObjects(s3)
        endpoint = moto_server
        if lose_first_put_response:
            proxy = FaultyEndpoint(moto_server, lost).__enter__()
            proxies.append(proxy)
            endpoint = proxy.url
        fast: Any = {**RETRY, "backoff": {"init_backoff": timedelta(milliseconds=5)}}
        return NativeObjects(BotoObjects(world.s3), endpoint=endpoint, retry=fast)

    yield make
    for proxy in proxies:
        proxy.__exit__(None, None, None)


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_write_feature_outcomes(
    world: World,
    client_for: Callable[[str, bool], ObjectClient],
    implementation: str,
    case: Case,
) -> None:
    # GIVEN the feature bucket (versioned) and the source as the case arranges them
    case.arrange(world)
    before = world.versions()
    objects = client_for(implementation, case.lost_put_response)
    if case.wrap is not None:
        objects = case.wrap(objects, world)
    source_etag = case.read_etag or world.source_etag

    # WHEN the feature file is written
    def write() -> WriteOutcome:
        return write_feature(
            objects,
            bucket=FEATS,
            key=KEY,
            body=BODY,
            metadata=ours(source_etag),
            source=SOURCE,
            source_etag=source_etag,
            fingerprint=FINGERPRINT,
            overwrite=case.overwrite,
            orphan_check=case.orphan_check,
        )

    if case.raises is not None:
        with pytest.raises(TransientError) as raised:
            write()
        assert raised.value.error_code == case.raises
    else:
        assert write() == case.outcome

    # THEN the file holds what it should, with our metadata if we wrote it, and exactly the
    # expected number of new versions was written (every racing write included)
    if case.body_after is None:
        assert "Contents" not in world.s3.list_objects_v2(Bucket=FEATS, Prefix=KEY)
        assert world.versions() - before == case.new_versions
        return
    got = world.s3.get_object(Bucket=FEATS, Key=KEY)
    assert got["Body"].read() == case.body_after
    if case.body_after == BODY:
        assert got["Metadata"] == ours(source_etag)
        assert got["ContentType"] == CONTENT_TYPE
    assert world.versions() - before == case.new_versions
