"""The object clients (obstore and boto3) against a moto server over HTTP: one contract.

GET into memory with a size cap, HEAD with user metadata, the create-only and If-Match PUTs,
keys that obstore's path rules cannot carry, and how S3's error answers, injected on the wire by
:class:`tests.faults.FaultyEndpoint`, come out of each client: what obstore retries (once, in
Rust, with :data:`consumer.objects.native.RETRY`) and what the consumer's error family makes of
what outlives the retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from consumer.errors import PermanentError, TransientError, classify
from consumer.objects import ConditionFailed, GetAbandoned, ObjectClient, open_objects
from consumer.objects.boto import BotoObjects
from consumer.objects.native import RETRY, NativeObjects, _credential_provider, native_key
from tests.faults import Fault, FaultyEndpoint

REGION = "us-east-1"
BUCKET = "objects"
META = {"source-key": "photos/cat%201.jpg", "fingerprint": "abc123", "shape": "2048"}
# The real policy's attempts, with short waits: these tests count requests, not seconds.
FAST: Any = {**RETRY, "backoff": {"init_backoff": timedelta(milliseconds=5), "base": 2}}


def boto_client(url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3(moto_server: str) -> Any:
    client = boto_client(moto_server)
    client.create_bucket(Bucket=BUCKET)
    return client


def make(kind: str, s3: Any) -> ObjectClient:
    return open_objects(kind, s3)


IMPLEMENTATIONS = ("obstore", "boto3")
# What each client raises for an S3 error answer that outlived its retries.
SETTLED = (PermanentError, TransientError, botocore.exceptions.ClientError)


@pytest.fixture(params=IMPLEMENTATIONS)
def objects(request: pytest.FixtureRequest, s3: Any) -> ObjectClient:
    return make(str(request.param), s3)


def test_open_objects_picks_the_implementation(s3: Any) -> None:
    # GIVEN obstore installed  WHEN each choice is opened  THEN auto means obstore
    assert open_objects("auto", s3).name == "obstore"
    assert open_objects("obstore", s3).name == "obstore"
    assert open_objects("boto3", s3).name == "boto3"


def test_get_returns_bytes_and_etag(objects: ObjectClient, s3: Any) -> None:
    # GIVEN an object of 100 KB
    data = bytes(range(256)) * 400
    etag = s3.put_object(Bucket=BUCKET, Key="photos/a.jpg", Body=data)["ETag"]

    # WHEN it is fetched
    fetched = objects.get(BUCKET, "photos/a.jpg", max_bytes=len(data))

    # THEN the bytes and the unquoted ETag come back
    assert fetched.data == data
    assert fetched.etag == etag.strip('"')


def test_get_refuses_an_object_over_the_cap(objects: ObjectClient, s3: Any) -> None:
    # GIVEN an object one byte over the cap
    s3.put_object(Bucket=BUCKET, Key="big.jpg", Body=b"x" * 1001)

    # WHEN it is fetched  THEN it is a permanent too-large
    with pytest.raises(PermanentError) as raised:
        objects.get(BUCKET, "big.jpg", max_bytes=1000)
    assert raised.value.error_code == "too-large"


@pytest.mark.parametrize("key", ["photos/a.jpg", "double//slash.jpg"])
def test_get_tells_the_size_before_the_body_and_can_be_abandoned(
    objects: ObjectClient, s3: Any, key: str
) -> None:
    # GIVEN an object of 5,000 bytes (under a key obstore carries, and one it leaves to boto3)
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"y" * 5000)
    sizes: list[int] = []

    def refuse(size: int) -> None:
        sizes.append(size)
        raise GetAbandoned(key)

    # WHEN it is fetched with a callback that hears the size, then with one that abandons it
    fetched = objects.get(BUCKET, key, max_bytes=10_000, on_size=sizes.append)
    with pytest.raises(GetAbandoned):
        objects.get(BUCKET, key, max_bytes=10_000, on_size=refuse)

    # THEN both heard the size (the first before its bytes came back), and the abandon came
    # through as itself, not as an S3 failure
    assert sizes == [5000, 5000]
    assert fetched.data == b"y" * 5000


def unread_bytes_from(url: str) -> int:
    """Bytes the kernel holds unread on this machine's connections to ``url`` (client side)."""
    port = int(url.rsplit(":", 1)[1])
    unread = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:
                unread += int(fields[4].split(":")[1], 16)
    return unread


