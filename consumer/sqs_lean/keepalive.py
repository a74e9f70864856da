"""HTTP/1.1 POSTs to one endpoint over kept-alive connections, for the lean SQS client.

urllib3 and ``http.client`` cost a few hundred microseconds of Python per request (header
objects, the ``email`` package's header parser, response wrappers); a request here is one
``sendall`` and its response is parsed from a ``recv`` or two. Failures are raised as botocore's
own exceptions, mapped as its urllib3 session maps them, so that callers cannot tell the two apart.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import botocore.exceptions

_RECV_BYTES = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names in lowercase
    body: bytes


class _ResponseEnded(Exception):
    """The connection ended before a whole response arrived."""


class KeepAliveHttp:
    """HTTP/1.1 POSTs to one endpoint over kept-alive connections (TLS for ``https``).

    Small on purpose: requests carry a ``Content-Length`` body; responses may be framed by
    ``Content-Length``, chunked, or the end of the connection. An idle connection that the server
    has closed (or that has unread bytes) is dropped before reuse, as urllib3 does; one that fails
    under a request is closed and the failure raised as botocore raises it (``auto`` keeps boto3
    wherever a proxy would be needed). Thread-safe: each request has a connection to itself.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        tls: ssl.SSLContext | None = None,
        tcp_keepalive: bool = False,
        max_idle: int = 10,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.address = (parts.hostname or "", parts.port or _DEFAULT_PORTS[parts.scheme])
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls if parts.scheme == "https" else None
        self.tcp_keepalive = tcp_keepalive
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def post(self, head: bytes, body: bytes) -> HttpResponse:
        """Send ``head`` (request line and headers, ending in an empty line) and ``body``."""
        sock = self._idle_connection() or self._connect()
        try:
            sock.sendall(head + body)
            response, reusable = _read_response(sock)
        except Exception as exc:
            sock.close()
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from exc
        except BaseException:
            sock.close()
            raise
        if reusable:
            self._release(sock)
        else:
            sock.close()
        return response

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _idle_connection(self) -> socket.socket | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if _still_open(sock):
                return sock
            sock.close()

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=self.url, error=exc) from exc
        except OSError as exc:
            raise botocore.exceptions.EndpointConnectionError(
                endpoint_url=self.url, error=exc
            ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.address[0])
            sock.settimeout(self.read_timeout)
        except ssl.SSLError as exc:
            sock.close()
            raise botocore.exceptions.SSLError(endpoint_url=self.url, error=exc) from exc
        except TimeoutError as exc:
            sock.close()
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=self.url, error=exc) from exc
        except OSError as exc:
            sock.close()
            raise botocore.exceptions.EndpointConnectionError(
                endpoint_url=self.url, error=exc
            ) from exc
        return sock

    def _translate(self, exc: Exception) -> Exception | None:
        """botocore's exception for a failure under a request, as its urllib3 session maps it."""
        if isinstance(exc, TimeoutError):
            return botocore.exceptions.ReadTimeoutError(endpoint_url=self.url, error=exc)
        if isinstance(exc, ssl.SSLError):
            return botocore.exceptions.SSLError(endpoint_url=self.url, error=exc)
        if isinstance(exc, OSError | _ResponseEnded | ValueError):
            return botocore.exceptions.ConnectionClosedError(endpoint_url=self.url, error=exc)
        return None


def _still_open(sock: socket.socket) -> bool:
    # An idle connection must have nothing to read: readable means the server closed it (or
    # sent what no request asked for); either way it cannot carry a request.
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()  # not select(): the process may have more than 1024 descriptors
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


def _read_response(sock: socket.socket) -> tuple[HttpResponse, bool]:
    """One response from ``sock``, and whether the connection can carry another request."""
    buffer = bytearray()  # appended to in place: a large body is not copied once per recv
    while True:  # informational (1xx) responses come before the real one
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += _recv(sock)
        lines = buffer[:end].decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
        if status >= 200:
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(sock, buffer)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffer) < length:
            buffer += _recv(sock)
        body = bytes(buffer[:length])
        del buffer[:length]
    else:  # framed by the end of the connection
        keep = False
        while chunk := sock.recv(_RECV_BYTES):
            buffer += chunk
        body = bytes(buffer)
        buffer.clear()
    return HttpResponse(status, headers, body), keep and not buffer


def _read_chunked(sock: socket.socket, buffer: bytearray) -> bytes:
    """A chunked body; what follows it stays in ``buffer``."""
    body = bytearray()
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            buffer += _recv(sock)
        size = int(buffer[:end].split(b";", 1)[0], 16)
        del buffer[: end + 2]
        if size == 0:
            while (end := buffer.find(b"\r\n")) != 0:  # trailers, then the empty line
                if end < 0:
                    buffer += _recv(sock)
                else:
                    del buffer[: end + 2]
            del buffer[:2]
            return bytes(body)
        while len(buffer) < size + 2:
            buffer += _recv(sock)
        body += buffer[:size]
        del buffer[: size + 2]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(_RECV_BYTES)
    if not data:
        raise _ResponseEnded("the connection closed mid-response")
    return data
