"""moto's server with kept-alive connections, as AWS's endpoints keep them.

moto's ``ThreadedMotoServer`` runs on werkzeug's development server, which answers every request
with ``Connection: close`` (and after each response drains whatever the client sent next, which
rules out reusing the connection). A client of it connects for every call: a TCP handshake, a new
socket in the client's pool and the teardown, CPU that a consumer talking to S3 and SQS over
pooled connections never spends, and that a benchmark measuring the consumer's CPU per image
would charge to the consumer.

:class:`KeepAliveHandler` serves moto's WSGI application over HTTP/1.1 from the standard
library's request handler: it reads each request's body in full (``Content-Length`` or chunked;
``Expect: 100-continue`` is answered by the standard library), builds the WSGI environ as
werkzeug does, and answers with a ``Content-Length``, so the connection is ready for the next
request. Run as ``python -m benchmarks.moto_keepalive``: it prints its port, and stops when its
stdin closes.

Both servers also get :func:`lighten_receive`: moto 5.2's ReceiveMessage rebuilt the queue's
whole attribute map, three scans of every message in the queue, for each message it returned, so
its CPU grew with the queue's length; a benchmark that queues a thousand messages first spent
most of the moto server's CPU there, on the two cores the consumer being measured runs on. They
get :func:`lighten_scans` too: routing a request listed moto's package directory (182 ``isdir``
calls per request), a receive read the clock twice per queued message and a delete scanned the
queue twice, 45 % of the server's CPU per image in the feed row. And both take each message once
per receive (:mod:`consumer.embedded_moto`): moto's two receives at once could return the same
message, which the consumer takes for a redelivery.
"""

from __future__ import annotations

import contextlib
import functools
import io
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from consumer.embedded_moto import receive_each_message_once

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Headers the handler sets itself: the body is whole, its length known, the connection kept.
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive"}


def _latin1(text: str) -> str:
    """WSGI's str for a URL part: the UTF-8 bytes read as latin-1 (werkzeug does the same)."""
    return text.encode("utf-8").decode("latin-1")


class KeepAliveHandler(BaseHTTPRequestHandler):
    """A WSGI application (``app``) over kept-alive HTTP/1.1 connections."""

    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: with Nagle's algorithm the body would wait for the
    # client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    app: App

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _environ(self, body: bytes) -> dict[str, Any]:
        url = urlsplit(self.path)
        host, port = self.server.server_address[:2]  # type: ignore[index,str-unpack]
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": _latin1(unquote(url.path)),
            "QUERY_STRING": _latin1(url.query),
            "REQUEST_URI": _latin1(self.path),
            "RAW_URI": _latin1(self.path),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": self.client_address[1],
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "CONTENT_LENGTH": str(len(body)),
        }
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            if "_" in name or key in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue
            key = key if key == "CONTENT_TYPE" else f"HTTP_{key}"
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _run(self) -> None:
        environ = self._environ(self._body())
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], _exc: Any = None) -> Any:
            started[:] = [status, headers]
            return lambda data: None  # moto never uses write()

        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = started
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        length = str(len(body))
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = value  # a HEAD's length is the object's, and no body follows
            elif name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # The standard library dispatches to do_<METHOD>: every method is the application's.
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _run  # noqa: N815


def lighten_receive() -> None:
    """Make moto's SQS ReceiveMessage check each message's retention period in constant time.

    moto 5.2 reads the period through ``get_queue_attributes``, which builds every attribute of
    the queue, ``ApproximateNumberOfMessages*`` included: three list comprehensions over every
    message in the queue, three times for each message a receive returns. With the feed row's
    thousand queued messages that was 58 % of the server's py-spy samples: 25 ms of CPU per
    image, 4 to 5 without it. The period is the queue's own attribute, read the same way; the
    answers do not change. Idempotent; it patches moto for the process.
    """
    from moto.core.utils import unix_time
    from moto.sqs.models import SQSBackend

    # moto's types say neither attribute exists (they are set from the queue's attributes).
    def is_message_valid_based_on_retention_period(
        self: SQSBackend, queue_name: str, message: Any
    ) -> bool:
        queue: Any = self.get_queue(queue_name)
        return bool(
            int(queue.message_retention_period) + message.sent_timestamp / 1000 > unix_time()
        )

    SQSBackend.is_message_valid_based_on_retention_period = (  # type: ignore[method-assign]
        is_message_valid_based_on_retention_period
    )


