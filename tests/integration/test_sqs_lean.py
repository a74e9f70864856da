"""The lean SQS client answers as boto3 does, over real HTTP (a moto server, or a canned server).

Same messages, attributes and usable receipt handles; the same ``Failed`` entries and the same
exceptions and error codes (so :func:`consumer.aws.is_retryable` and the stale-receipt checks
decide the same); requests signed as botocore signs them, with credentials that refresh; kept-alive
connections that survive a server closing them; ``--sqs-client auto`` keeping boto3 where the lean
client cannot stand in; and the consumer end to end on ``--sqs-client lean``.
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import botocore.config
import botocore.exceptions
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials

from bottleneck_contract.retry import no_botocore_retries
from consumer import aws
from consumer.config import Config
from consumer.errors import ConfigError, Failure
from consumer.settle import DeadLetter
from consumer.sqs import WorkQueue
from consumer.sqs_lean import LeanSQS, open_queue_client
from consumer.sqs_lean.keepalive import KeepAliveHttp, _read_response
from consumer.sqs_lean.sigv4 import SigV4Signer, host_header
from tests.faults import Fault, Faulty, FaultyEndpoint
from tests.integration.consumer_process import Endpoint
from tests.integration.test_signals import STARTUP, enqueue, log_lines, summary

REGION = "us-east-1"
RECEIVE: dict[str, Any] = {
    "MaxNumberOfMessages": 10,
    "VisibilityTimeout": 0,  # every receive sees the same messages
    "MessageSystemAttributeNames": ["ApproximateReceiveCount", "SentTimestamp"],
    "MessageAttributeNames": ["All"],
}
# SQS's proxy and the tests' FaultyEndpoint name every SQS request (a POST to "/") so.
SQS_REQUEST = "post-bucket-or-subresource"


def boto_sqs(url: str) -> Any:
    """A boto3 SQS client as the consumer makes it (botocore's retries off)."""
    return boto3.client(
        "sqs",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(retries=no_botocore_retries(), read_timeout=40),
    )


def lean_sqs(client: Any, credentials: Any = None) -> LeanSQS:
    return LeanSQS.like(client, credentials or boto3.Session().get_credentials())


@pytest.fixture
def queue(moto_server: str) -> tuple[Any, str]:
    sqs = boto_sqs(moto_server)
    return sqs, sqs.create_queue(QueueName="work")["QueueUrl"]


def send_three(sqs: Any, url: str) -> None:
    attributes = {
        "text": {"DataType": "String", "StringValue": "héllo"},
        "count": {"DataType": "Number", "StringValue": "3"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xff\x10"},
    }
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"body {i} ✓", MessageAttributes=attributes)


def by_id(response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["MessageId"]: m for m in response.get("Messages", [])}


# --- the same answers as boto3 --------------------------------------------------------------


def test_receive_gives_the_messages_and_attributes_boto3_gives(queue: tuple[Any, str]) -> None:
    # GIVEN three messages with string, number and binary attributes
    sqs, url = queue
    send_three(sqs, url)

    # WHEN boto3 and then the lean client receive them (a visibility timeout of 0 each)
    expected = sqs.receive_message(QueueUrl=url, **RECEIVE)
    got = lean_sqs(sqs).receive_message(QueueUrl=url, **RECEIVE)

    # THEN the same messages, bodies, digests and attributes (binary ones as bytes), and a
    # response of the same shape; only the receipt handle and the receive count differ
    assert by_id(got).keys() == by_id(expected).keys() and len(by_id(got)) == 3
    for message_id, message in by_id(got).items():
        before = by_id(expected)[message_id]
        assert message.keys() == before.keys()
        for key in ("Body", "MD5OfBody", "MD5OfMessageAttributes", "MessageAttributes"):
            assert message[key] == before[key], key
        assert message["MessageAttributes"]["blob"]["BinaryValue"] == b"\x00\xff\x10"
        assert message["Attributes"]["SentTimestamp"] == before["Attributes"]["SentTimestamp"]
        assert int(message["Attributes"]["ApproximateReceiveCount"]) == 2
        assert message["ReceiptHandle"] != before["ReceiptHandle"]
    assert got.keys() == expected.keys()
    assert got["ResponseMetadata"].keys() == expected["ResponseMetadata"].keys()
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_an_empty_receive_is_an_empty_answer(queue: tuple[Any, str]) -> None:
    sqs, url = queue
    got = lean_sqs(sqs).receive_message(QueueUrl=url, WaitTimeSeconds=0, **RECEIVE)
    assert "Messages" not in got
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_lean_receipt_handles_delete_and_extend_their_messages(queue: tuple[Any, str]) -> None:
    # GIVEN three messages received by the lean client and held for 300 s
    sqs, url = queue
    lean = lean_sqs(sqs)
    send_three(sqs, url)
    held = lean.receive_message(QueueUrl=url, **{**RECEIVE, "VisibilityTimeout": 300})
    handles = [m["ReceiptHandle"] for m in held["Messages"]]

    # WHEN it hands one back (visibility 0) and deletes the other two
    extended = lean.change_message_visibility_batch(
        QueueUrl=url, Entries=[{"Id": "a", "ReceiptHandle": handles[0], "VisibilityTimeout": 0}]
    )
    deleted = lean.delete_message_batch(
        QueueUrl=url,
        Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[1:])],
    )

    # THEN each entry is done, and only the handed-back message is left, visible again
    assert [e["Id"] for e in extended["Successful"]] == ["a"] and not extended.get("Failed")
    assert sorted(e["Id"] for e in deleted["Successful"]) == ["0", "1"]
    assert not deleted.get("Failed")
    left = sqs.receive_message(QueueUrl=url, **RECEIVE)
    assert list(by_id(left)) == [held["Messages"][0]["MessageId"]]


