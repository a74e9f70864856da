"""CPU and GIL per SQS call: the consumer's boto3 client against its lean client.

``python -m benchmarks.sqs_cpu`` starts a moto server in a separate process (its CPU is not
counted), then for each client and each of the hot path's calls makes ``--warmup`` calls, then
``--calls`` measured ones, one at a time, exactly as :class:`consumer.sqs.WorkQueue` makes them:

* ``ReceiveMessage``: 10 messages of the contract's size, with the attributes the receivers ask
  for (the queue holds 10; a visibility timeout of 0 hands the same ones out again);
* ``DeleteMessageBatch``: the 10 receipt handles of messages received beforehand (the first
  call deletes them; SQS, and moto, answer a delete of a deleted message's handle as done, so
  every call gets the same answer: 10 ``Successful``);
* ``ChangeMessageVisibilityBatch``: the heartbeat's extension of 10 held messages.

Figures, as :mod:`benchmarks.s3_cpu` takes them (:func:`benchmarks.s3_cpu.measure`): **CPU ms per
call** (this process, every thread), **GIL ms per call** (py-spy ``--gil`` on the calling thread,
corrected for time preempted), the lowest of ``--repeat`` rounds. Each is taken twice: straight to
moto, whose development server closes the connection after every response (so every call also
connects, as the feed row's calls do), and through a keep-alive proxy in another process, as
AWS's endpoints keep connections open (``--connections``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import boto3

from benchmarks.moto_keepalive import MotoServer
from benchmarks.s3_cpu import measure
from consumer.aws import make_clients
from consumer.sqs_lean import LeanSQS

BATCH = 10
# What the receivers ask for (consumer.sqs.WorkQueue.receive).
RECEIVE = {
    "MaxNumberOfMessages": BATCH,
    "WaitTimeSeconds": 0,
    "MessageSystemAttributeNames": ["ApproximateReceiveCount", "SentTimestamp"],
    "MessageAttributeNames": ["All"],
}


def body(i: int) -> str:
    """A message of the contract's size: an S3 event for one upload."""
    return json.dumps(
        {
            "Records": [
                {
                    "eventSource": "aws:s3",
                    "eventName": "ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": "images"},
                        "object": {
                            "key": f"photos/2024/05/{i:06d}.jpg",
                            "size": 61234,
                            "eTag": "9b2cf535f27731c974343645a3985328",
                            "sequencer": "0062E99A88DC407460",
                        },
                    },
                }
            ]
        }
    )


def send(sqs: Any, queue_url: str, count: int) -> None:
    for start in range(0, count, BATCH):
        entries = [
            {"Id": str(i), "MessageBody": body(start + i)} for i in range(min(BATCH, count - start))
        ]
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)


def held_batches(sqs: Any, queue_url: str, batches: int) -> list[list[str]]:
    """Receipt handles of ``batches * 10`` messages received (held for an hour), 10 a batch
    (few: moto's receive slows down with the queue's length, 0.45 s a call at 1,000)."""
    send(sqs, queue_url, batches * BATCH)
    handles: list[str] = []
    while len(handles) < batches * BATCH:
        got = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=BATCH, VisibilityTimeout=3600
        )
        handles += [m["ReceiptHandle"] for m in got.get("Messages", [])]
    return [handles[i : i + BATCH] for i in range(0, len(handles), BATCH)]


def operations(
    client: Any, setup: Any, name: str, calls: int, warmup: int
) -> Iterator[tuple[str, Callable[[], Callable[[int], object]]]]:
    """(call, a factory of ``call(i)``): each factory prepares a fresh queue first."""
    serial = iter(range(1_000_000))

    def queue() -> str:
        url: str = setup.create_queue(QueueName=f"bench-{name}-{next(serial)}")["QueueUrl"]
        return url

    def receive() -> Callable[[int], object]:
        url = queue()
        send(setup, url, BATCH)
        return lambda i: client.receive_message(QueueUrl=url, VisibilityTimeout=0, **RECEIVE)

    def delete() -> Callable[[int], object]:
        url = queue()
        (held,) = held_batches(setup, url, 1)
        return lambda i: client.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(held)],
        )

    def extend() -> Callable[[int], object]:
        url = queue()
        (held,) = held_batches(setup, url, 1)
        entries = [
            {"Id": str(n), "ReceiptHandle": h, "VisibilityTimeout": 3600}
            for n, h in enumerate(held)
        ]
        return lambda i: client.change_message_visibility_batch(QueueUrl=url, Entries=entries)

    yield "ReceiveMessage 10", receive
    yield "DeleteMessageBatch 10", delete
    yield "ChangeMessageVisibilityBatch 10", extend


