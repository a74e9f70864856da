"""The benchmarks' moto server keeps connections alive, as AWS does, and answers as moto does."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from typing import Any, Literal

import boto3
import pytest
from botocore.config import Config

from benchmarks.moto_keepalive import lighten_scans, serve


@pytest.fixture
def motos_own_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() and lighten_scans() patch moto for the process (receive, delete, dispatch): put
    moto's own back afterwards, for the tests that run after these on the in-process moto."""
    from moto import backends
    from moto.sqs.models import Message, Queue, SQSBackend

    name = "is_message_valid_based_on_retention_period"
    monkeypatch.setattr(SQSBackend, name, getattr(SQSBackend, name))
    monkeypatch.setattr(Queue, "messages", Queue.__dict__["messages"])
    monkeypatch.setattr(Queue, "delete_message", Queue.delete_message)
    monkeypatch.setattr(Message, "mark_received", Message.mark_received)
    monkeypatch.setattr(backends, "list_of_moto_modules", backends.list_of_moto_modules)


@pytest.fixture
def server(motos_own_afterwards: None) -> Iterator[tuple[str, list[int]]]:
    server = serve()
    connections: list[int] = []
    finish = server.finish_request

    def counted(request: Any, client_address: Any) -> None:
        connections.append(1)
        finish(request, client_address)

    server.finish_request = counted  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", connections
    finally:
        server.shutdown()
        server.server_close()


def client(service: Literal["s3", "sqs"], url: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(max_pool_connections=1, retries={"max_attempts": 1}),
    )


@pytest.fixture
def sqs(server: tuple[str, list[int]]) -> Any:
    """An SQS client of the kept-alive server."""
    return client("sqs", server[0])


def sqs_queue(name: str) -> Any:
    """moto's queue behind the server (both run in this process), to look inside it."""
    from moto.sqs.models import sqs_backends

    return sqs_backends["123456789012"]["us-east-1"].queues[name]


def test_s3_and_sqs_calls_share_one_connection_each(server: tuple[str, list[int]]) -> None:
    url, connections = server
    s3, sqs = client("s3", url), client("sqs", url)

    # WHEN a client makes every kind of call the consumer makes, a body of 100 KB included
    # (botocore sends it after "Expect: 100-continue")
    s3.create_bucket(Bucket="kept-alive")
    body = bytes(range(256)) * 400
    s3.put_object(Bucket="kept-alive", Key="a/b c.jpg", Body=body, Metadata={"source-etag": "x"})
    got = s3.get_object(Bucket="kept-alive", Key="a/b c.jpg")["Body"].read()
    head = s3.head_object(Bucket="kept-alive", Key="a/b c.jpg")
    missing = s3.list_objects_v2(Bucket="kept-alive", Prefix="nothing/")
    queue = sqs.create_queue(QueueName="kept")["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="hello")
    received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)

    # THEN each answer is moto's, and the two clients opened one connection each
    assert got == body
    assert head["ContentLength"] == len(body) and head["Metadata"] == {"source-etag": "x"}
    assert missing["KeyCount"] == 0
    assert [m["Body"] for m in received["Messages"]] == ["hello"]
    assert len(connections) == 2


def test_a_chunked_request_body_is_read_whole_and_the_connection_serves_the_next(
    server: tuple[str, list[int]],
) -> None:
    url, connections = server
    s3 = client("s3", url)
    s3.create_bucket(Bucket="chunked")
    connection = http.client.HTTPConnection(url.removeprefix("http://"))

    # WHEN bodies come in chunks, two requests on one connection (moto's S3 takes unsigned PUTs)
    statuses = []
    for key, chunks in (("one", [b"hello ", b"world"]), ("two", [b"again"])):
        connection.request("PUT", f"/chunked/{key}", body=iter(chunks), encode_chunked=True)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)

    # THEN each object holds its chunks, and the two PUTs used one connection
    assert statuses == [200, 200]
    assert s3.get_object(Bucket="chunked", Key="one")["Body"].read() == b"hello world"
    assert s3.get_object(Bucket="chunked", Key="two")["Body"].read() == b"again"
    assert len(connections) == 2  # the boto3 client's, and this one