def test_an_abandoned_get_lets_its_connection_go_at_once(
    objects: ObjectClient, s3: Any, moto_server: str
) -> None:
    # GIVEN an object of 4 MB, more than the kernel buffers for one connection
    s3.put_object(Bucket=BUCKET, Key="large.jpg", Body=b"z" * (4 << 20))

    def refuse(size: int) -> None:
        raise GetAbandoned("large.jpg")

    # WHEN its GET is abandoned once the size is known, and the caller waits while handling it
    # (as the loader waits for the budget)
    unread = -1  # (stays so if the GET is not abandoned)
    try:
        objects.get(BUCKET, "large.jpg", max_bytes=8 << 20, on_size=refuse)
    except GetAbandoned:
        time.sleep(0.3)  # the server would fill the connection's buffers meanwhile
        unread = unread_bytes_from(moto_server)

    # THEN no connection holds the unread body meanwhile: the response was let go at once
    assert unread == 0


def test_an_object_over_the_cap_is_refused_before_its_size_is_told(
    objects: ObjectClient, s3: Any
) -> None:
    s3.put_object(Bucket=BUCKET, Key="big.jpg", Body=b"x" * 1001)
    sizes: list[int] = []
    with pytest.raises(PermanentError):
        objects.get(BUCKET, "big.jpg", max_bytes=1000, on_size=sizes.append)
    assert sizes == []


@pytest.mark.parametrize(("bucket", "key"), [(BUCKET, "missing.jpg"), ("no-such-bucket", "a.jpg")])
def test_get_of_a_missing_object_is_permanent_not_found(
    objects: ObjectClient, bucket: str, key: str
) -> None:
    # GIVEN no such object (or no such bucket)  WHEN it is fetched
    with pytest.raises((PermanentError, botocore.exceptions.ClientError)) as raised:
        objects.get(bucket, key, max_bytes=1000)

    # THEN the consumer's settlement makes it a permanent not-found, whichever client
    failure = classify(raised.value)
    assert (failure.error_code, failure.permanent) == ("not-found", True)


def test_head_returns_etag_and_exactly_the_user_metadata(objects: ObjectClient, s3: Any) -> None:
    # GIVEN a feature file with a content type and user metadata
    etag = s3.put_object(
        Bucket=BUCKET, Key="v1/a.npy", Body=b"npy", ContentType="application/x-npy", Metadata=META
    )["ETag"]

    # WHEN it is looked at, and a missing key too
    existing = objects.head(BUCKET, "v1/a.npy")
    missing = objects.head(BUCKET, "v1/missing.npy")

    # THEN the user metadata comes back as written, without the standard headers
    assert existing is not None
    assert existing.etag == etag.strip('"')
    assert existing.metadata == META
    assert missing is None


def test_create_only_put_writes_once(objects: ObjectClient, s3: Any) -> None:
    # GIVEN no feature file  WHEN it is created, then created again
    objects.put(BUCKET, "v1/b.npy", b"first", metadata=META, content_type="application/x-npy")
    with pytest.raises(ConditionFailed):
        objects.put(BUCKET, "v1/b.npy", b"second", metadata=META, content_type="application/x-npy")

    # THEN the first write stands, with its metadata and content type
    got = s3.get_object(Bucket=BUCKET, Key="v1/b.npy")
    assert got["Body"].read() == b"first"
    assert got["Metadata"] == META
    assert got["ContentType"] == "application/x-npy"


def test_if_match_put_replaces_only_the_version_seen(objects: ObjectClient, s3: Any) -> None:
    # GIVEN a feature file
    etag = s3.put_object(Bucket=BUCKET, Key="v1/c.npy", Body=b"old")["ETag"].strip('"')

    # WHEN it is replaced over a wrong ETag, then over the right one
    with pytest.raises(ConditionFailed):
        objects.put(BUCKET, "v1/c.npy", b"x", metadata=META, content_type="a/b", if_match="0" * 32)
    objects.put(BUCKET, "v1/c.npy", b"new", metadata=META, content_type="a/b", if_match=etag)

    # THEN only the second write happened
    assert s3.get_object(Bucket=BUCKET, Key="v1/c.npy")["Body"].read() == b"new"