@pytest.mark.parametrize("operation", ["delete_message_batch", "change_message_visibility_batch"])
def test_a_bad_receipt_handle_fails_its_entry_as_with_boto3(
    queue: tuple[Any, str], operation: str
) -> None:
    # GIVEN a batch with one good and one bad receipt handle, sent by each client
    sqs, url = queue

    def batch(client: Any) -> dict[str, Any]:
        sqs.send_message(QueueUrl=url, MessageBody="x")
        (message,) = sqs.receive_message(QueueUrl=url, VisibilityTimeout=300)["Messages"]
        entries = [
            {"Id": "good", "ReceiptHandle": message["ReceiptHandle"]},
            {"Id": "bad", "ReceiptHandle": "not-a-receipt-handle"},
        ]
        if operation == "change_message_visibility_batch":
            entries = [{**e, "VisibilityTimeout": 30} for e in entries]
        response: dict[str, Any] = getattr(client, operation)(QueueUrl=url, Entries=entries)
        return response

    # WHEN boto3 and the lean client send it
    expected, got = batch(sqs), batch(lean_sqs(sqs))

    # THEN the same entries succeed, and the bad one fails with the same code
    assert got["Successful"] == expected["Successful"] == [{"Id": "good"}]
    assert got["Failed"] == expected["Failed"]
    assert got["Failed"][0]["Id"] == "bad" and got["Failed"][0]["Code"]


