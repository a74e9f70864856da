"""A fault-injecting proxy around boto3 clients: chosen operations fail on chosen call numbers.

``Faulty(client, {"put_object": Fault("throttle", calls={2, 3})})`` behaves like ``client``
except that the 2nd and 3rd ``put_object`` calls raise what AWS sends when it throttles.
``Fault("server", every=3)`` fails every third call instead, and ``key="a.jpg"`` counts (and
fails) only the calls on that object key, so that one image's retries can be exhausted whatever
the other threads do. Kinds:

- ``throttle``: ``SlowDown`` / HTTP 503 (S3) or ``ThrottlingException`` / 400 (SQS);
- ``server``: ``InternalError`` (S3) or ``InternalFailure`` (SQS) / HTTP 500;
- ``reset``: the connection closed under the request (``ConnectionClosedError``);
- ``unreachable``: no connection at all (``EndpointConnectionError``);
- ``conflict``: ``ConditionalRequestConflict`` / HTTP 409 (S3's concurrent conditional writes);
- ``partial``: for ``*_batch`` operations, the first entry comes back in ``Failed`` (an
  ``InternalError`` on SQS's side) and is not carried out; the others are;
- ``stale``: like ``partial``, but the entry fails with ``ReceiptHandleIsInvalid`` (the message
  has been delivered to someone else since).

``after=True`` carries the call out first and then raises: the request reached AWS but the
response was lost (a reset while reading it), so a retry repeats a call that already happened.

The proxy bypasses the client's own (botocore) retries: every injected fault reaches the
consumer's code, which must cope with it. It counts calls and injections so that a test can show
that its faults really happened.

:class:`FaultyEndpoint` injects the same plans one level lower, for clients that cannot be
proxied in Python (obstore's requests are made in Rust): an HTTP reverse proxy on loopback in front
of a moto server answers the planned S3 requests with the error status and body S3 sends, or
breaks their connection. The client's own retries then do see the faults. Its extra kinds:

- ``closed``: the connection is closed (FIN) without a response, as when a load balancer drops
  an idle keep-alive connection just as a request goes out;
- ``denied``: ``AccessDenied`` / 403; ``archived``: ``InvalidObjectState`` / 403 (a GET of an
  object in an archive storage class);
- ``hang``: no answer at all until the proxy stops (a server that never responds, a request
  stuck in the network).

There, ``reset`` aborts the connection (RST) where a response was due.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import botocore.exceptions

KINDS = (
    "throttle",
    "server",
    "reset",
    "closed",
    "unreachable",
    "conflict",
    "denied",
    "archived",
    "partial",
    "stale",
    "hang",
)


@dataclass(frozen=True)
class Fault:
    """Fail the calls numbered in ``calls`` (1-based), or every ``every``-th call, with ``kind``."""

    kind: str
    calls: Collection[int] = ()
    every: int = 0
    limit: int = 1_000_000  # at most this many injections
    after: bool = False  # carry the call out, then fail (the response was lost)
    key: str | None = None  # only calls with this ``Key`` count

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not self.calls and self.every <= 0:
            raise ValueError("a fault needs call numbers or every=N")

    def due(self, number: int) -> bool:
        return number in self.calls or (self.every > 0 and number % self.every == 0)


def client_error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    """The exception botocore raises for an AWS error response."""
    response: Any = {
        "Error": {"Code": code, "Message": f"injected {code}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, operation)


_ERRORS = {
    ("s3", "throttle"): ("SlowDown", 503),
    ("sqs", "throttle"): ("ThrottlingException", 400),
    ("s3", "server"): ("InternalError", 500),
    ("sqs", "server"): ("InternalFailure", 500),
    ("s3", "conflict"): ("ConditionalRequestConflict", 409),
    ("s3", "denied"): ("AccessDenied", 403),
    ("s3", "archived"): ("InvalidObjectState", 403),
}
_FAILED_ENTRY = {
    "partial": ("InternalError", False),
    "stale": ("ReceiptHandleIsInvalid", True),
}


class Faulty:
    """Proxy a boto3 client; inject the planned faults; count calls and injections."""

    def __init__(self, client: Any, plan: dict[str, Fault]) -> None:
        self._client = client
        self._plan = plan
        self._service = client.meta.service_model.service_name
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        fault = self._plan.get(name)
        if fault is None or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if fault.key is not None and kwargs.get("Key") != fault.key:
                return attribute(*args, **kwargs)
            with self._lock:
                self.calls[name] += 1
                due = fault.due(self.calls[name]) and self.injected[name] < fault.limit
                if due:
                    self.injected[name] += 1
            if not due:
                return attribute(*args, **kwargs)
            return self._inject(name, fault, attribute, kwargs)

        return call

    def _inject(self, name: str, fault: Fault, attribute: Any, kwargs: dict[str, Any]) -> Any:
        if fault.kind in _FAILED_ENTRY:
            return self._failed_entry(fault.kind, attribute, kwargs)
        if fault.after:
            attribute(**kwargs)
        operation = "".join(part.title() for part in name.split("_"))
        if fault.kind in {"reset", "closed"}:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="http://injected")
        if fault.kind == "unreachable":
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://injected")
        code, status = _ERRORS[(self._service, fault.kind)]
        raise client_error(code, status, operation)

    @staticmethod
    def _failed_entry(kind: str, attribute: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        first, *rest = kwargs["Entries"]
        response = attribute(**{**kwargs, "Entries": rest}) if rest else {}
        code, sender_fault = _FAILED_ENTRY[kind]
        failed = {
            "Id": first["Id"],
            "SenderFault": sender_fault,
            "Code": code,
            "Message": f"injected {code}",
        }
        return {
            "Successful": list(response.get("Successful", [])),
            "Failed": [*response.get("Failed", []), failed],
        }


class FaultyEndpoint:
    """An HTTP proxy on loopback in front of an S3 endpoint that injects the planned faults.

    ``with FaultyEndpoint(moto_url, {"put_object": Fault("throttle", every=2)}) as proxy:``
    then point a client at ``proxy.url``. Requests are named as boto3 names them (``get_object``,
    ``head_object``, ``put_object``; path-style addressing); other requests pass through.
    """

    def __init__(self, upstream: str, plan: dict[str, Fault]) -> None:
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.stopped = threading.Event()  # what ``hang`` waits for
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def __enter__(self) -> FaultyEndpoint:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def due(self, operation: str, key: str) -> Fault | None:
        """Count the call; the fault to inject now, if any."""
        fault = self.plan.get(operation)
        if fault is None or (fault.key is not None and key != fault.key):
            return None
        with self._lock:
            self.calls[operation] += 1
            if not fault.due(self.calls[operation]) or self.injected[operation] >= fault.limit:
                return None
            self.injected[operation] += 1
        return fault

    def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=30
        )
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in {"content-length", "transfer-encoding", "connection"}:
                    connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()


def _operation(method: str, path: str) -> tuple[str, str]:
    """(boto3's name for an S3 request, its object key) under path-style addressing."""
    parts = urlsplit(path)
    _bucket, _, key = parts.path.lstrip("/").partition("/")
    if not key or parts.query:
        return (f"{method.lower()}-bucket-or-subresource", "")
    names = {"GET": "get_object", "HEAD": "head_object", "PUT": "put_object"}
    return names.get(method, f"{method.lower()}_object"), unquote(key)


_STATUS_ERRORS = {kind: code for (service, kind), code in _ERRORS.items() if service == "s3"}


def _handler(endpoint: FaultyEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._proxy()

        def do_HEAD(self) -> None:
            self._proxy()

        def do_PUT(self) -> None:
            self._proxy()

        def do_POST(self) -> None:
            self._proxy()

        def do_DELETE(self) -> None:
            self._proxy()

        def _proxy(self) -> None:
            body = self._body()
            operation, key = _operation(self.command, self.path)
            fault = endpoint.due(operation, key)
            if fault is not None and not fault.after:
                return self._inject(fault)
            status, reason, headers, data = endpoint.forward(
                self.command, self.path, list(self.headers.items()), body
            )
            if fault is not None:  # carried out, then the response is lost
                return self._inject(fault)
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                    self.send_header(name, value)
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return None

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in {b"\r\n", b"\n", b""}:
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _inject(self, fault: Fault) -> None:
            if fault.kind == "hang":
                endpoint.stopped.wait()
                self.close_connection = True
                return
            if fault.kind in {"reset", "closed", "unreachable"}:
                if fault.kind == "reset":
                    # Linger 0: close() sends RST, "connection reset by peer" for the client.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.connection.close()
                self.close_connection = True
                return
            code, status = _STATUS_ERRORS[fault.kind]
            payload = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n'
                + f"<Error><Code>{code}</Code><Message>injected {code}</Message>"
                f"<RequestId>injected</RequestId></Error>".encode()
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