def test_if_match_put_on_a_deleted_file_is_a_failed_condition(
    objects: ObjectClient, s3: Any
) -> None:
    # GIVEN a feature file seen, then deleted by someone else
    etag = s3.put_object(Bucket=BUCKET, Key="v1/d.npy", Body=b"old")["ETag"].strip('"')
    s3.delete_object(Bucket=BUCKET, Key="v1/d.npy")

    # WHEN it is replaced over the ETag seen  THEN the condition failed (S3 may say 404)
    with pytest.raises(ConditionFailed):
        objects.put(BUCKET, "v1/d.npy", b"new", metadata=META, content_type="a/b", if_match=etag)


KEYS = [
    "photos/cat 1.jpg",
    "é/ü+%41~[x]{y}^`|<>\"'.jpg",
    "q?x#y&z=1;a:b*!.jpg",
    # obstore's paths cannot carry these exactly: the boto3 fallback serves them
    "/leading-slash.jpg",
    "double//slash.jpg",
    "dot/./segment.jpg",
    "dotdot/../segment.jpg",
    "trailing-slash/",
    "control\x01char.jpg",
]


@pytest.mark.parametrize(
    ("key", "native"),
    [
        ("photos/cat 1.jpg", True),
        ("...", True),
        (".hidden/a..b/c.", True),
        ("a/.../b", True),
        ("é/ü~.jpg", True),
        ("", False),
        (".", False),
        ("..", False),
        ("./a", False),
        ("a/.", False),
        ("a/..", False),
        ("../a", False),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("dot/./segment.jpg", False),
        ("dotdot/../segment.jpg", False),
        ("tab\there", False),
        ("del\x7f.jpg", False),
        ("nul\x00.jpg", False),
        ("unit\x1f.jpg", False),
    ],
)
def test_only_keys_obstore_addresses_exactly_go_native(key: str, native: bool) -> None:
    # Every other key takes the boto3 fallback (the test below shows both reach their object).
    assert native_key(key) is native


@pytest.mark.parametrize("key", KEYS)
def test_any_s3_key_reaches_exactly_its_object(objects: ObjectClient, s3: Any, key: str) -> None:
    # GIVEN a source object under an unusual key, and the neighbour that a sloppy path
    # normalisation would reach instead
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"source")
    neighbour = key.strip("/").replace("//", "/")
    if neighbour != key:
        s3.put_object(Bucket=BUCKET, Key=neighbour, Body=b"neighbour")

    # WHEN it is fetched, and its feature file written and looked at
    fetched = objects.get(BUCKET, key, max_bytes=100)
    objects.put(BUCKET, f"v1/{key}.npy", b"f", metadata=META, content_type="a/b")
    existing = objects.head(BUCKET, f"v1/{key}.npy")

    # THEN each request reached the object named by exactly that key
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="v1/")["Contents"]]
    assert fetched.data == b"source"
    assert listed == [f"v1/{key}.npy"]
    assert existing is not None and existing.metadata == META


def test_native_put_refuses_metadata_that_is_not_ascii(s3: Any) -> None:
    # GIVEN the native client  WHEN a metadata value is not ASCII  THEN nothing is sent
    objects = make("obstore", s3)
    meta = {"model": "m", "source-key": "é", "shape": "8"}
    with pytest.raises(ValueError, match=r"^metadata 'source-key' is not ASCII: 'é'$"):
        objects.put(BUCKET, "v1/e.npy", b"x", metadata=meta, content_type="a/b")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