def test_receives_build_no_attribute_maps_and_still_drop_expired_messages(
    server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.sqs.models import Queue, sqs_backends

    url, _ = server
    sqs = client("sqs", url)
    retention = {"MessageRetentionPeriod": "60"}
    queue_url = sqs.create_queue(QueueName="retained", Attributes=retention)["QueueUrl"]
    for i in range(30):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"m{i}")
    # GIVEN the oldest message sent 61 s ago, past the queue's 60 s retention period
    queue = sqs_backends["123456789012"]["us-east-1"].queues["retained"]
    oldest: Any = queue._messages[0]  # moto types sent_timestamp as None
    oldest.sent_timestamp -= 61_000
    built = []
    attributes = Queue.attributes

    def counted(self: Queue) -> dict[str, Any]:
        built.append(1)
        return attributes.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(Queue, "attributes", property(counted))

    # WHEN a client receives from the queue of thirty
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)

    # THEN no attribute map was built (moto builds three per message returned), and the expired
    # message ends the receive as in moto: nothing past it is returned
    assert built == []
    assert received.get("Messages", []) == []
    # AND without the expired one, the receive returns the next ten in order
    queue._messages.remove(oldest)
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
    assert [m["Body"] for m in received["Messages"]] == [f"m{i}" for i in range(1, 11)]


def test_deletes_answer_as_moto_does_with_handles_looked_up_not_scanned(sqs: Any) -> None:
    queue_url = sqs.create_queue(QueueName="deletes")["QueueUrl"]
    other_url = sqs.create_queue(QueueName="elsewhere")["QueueUrl"]
    for i in range(6):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"m{i}")
    sqs.send_message(QueueUrl=other_url, MessageBody="other")
    # GIVEN three messages received (invisible for 30 s), and one received twice (an old handle)
    first = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=3, VisibilityTimeout=30)
    handles = [m["ReceiptHandle"] for m in first["Messages"]]
    assert [m["Body"] for m in first["Messages"]] == ["m0", "m1", "m2"]
    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=handles[2], VisibilityTimeout=0)
    again = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, VisibilityTimeout=30)
    assert again["Messages"][0]["Body"] == "m2"
    elsewhere = sqs.receive_message(QueueUrl=other_url)["Messages"][0]["ReceiptHandle"]

    # WHEN the first is deleted, twice, and the twice-received one by its older handle
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handles[0])
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handles[0])
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handles[2])

    # THEN both are gone (moto takes any handle a message ever had) and a repeat passes; a
    # handle that was never made, or another queue's, is invalid here, and deletes nothing
    bodies = [m.body for m in sqs_queue("deletes")._messages]
    assert bodies == ["m1", "m3", "m4", "m5"]
    for wrong in ("never-made", elsewhere):
        with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=wrong)
    assert len(sqs_queue("deletes")._messages) == 4
    # AND a batch deletes the rest of what was received, and receives see only what is visible
    result = sqs.delete_message_batch(
        QueueUrl=queue_url, Entries=[{"Id": "1", "ReceiptHandle": handles[1]}]
    )
    assert [s["Id"] for s in result["Successful"]] == ["1"]
    visible = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in visible] == ["m3", "m4", "m5"]


def test_a_delayed_message_is_not_received_until_its_delay_ends(sqs: Any) -> None:
    queue_url = sqs.create_queue(QueueName="delayed")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="now")
    sqs.send_message(QueueUrl=queue_url, MessageBody="later", DelaySeconds=60)
    # WHEN a client receives everything it can
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    # THEN the delayed message waits, as in moto; once its delay is over it is received
    assert [m["Body"] for m in received] == ["now"]
    later = sqs_queue("delayed")._messages[1]
    later.delayed_until -= 61_000
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in received] == ["later"]