def lighten_scans() -> None:
    """Take three scans out of moto 5.2's every request, receive and delete; answers unchanged.

    - **Dispatch.** To route a request, moto asks ``backends.list_of_moto_modules()``, which
      lists moto's package directory and calls ``isdir`` on each of its 182 entries, once per
      S3 or SQS request, under the dispatcher's lock. The directory does not change while the
      server runs: it is listed once.
    - **Receive.** ``Queue.messages`` (every receive, and every wake-up of a long poll) reads
      the clock twice per queued message, each through ``datetime`` arithmetic: with the feed
      row's 1,948 queued messages, most of the receive's CPU. The clock is read once per scan,
      and each message compared with it as moto compares (visible after ``visible_at``, no
      longer delayed at ``delayed_until``).
    - **Delete.** ``Queue.delete_message`` scanned the queue twice for the message that had the
      receipt handle, building a list of its handles per message: two scans of the queue per
      image. A handle is now looked up where :meth:`Message.mark_received` made it, and the
      queue gets a new list without its message, as moto's does. Where the lookup does not
      find a message of this queue (an invalid handle, but also one made before the patch,
      one that moto's seeded random also gave a message of another queue, or one a concurrent
      receive marked over), moto's own delete decides, scans and all: it costs only on those.
      (Seeded, two messages of one queue can share a handle: moto deletes both, this the one
      that received it last. The benchmarks never seed.)

    On AWS none of this runs on the consumer's cores; here it ran on the two the consumer is
    measured on. Idempotent; it patches moto for the process.
    """
    import weakref

    from moto import backends
    from moto.core.utils import unix_time_millis
    from moto.sqs.models import Message, Queue

    if getattr(Queue.delete_message, "lightened", False):
        return
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules

    def messages(self: Queue) -> list[Message]:
        now = unix_time_millis()
        return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]

    handles: weakref.WeakValueDictionary[str, Message] = weakref.WeakValueDictionary()
    mark_received = Message.mark_received
    delete = Queue.delete_message

    @functools.wraps(mark_received)
    def marked(self: Message, visibility_timeout: int | None = None) -> None:
        mark_received(self, visibility_timeout)
        assert self.receipt_handle is not None  # mark_received has just made it
        handles[self.receipt_handle] = self

    def delete_message(self: Queue, receipt_handle: str) -> None:
        if receipt_handle in self.deleted_messages:
            return  # already deleted: moto lets a second delete pass
        message = handles.get(receipt_handle)
        # One copy, checked and cut: a delete, purge or dead-letter move in another thread
        # between a check on the queue and a cut of a later copy would fail the `remove`.
        remaining = list(self._messages)
        # Message defines no __eq__: `in` compares identities, at C speed.
        if message is None or message not in remaining:
            delete(self, receipt_handle)  # moto's own answer, valid or not
            return
        self.pending_messages.discard(message)
        self.deleted_messages.update(message.all_receipt_handles)  # type: ignore[arg-type]
        remaining.remove(message)
        self._messages = remaining

    delete_message.lightened = True  # type: ignore[attr-defined]
    Queue.messages = property(messages)  # type: ignore[assignment,method-assign]
    Message.mark_received = marked  # type: ignore[method-assign]
    Queue.delete_message = delete_message  # type: ignore[method-assign]


def patch_moto() -> None:
    """What both benchmark servers do to moto: receives lightened (:func:`lighten_receive`),
    three scans of the queue or of moto's package taken out (:func:`lighten_scans`), and each
    message taken once (:mod:`consumer.embedded_moto`). Idempotent, for the process."""
    lighten_receive()
    lighten_scans()
    receive_each_message_once()


def serve(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """moto's application on a threaded keep-alive server (not yet serving), patched
    (:func:`patch_moto`)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    patch_moto()
    app = DomainDispatcherApplication(create_backend_app)

    class MotoHandler(KeepAliveHandler):
        pass

    MotoHandler.app = app
    server = ThreadingHTTPServer((host, port), MotoHandler)
    server.daemon_threads = True
    return server


# --- the client side: the server in a child process, whose CPU is not the caller's --------
_MOTO_SCRIPT = """
import logging, sys
from moto.server import ThreadedMotoServer
from benchmarks.moto_keepalive import patch_moto
logging.getLogger("werkzeug").setLevel(logging.ERROR)
patch_moto()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


class MotoServer:
    """moto's server on 127.0.0.1 in a child process: its CPU is not ours.

    ``keep_alive`` (the default) serves kept-alive connections, as AWS does
    (:mod:`benchmarks.moto_keepalive`); otherwise ``ThreadedMotoServer``, which closes every one.
    """

    def __init__(self, keep_alive: bool = True) -> None:
        command = ["-m", "benchmarks.moto_keepalive"] if keep_alive else ["-c", _MOTO_SCRIPT]
        self.keep_alive = keep_alive
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],  # the repository: benchmarks is importable
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start (said {line!r})")
        self.url = f"http://127.0.0.1:{line}"

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    server = serve()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