def test_native_client_follows_the_standard_endpoint_variable(
    moto_server: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the endpoint only in AWS_ENDPOINT_URL_S3, as a Batch job or the demo would set it
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    s3.put_object(Bucket=BUCKET, Key="a.jpg", Body=b"via env")

    # WHEN the native client is made like a default boto3 client
    objects = open_objects("obstore", boto3.client("s3", region_name=REGION))

    # THEN it talks to that endpoint
    assert isinstance(objects, NativeObjects)
    assert objects.endpoint == moto_server
    assert objects.get(BUCKET, "a.jpg", max_bytes=100).data == b"via env"


def test_native_client_leaves_aws_endpoints_to_obstore() -> None:
    # GIVEN a boto3 client for AWS itself  WHEN the native client is made like it
    s3 = boto3.client("s3", region_name="eu-west-1")
    objects = NativeObjects.like(s3, fallback=BotoObjects(s3))

    # THEN obstore builds the regional endpoint (HTTPS only) for the same region
    assert objects.endpoint is None
    assert objects.region == "eu-west-1"
    assert "allow_http" not in objects.client_options


def test_credentials_from_a_profile_are_handed_over_from_boto3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: str, s3: Any
) -> None:
    # GIVEN credentials only in a shared credentials file profile (no AWS_ACCESS_KEY_ID)
    credentials = tmp_path / "credentials"
    credentials.write_text("[work]\naws_access_key_id = AKIDWORK\naws_secret_access_key = s\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "work")
    s3.put_object(Bucket=BUCKET, Key="a.jpg", Body=b"profile")

    # WHEN the native client's credentials are chosen
    provider = _credential_provider()

    # THEN boto3's are handed over (object_store does not read profiles), and they work
    assert provider is not None
    assert provider()["access_key_id"] == "AKIDWORK"  # type: ignore[index]
    objects = NativeObjects(BotoObjects(s3), endpoint=moto_server, credential_provider=provider)
    assert objects.get(BUCKET, "a.jpg", max_bytes=100).data == b"profile"


def test_environment_credentials_are_resolved_natively() -> None:
    # GIVEN credentials in the environment (the test session's), as Batch's container
    # credentials or an instance profile would be  THEN obstore resolves them itself
    assert _credential_provider() is None


# --- Errors on the wire: what obstore retries, and what outlives the retries -------------------

Call = Callable[[ObjectClient], object]


def get(objects: ObjectClient) -> object:
    return objects.get(BUCKET, "img.jpg", max_bytes=10_000)


def head(objects: ObjectClient) -> object:
    return objects.head(BUCKET, "img.jpg")


def create(objects: ObjectClient) -> object:
    objects.put(BUCKET, "v1/new.npy", b"f", metadata=META, content_type="a/b")
    return None


ATTEMPTS = 1 + int(RETRY["max_retries"])
# (plan, call, what the caller sees, requests that reached the proxy)
WIRE_CASES: dict[str, tuple[dict[str, Fault], Call, str, int]] = {
    "get-throttled-twice": ({"get_object": Fault("throttle", calls={1, 2})}, get, "ok", 3),
    "get-500-always": ({"get_object": Fault("server", every=1)}, get, "aws-error", ATTEMPTS),
    "get-reset-once": ({"get_object": Fault("reset", calls={1})}, get, "ok", 2),
    "get-access-denied": ({"get_object": Fault("denied", every=1)}, get, "access-denied", 1),
    "get-archived": ({"get_object": Fault("archived", every=1)}, get, "archived", 1),
    "head-throttled-always": (
        {"head_object": Fault("throttle", every=1)},
        head,
        "aws-error",
        ATTEMPTS,
    ),
    "head-closed-once": ({"head_object": Fault("closed", calls={1})}, head, "ok", 2),
    "put-500-twice": ({"put_object": Fault("server", calls={1, 2})}, create, "ok", 3),
    "put-throttled-always": (
        {"put_object": Fault("throttle", every=1)},
        create,
        "throttled",
        ATTEMPTS,
    ),
    # A PUT is not idempotent: after a reset, obstore does not send it again by itself...
    "put-reset": ({"put_object": Fault("reset", calls={1})}, create, "aws-unavailable", 1),
    # ...but a connection closed before any response is retried; if the first attempt had
    # landed, S3 answers the create-only retry with 412: the write protocol then looks.
    "put-closed-before": ({"put_object": Fault("closed", calls={1})}, create, "ok", 2),
    "put-closed-after": (
        {"put_object": Fault("closed", calls={1}, after=True)},
        create,
        "condition-failed",
        2,
    ),
    # S3's 409 for concurrent conditional writes: the write protocol looks, as on a 412.
    "put-409": ({"put_object": Fault("conflict", calls={1})}, create, "condition-failed", 1),
}


@pytest.fixture
def faulty_native(moto_server: str, s3: Any) -> Iterator[Callable[..., Any]]:
    proxies: list[FaultyEndpoint] = []

    def start(plan: dict[str, Fault], retry: Any = FAST) -> tuple[FaultyEndpoint, ObjectClient]:
        proxy = FaultyEndpoint(moto_server, plan).__enter__()
        proxies.append(proxy)
        return proxy, NativeObjects(BotoObjects(s3), endpoint=proxy.url, retry=retry)

    yield start
    for proxy in proxies:
        proxy.__exit__(None, None, None)


def outcome(call: Call, objects: ObjectClient) -> str:
    try:
        call(objects)
    except ConditionFailed:
        return "condition-failed"
    except (PermanentError, TransientError) as exc:
        return exc.error_code
    return "ok"


@pytest.mark.parametrize(
    ("plan", "call", "expected", "requests"), WIRE_CASES.values(), ids=list(WIRE_CASES)
)
def test_native_client_retries_once_and_settles_what_outlives_the_retries(
    faulty_native: Callable[..., Any],
    s3: Any,
    plan: dict[str, Fault],
    call: Call,
    expected: str,
    requests: int,
) -> None:
    # GIVEN an image, and S3 answering as planned
    s3.put_object(Bucket=BUCKET, Key="img.jpg", Body=b"jpeg")
    proxy, objects = faulty_native(plan)

    # WHEN the native client makes the call
    got = outcome(call, objects)

    # THEN the faults happened, obstore retried exactly what it should, and the caller sees
    # the expected result or failure code
    assert set(proxy.injected) == set(plan)
    assert sum(proxy.calls.values()) == requests
    assert got == expected


def test_the_production_retry_policy_outlasts_a_short_throttling_burst(
    faulty_native: Callable[..., Any], s3: Any
) -> None:
    # GIVEN S3 throttling the first four GETs, and the real backoff (100 ms doubling)
    s3.put_object(Bucket=BUCKET, Key="img.jpg", Body=b"jpeg")
    proxy, objects = faulty_native({"get_object": Fault("throttle", calls={1, 2, 3, 4})}, RETRY)

    # WHEN the image is fetched  THEN the fifth attempt gets it
    assert objects.get(BUCKET, "img.jpg", max_bytes=100).data == b"jpeg"
    assert proxy.calls["get_object"] == 5


def test_connection_refused_is_transient_unavailable(s3: Any) -> None:
    # GIVEN an endpoint where nothing listens  WHEN an image is fetched
    objects = NativeObjects(BotoObjects(s3), endpoint="http://127.0.0.1:9", retry=FAST)
    with pytest.raises(TransientError) as raised:
        objects.get(BUCKET, "img.jpg", max_bytes=100)

    # THEN it is retried later, like botocore's EndpointConnectionError
    assert raised.value.error_code == "aws-unavailable"


@pytest.mark.parametrize(
    ("kind", "code", "permanent"),
    [("denied", "access-denied", False), ("archived", "archived", True)],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_both_clients_settle_the_same_answer_the_same_way(
    moto_server: str, kind: str, code: str, permanent: bool, implementation: str
) -> None:
    # GIVEN S3 answering a GET with an error neither client retries
    with FaultyEndpoint(moto_server, {"get_object": Fault(kind, every=1)}) as proxy:
        s3 = boto_client(proxy.url)
        s3.create_bucket(Bucket=BUCKET)
        objects = make(implementation, s3)

        # WHEN the image is fetched
        with pytest.raises(SETTLED) as raised:
            objects.get(BUCKET, "img.jpg", max_bytes=100)

    # THEN boto3 and obstore give the same failure
    failure = classify(raised.value)
    assert (failure.error_code, failure.permanent) == (code, permanent)