def test_the_work_queue_decides_the_same_over_either_client(queue: tuple[Any, str]) -> None:
    # GIVEN the consumer's WorkQueue over boto3 and over the lean client
    sqs, url = queue
    dlq = sqs.create_queue(QueueName="work-dlq")["QueueUrl"]
    outcomes = []
    for client in (sqs, lean_sqs(sqs)):
        work = WorkQueue(client, url, dlq)
        sqs.send_message(QueueUrl=url, MessageBody="image")

        # WHEN it receives, extends, dead-letters, deletes, and deletes again with a stale handle
        (message,) = work.receive(10, wait_seconds=0, visibility=300)
        stale = work.change_visibility([message], 300)
        letter = DeadLetter("image", Failure("bad-message", "not json", permanent=True))
        sent = work.try_dead_letter(message, [letter])
        deleted = work.try_delete([message])
        message.receipt_handle = "gone"
        again = work.try_delete([message])
        outcomes.append(
            (
                message.body,
                message.receive_count,
                stale,
                len(sent.done),
                len(deleted.done),
                (len(again.stale), len(again.retry), len(again.rejected)),
            )
        )

    # THEN both decide alike; the dead letters carry the same attributes
    assert outcomes[0] == outcomes[1] == ("image", 1, [], 1, 1, (1, 0, 0))
    letters = sqs.receive_message(
        QueueUrl=dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )
    attributes = [m["MessageAttributes"] for m in letters["Messages"]]
    assert len(attributes) == 2
    for attrs in attributes:
        attrs.pop("source-message-id")
    assert attributes[0] == attributes[1]


def test_before_call_observers_on_the_boto3_client_see_every_call(
    queue: tuple[Any, str],
) -> None:
    # GIVEN an observer of the boto3 client's before-call event (the benchmarks' request
    # counter is one)
    sqs, url = queue
    seen: list[str] = []
    sqs.meta.events.register("before-call", lambda model, **_: seen.append(model.name))

    # WHEN the lean client makes each of its calls
    lean = lean_sqs(sqs)
    lean.receive_message(QueueUrl=url, **RECEIVE)
    entry = {"Id": "1", "ReceiptHandle": "stale"}
    lean.delete_message_batch(QueueUrl=url, Entries=[entry])
    lean.change_message_visibility_batch(QueueUrl=url, Entries=[{**entry, "VisibilityTimeout": 1}])
    lean.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "x"}])

    # THEN the observer heard of each, by its operation name
    assert seen == [
        "ReceiveMessage",
        "DeleteMessageBatch",
        "ChangeMessageVisibilityBatch",
        "SendMessageBatch",
    ]


def test_other_calls_are_the_boto3_clients(queue: tuple[Any, str]) -> None:
    sqs, url = queue
    lean = lean_sqs(sqs)
    attributes = lean.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    assert attributes["Attributes"]["QueueArn"].endswith(":work")
    assert lean.meta is sqs.meta


# --- errors ---------------------------------------------------------------------------------


def test_a_missing_queue_raises_what_boto3_raises(queue: tuple[Any, str]) -> None:
    sqs, url = queue
    missing = url.replace("/work", "/no-such-queue")
    errors = []
    for client in (sqs, lean_sqs(sqs)):
        with pytest.raises(botocore.exceptions.ClientError) as raised:
            client.receive_message(QueueUrl=missing, **RECEIVE)
        errors.append(raised.value)
    expected, got = errors
    assert type(got) is type(expected)
    assert type(got).__name__ == "QueueDoesNotExist"
    assert got.response["Error"] == expected.response["Error"]
    assert (
        aws.error_code(got) == aws.error_code(expected) == "AWS.SimpleQueueService.NonExistentQueue"
    )
    assert aws.http_status(got) == aws.http_status(expected) == 400
    assert not aws.is_retryable(got)
    assert str(got) == str(expected)


@dataclass
class Sent:
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