def test_requests_are_routed_without_listing_motos_package(
    server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    url, _ = server
    s3 = client("s3", url)
    sqs = client("sqs", url)
    listed: list[str] = []
    listdir = os.listdir

    def counted(path: Any = ".") -> list[str]:
        listed.append(str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    # WHEN S3 and SQS requests are served
    s3.create_bucket(Bucket="routed")
    s3.put_object(Bucket="routed", Key="k", Body=b"x")
    assert s3.get_object(Bucket="routed", Key="k")["Body"].read() == b"x"
    sqs.create_queue(QueueName="routed")
    # THEN each reached its service, and no request listed moto's package to find it
    assert [p for p in listed if p.rstrip("/").endswith("moto")] == []


def test_a_receive_and_a_delete_read_the_messages_they_take_not_the_whole_queue(
    sqs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.sqs import models

    queue_url = sqs.create_queue(QueueName="long")["QueueUrl"]
    entries = [{"Id": str(i), "MessageBody": f"m{i}"} for i in range(10)]
    for _ in range(20):
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    # GIVEN a queue of 200 messages, and counters on moto's clock and on the lists of a
    # message's receipt handles
    clock = models.unix_time_millis
    handles = models.Message.all_receipt_handles
    reads = {"clock": 0, "handles": 0}

    def counted_clock(*args: Any) -> float:
        reads["clock"] += 1
        return clock(*args)

    def counted_handles(self: Any) -> Any:
        reads["handles"] += 1
        return handles.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(models, "unix_time_millis", counted_clock)
    monkeypatch.setattr(models.Message, "all_receipt_handles", property(counted_handles))

    # WHEN ten messages are received and one of them deleted
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    receiving = reads["clock"]
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=received[0]["ReceiptHandle"])

    # THEN the receive read the clock for the ten it took, not twice for each of the 200 queued
    # (moto's own: 400 and more), and the delete listed one message's handles, not the queue's
    assert len(received) == 10
    assert receiving < 100
    assert reads["handles"] == 1


def test_a_message_moved_to_the_dead_letter_queue_is_deleted_there_not_at_its_source(
    sqs: Any,
) -> None:
    dlq_url = sqs.create_queue(QueueName="dead")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    policy = (
        f'{{"deadLetterTargetArn": "{dlq_arn["Attributes"]["QueueArn"]}", "maxReceiveCount": 1}}'
    )
    queue_url = sqs.create_queue(QueueName="source", Attributes={"RedrivePolicy": policy})[
        "QueueUrl"
    ]
    sqs.send_message(QueueUrl=queue_url, MessageBody="poison")
    # GIVEN a message received once, made visible, and moved to the dead-letter queue by the
    # next receive (its receive count has reached the policy's maximum)
    handle = sqs.receive_message(QueueUrl=queue_url)["Messages"][0]["ReceiptHandle"]
    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
    assert sqs.receive_message(QueueUrl=queue_url).get("Messages", []) == []
    assert [m.body for m in sqs_queue("dead")._messages] == ["poison"]
    # WHEN its handle deletes at the source, then at the dead-letter queue
    # THEN the source has no such message, as in moto, and the dead-letter queue deletes it
    with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handle)
    sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=handle)
    assert sqs_queue("dead")._messages == []


def test_a_purged_message_cannot_be_deleted(sqs: Any) -> None:
    queue_url = sqs.create_queue(QueueName="purged")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="m")
    handle = sqs.receive_message(QueueUrl=queue_url)["Messages"][0]["ReceiptHandle"]
    # WHEN the queue is purged and the received message then deleted
    sqs.purge_queue(QueueUrl=queue_url)
    # THEN its handle is invalid, as in moto
    with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handle)


def test_a_handle_made_before_the_patch_still_deletes_its_message(
    motos_own_afterwards: None,
) -> None:
    from moto import mock_aws

    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        queue_url = sqs.create_queue(QueueName="early")["QueueUrl"]
        sqs.send_message(QueueUrl=queue_url, MessageBody="m")
        # GIVEN a message received on moto's own code
        handle = sqs.receive_message(QueueUrl=queue_url)["Messages"][0]["ReceiptHandle"]
        # WHEN the scans are lightened and the message then deleted by that handle
        lighten_scans()
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handle)
        # THEN moto's own delete, which the lookup falls back to, takes it
        assert sqs_queue("early")._messages == []