def check(response: Any) -> None:
    """A measured call must have done its work: 10 messages, or 10 entries done."""
    done = response.get("Messages") or response.get("Successful") or []
    if len(done) != BATCH or response.get("Failed"):
        raise RuntimeError(f"a measured call did not do its work: {str(response)[:300]}")


@contextlib.contextmanager
def keep_alive_proxy(upstream: str) -> Iterator[str]:
    """:func:`serve_proxy` in its own process (its CPU is not counted); yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sqs_cpu", "--serve-proxy", upstream, str(port)]
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the keep-alive proxy did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def serve_proxy(upstream: str, port: int) -> None:
    """Forward POSTs to ``upstream``, answering over kept-alive HTTP/1.1 connections."""
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are two writes: with Nagle's algorithm on, the body would wait for
        # the client's delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            connection = http.client.HTTPConnection(target.hostname or "", target.port)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request("POST", self.path, data, headers)
                response = connection.getresponse()
                answer = response.read()
            finally:
                connection.close()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in {"connection", "content-length", "transfer-encoding"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqs_cpu", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="measured calls (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="calls before (default 30)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measure each figure this many times and keep the lowest (default 3)",
    )
    parser.add_argument(
        "--connections",
        choices=("both", "new", "kept"),
        default="both",
        help="new: straight to moto, a connection per call; kept: through a keep-alive proxy",
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument(
        "--serve-proxy", nargs=2, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_proxy:
        serve_proxy(args.serve_proxy[0], int(args.serve_proxy[1]))
        return 0
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    load = os.getloadavg()
    # Straight to moto's own server, which closes every connection ("new"); "kept" goes
    # through this module's keep-alive proxy in front of it.
    with MotoServer(keep_alive=False) as server:
        url = server.url
        setup = boto3.client("sqs", endpoint_url=url)
        kinds = ("new", "kept") if args.connections == "both" else (args.connections,)
        for kind in kinds:
            with contextlib.ExitStack() as stack:
                endpoint = url if kind == "new" else stack.enter_context(keep_alive_proxy(url))
                results[kind] = measure_clients(endpoint, setup, args)
    if args.json:
        print(json.dumps({"calls": args.calls, "load_average": load[0], "results": results}))
        return 0
    print(f"load average before: {load[0]:.2f}; {args.calls} calls per round, {args.repeat} rounds")
    print(
        f"{'call':<32} {'connection':<10} {'client':<6} {'CPU ms':>7} {'GIL ms':>7} {'wall ms':>8}"
    )
    for kind, by_call in results.items():
        for call, by_client in by_call.items():
            for name, numbers in by_client.items():
                print(
                    f"{call:<32} {kind:<10} {name:<6} {numbers['cpu_ms']:>7.3f} "
                    f"{numbers.get('gil_ms', float('nan')):>7.3f} {numbers['wall_ms']:>8.3f}"
                )
    return 0


def measure_clients(endpoint: str, setup: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every call, through the consumer's boto3 client and its lean client on ``endpoint``."""
    session = boto3.Session()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        sqs = make_clients(pool_size=40, session=session).sqs
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    clients = {"boto3": sqs, "lean": LeanSQS.like(sqs, session.get_credentials())}
    results: dict[str, dict[str, Any]] = {}
    for name, client in clients.items():
        for call, prepare in operations(client, setup, name, args.calls, args.warmup):
            rounds = []
            for _ in range(args.repeat):
                make_call = prepare()
                check(make_call(0))
                rounds.append(measure(make_call, args.calls, args.warmup))
            results.setdefault(call, {})[name] = {
                figure: min(r[figure] for r in rounds) for figure in rounds[0]
            }
    return results


if __name__ == "__main__":
    raise SystemExit(main())