class CannedServer:
    """A loopback HTTP/1.1 server: every POST gets ``answer(request)``; requests are kept.

    ``drop_after_answer`` closes each connection right after its response, without saying so
    (as a load balancer drops an idle kept-alive connection); ``delay`` holds every answer back.
    """

    def __init__(
        self,
        answer: Callable[[Sent], Answer],
        *,
        drop_after_answer: bool = False,
        delay: float = 0.0,
    ) -> None:
        self.answer = answer
        self.sent: list[Sent] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = Sent(self.path, dict(self.headers.items()), body)
                server.sent.append(request)
                time.sleep(delay)
                status, headers, payload = server.answer(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if drop_after_answer:
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CannedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def sqs_error(status: int, type_: str, query_error: str | None, message: str) -> Answer:
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": "req-1"}
    if query_error:
        headers["x-amzn-query-error"] = query_error
    return status, headers, json.dumps({"__type": type_, "message": message}).encode()


def empty_receive(request: Sent) -> Answer:
    return 200, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": "r"}, b"{}"


ERRORS: dict[str, Answer] = {
    "throttling": sqs_error(
        400, "com.amazonaws.sqs#ThrottlingException", "ThrottlingException;Sender", "Rate exceeded"
    ),
    "request-throttled": sqs_error(
        403, "com.amazonaws.sqs#RequestThrottled", "RequestThrottled;Sender", "slow down"
    ),
    "internal": sqs_error(500, "com.amazon.coral.service#InternalFailure", None, "oops"),
    "unavailable-json": sqs_error(503, "ServiceUnavailable", "ServiceUnavailable;Server", "later"),
    "bad-gateway-html": (
        502,
        {"Content-Type": "text/html"},
        b"<html><body><b>Http/1.1 Bad Gateway</b></body></html>",
    ),
}


@pytest.mark.parametrize("answer", ERRORS.values(), ids=list(ERRORS))
def test_throttling_and_server_errors_are_retryable_as_with_boto3(answer: Answer) -> None:
    # GIVEN an endpoint that answers every request with a throttling or server error
    with CannedServer(lambda request: answer) as server:
        sqs = boto_sqs(server.url)
        errors = []
        for client in (sqs, lean_sqs(sqs)):
            # WHEN each client receives
            with pytest.raises(botocore.exceptions.ClientError) as raised:
                client.receive_message(QueueUrl=f"{server.url}/123456789012/work", **RECEIVE)
            errors.append(raised.value)

    # THEN the same exception and error, and the consumer's retry layer retries it
    expected, got = errors
    assert type(got) is type(expected)
    assert got.response["Error"] == expected.response["Error"]
    assert aws.http_status(got) == aws.http_status(expected)
    assert aws.is_retryable(got) and aws.is_retryable(expected)


@pytest.mark.parametrize("kind", ["closed", "reset"])
def test_a_dropped_connection_is_retryable_and_the_next_call_works(
    queue: tuple[Any, str], moto_server: str, kind: str
) -> None:
    # GIVEN a proxy in front of moto that drops the connection of the first request
    sqs, url = queue
    sqs.send_message(QueueUrl=url, MessageBody="x")
    with FaultyEndpoint(moto_server, {SQS_REQUEST: Fault(kind, calls={1, 3})}) as proxy:
        errors = []
        for client in (boto_sqs(proxy.url), lean_sqs(boto_sqs(proxy.url))):
            # WHEN each client receives twice
            with pytest.raises(botocore.exceptions.BotoCoreError) as raised:
                client.receive_message(QueueUrl=url, **RECEIVE)
            errors.append(raised.value)
            got = client.receive_message(QueueUrl=url, **RECEIVE)

            # THEN the first fails as a connection error the consumer retries; the second works
            assert aws.is_retryable(raised.value)
            assert len(got["Messages"]) == 1
    assert proxy.injected[SQS_REQUEST] == 2
    assert type(errors[1]) is type(errors[0]) is botocore.exceptions.ConnectionClosedError


def test_connection_refused_is_retryable_as_with_boto3() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    sqs = boto_sqs(url)
    errors = []
    for client in (sqs, lean_sqs(sqs)):
        with pytest.raises(botocore.exceptions.BotoCoreError) as raised:
            client.delete_message_batch(QueueUrl=f"{url}/1/q", Entries=[])
        errors.append(raised.value)
    assert type(errors[1]) is type(errors[0]) is botocore.exceptions.EndpointConnectionError
    assert aws.is_retryable(errors[1])


def test_no_answer_in_time_is_a_retryable_read_timeout() -> None:
    with CannedServer(empty_receive, delay=1.0) as server:
        sqs = boto_sqs(server.url)
        http = KeepAliveHttp(server.url, connect_timeout=1, read_timeout=0.2)
        lean = LeanSQS(sqs, boto3.Session().get_credentials(), http)
        with pytest.raises(botocore.exceptions.ReadTimeoutError) as raised:
            lean.receive_message(QueueUrl=f"{server.url}/1/q", **RECEIVE)
    assert aws.is_retryable(raised.value)


def test_a_kept_alive_connection_the_server_closed_is_not_reused() -> None:
    # GIVEN a server that closes each connection after answering, without saying so
    with CannedServer(empty_receive, drop_after_answer=True) as server:
        lean = lean_sqs(boto_sqs(server.url))

        # WHEN the lean client makes three calls, each after the server closed the last one
        for _ in range(3):
            lean.receive_message(QueueUrl=f"{server.url}/1/q", **RECEIVE)
            time.sleep(0.05)

    # THEN each call found the closed connection out before using it, and succeeded
    assert len(server.sent) == 3


def test_a_kept_alive_connection_carries_the_next_request() -> None:
    with CannedServer(empty_receive) as server:
        lean = lean_sqs(boto_sqs(server.url))
        for _ in range(3):
            lean.receive_message(QueueUrl=f"{server.url}/1/q", **RECEIVE)
    assert len(server.sent) == 3
    assert lean._http._idle and len(lean._http._idle) == 1  # one connection, kept


FRAMINGS: dict[str, tuple[list[bytes], bytes, bool]] = {
    "content-length, in pieces": (
        [b"HTTP/1.1 200 OK\r\nContent-Len", b"gth: 5\r\n\r\nhe", b"llo"],
        b"hello",
        True,
    ),
    "chunked, with an extension and a trailer": (
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n",
            b"2\r\nlo\r\n0\r\nT: 1\r\n\r\n",
        ],
        b"hello",
        True,
    ),
    "100 continue first": (
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        b"ok",
        True,
    ),
    "connection close": (
        [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"],
        b"ok",
        False,
    ),
    "HTTP/1.0, framed by the close": (
        [b"HTTP/1.0 200 OK\r\n\r\nuntil the end"],
        b"until the end",
        False,
    ),
    "204 without a length": ([b"HTTP/1.1 204 No Content\r\n\r\n"], b"", True),
    "a megabyte": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n", b"x" * 1048576],
        b"x" * 1048576,
        True,
    ),
}


@pytest.mark.parametrize(("pieces", "body", "reusable"), FRAMINGS.values(), ids=list(FRAMINGS))
def test_responses_are_read_whatever_their_framing(
    pieces: list[bytes], body: bytes, reusable: bool
) -> None:
    server, client = socket.socketpair()

    def answer() -> None:
        for piece in pieces:
            server.sendall(piece)
        if not reusable:
            server.shutdown(socket.SHUT_WR)

    with server, client:
        client.settimeout(5)
        sender = threading.Thread(target=answer)  # a megabyte outgrows the socket's buffer
        sender.start()
        response, keep = _read_response(client)
        sender.join()
    assert (response.body, keep) == (body, reusable)


def test_a_response_cut_short_is_a_closed_connection() -> None:
    server, client = socket.socketpair()
    with server, client:
        server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        server.shutdown(socket.SHUT_WR)
        with pytest.raises(Exception, match="closed mid-response"):
            _read_response(client)


# --- signing and credentials ----------------------------------------------------------------


def botocore_signature(sent: Sent, host: str, secret: str, token: str | None) -> str:
    """The Authorization header botocore's SigV4Auth gives the headers ``sent`` signed."""
    authorization = sent.headers["Authorization"]
    access_key = authorization.split("Credential=")[1].split("/")[0]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {k: v for k, v in sent.headers.items() if k.lower() in signed and k.lower() != "host"}
    headers.pop("X-Amz-Date")
    headers.pop("X-Amz-Security-Token", None)
    request = AWSRequest("POST", f"http://{host}{sent.path}", headers=headers, data=sent.body)
    when = datetime.datetime.strptime(sent.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(ReadOnlyCredentials(access_key, secret, token), "sqs", REGION).add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize("token", [None, "session/token+with=odd chars"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:4566", "https://sqs.us-east-1.amazonaws.com"])
def test_the_signer_signs_as_botocore_signs(url: str, token: str | None) -> None:
    # GIVEN a fixed request, time and credentials
    body = b'{"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q", "Entries": []}'
    headers = {
        "X-Amz-Target": "AmazonSQS.DeleteMessageBatch",
        "Content-Type": "application/x-amz-json-1.0",
        "x-amzn-query-mode": "true",
    }
    request = AWSRequest("POST", url + "/", headers=dict(headers), data=body)
    when = datetime.datetime(2024, 2, 29, 23, 59, 58)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(ReadOnlyCredentials("AKID", "SECRET", token), "sqs", REGION).add_auth(request)

    # WHEN the lean signer signs it
    signer = SigV4Signer(REGION)
    credentials = ReadOnlyCredentials("AKID", "SECRET", token)
    signer.sign(host_header(url), "/", headers, body, credentials, "20240229T235958Z")

    # THEN the same Authorization header, and the same again with the cached signing key
    assert headers["Authorization"] == request.headers["Authorization"]
    assert headers.get("X-Amz-Security-Token") == token
    again = {k: v for k, v in headers.items() if k not in {"Authorization", "X-Amz-Date"}}
    again.pop("X-Amz-Security-Token", None)
    signer.sign(host_header(url), "/", again, body, credentials, "20240229T235958Z")
    assert again["Authorization"] == headers["Authorization"]


def test_a_new_day_or_secret_gets_a_new_signing_key() -> None:
    signer = SigV4Signer(REGION)
    signatures = set()
    for secret, stamp in [
        ("A", "20240229T235959Z"),
        ("A", "20240301T000000Z"),
        ("B", "20240301T000000Z"),
    ]:
        headers = {"Content-Type": "application/x-amz-json-1.0"}
        signer.sign("h", "/", headers, b"", ReadOnlyCredentials("K", secret, None), stamp)
        request = AWSRequest("POST", "http://h/", headers={"Content-Type": headers["Content-Type"]})
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            SigV4Auth(ReadOnlyCredentials("K", secret, None), "sqs", REGION).add_auth(request)
        assert headers["Authorization"] == request.headers["Authorization"]
        signatures.add(headers["Authorization"])
    assert len(signatures) == 3


def test_refreshed_credentials_sign_each_request_as_botocore_would() -> None:
    # GIVEN credentials that a refresh replaces (their expiry is always inside botocore's
    # refresh window, so every use refreshes them), and a server that keeps what it is sent
    issued: list[dict[str, str]] = []

    def refresh() -> dict[str, str]:
        n = len(issued)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        issued.append(
            {
                "access_key": f"AKID{n}",
                "secret_key": f"secret-{n}",
                "token": f"token-{n}",
                "expiry_time": expiry.isoformat(),
            }
        )
        return issued[-1]

    credentials = RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    with CannedServer(empty_receive) as server:
        lean = lean_sqs(boto_sqs(server.url), credentials)

        # WHEN the lean client makes two calls
        for _ in range(2):
            lean.receive_message(QueueUrl=f"{server.url}/1/q", **RECEIVE)

    # THEN each was signed with the credentials current then, exactly as botocore signs
    host = server.url.removeprefix("http://")
    keys = [s.headers["Authorization"].split("Credential=")[1].split("/")[0] for s in server.sent]
    assert keys == ["AKID1", "AKID2"]
    for sent, key in zip(server.sent, issued[1:], strict=True):
        assert sent.headers["X-Amz-Security-Token"] == key["token"]
        assert sent.headers["Authorization"] == botocore_signature(
            sent, host, key["secret_key"], key["token"]
        )
        assert sent.headers["X-Amz-Target"] == "AmazonSQS.ReceiveMessage"
        assert json.loads(sent.body)["MaxNumberOfMessages"] == 10


def test_no_credentials_is_botocores_error() -> None:
    with CannedServer(empty_receive) as server:
        lean = LeanSQS.like(boto_sqs(server.url), None)
        with pytest.raises(botocore.exceptions.NoCredentialsError):
            lean.receive_message(QueueUrl=f"{server.url}/1/q", **RECEIVE)
    assert server.sent == []


# --- the choice -----------------------------------------------------------------------------


def test_the_option_defaults_to_auto_and_names_itself_when_wrong() -> None:
    required = ["--queue-url", "https://sqs.us-east-1.amazonaws.com/1/q", "--output", "s3://feats/"]
    assert Config.from_args(required, {}).sqs_client == "auto"
    assert Config.from_args(required, {"BOTTLENECK_SQS_CLIENT": "lean"}).sqs_client == "lean"
    assert Config.from_args([*required, "--sqs-client", "boto3"], {}).sqs_client == "boto3"
    with pytest.raises(ConfigError, match="--sqs-client: must be one of auto, lean, boto3"):
        Config.from_args([*required, "--sqs-client", "botocore"], {})


def test_auto_is_lean_for_a_boto3_client_over_http(moto_server: str) -> None:
    sqs = boto_sqs(moto_server)
    assert isinstance(open_queue_client("auto", sqs), LeanSQS)
    assert isinstance(open_queue_client("lean", sqs), LeanSQS)
    assert open_queue_client("boto3", sqs) is sqs


@pytest.mark.usefixtures("aws")
def test_auto_keeps_boto3_under_moto_in_process() -> None:
    # moto's mock_aws answers inside botocore: the lean client's requests would miss it
    sqs = boto3.client("sqs", region_name=REGION)
    assert open_queue_client("auto", sqs) is sqs
    with pytest.raises(ConfigError, match="--sqs-client lean: moto"):
        open_queue_client("lean", sqs)


def test_auto_keeps_boto3_for_a_proxied_client_or_a_proxy_endpoint(
    moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    faulty = Faulty(boto_sqs(moto_server), {})
    assert open_queue_client("auto", faulty) is faulty
    with pytest.raises(ConfigError, match="not a boto3 client"):
        open_queue_client("lean", faulty)

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    behind_proxy = boto3.client("sqs", region_name=REGION)
    assert open_queue_client("auto", behind_proxy) is behind_proxy
    with pytest.raises(ConfigError, match="proxy"):
        open_queue_client("lean", behind_proxy)


# --- the consumer end to end ----------------------------------------------------------------


def test_the_consumer_runs_on_the_lean_client(moto_server: str, tmp_path: Path) -> None:
    # GIVEN twelve images and a message that is not one
    endpoint = Endpoint.create(moto_server, visibility=300)
    sent = enqueue(endpoint, 12)
    endpoint.sqs.send_message(QueueUrl=endpoint.queue_url, MessageBody="not a message")
    log = tmp_path / "consumer.log"

    # WHEN the consumer runs on the lean SQS client until the queue is idle
    process = endpoint.start("--sqs-client", "lean", "--idle-exit", "2", log=log)

    # THEN it says so, every image is written once, the queue is empty, and the bad message
    # went to the dead-letter queue with its reason
    assert process.wait(timeout=STARTUP + 60) == 0, log.read_text()[-3000:]
    ready = [doc for doc in log_lines(log) if doc.get("message") == "consumer ready"]
    assert ready and ready[0]["sqs_client"] == "lean", ready
    assert endpoint.versions() == {f"v1/{key}.npy": 1 for key in sent.values()}
    assert endpoint.counts() == (0, 0)
    assert summary(log)["messages"] == 13
    letters = endpoint.sqs.receive_message(
        QueueUrl=endpoint.dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )["Messages"]
    assert [m["Body"] for m in letters] == ["not a message"]
    assert letters[0]["MessageAttributes"]["error-code"]["StringValue"] == "bad-message"
