"""The Spot watch against a local fake instance metadata service (IMDSv2)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from consumer.config import Config
from consumer.spot import SpotWatch

NOTICE = {"action": "terminate", "time": "2026-11-25T08:22:00Z"}


class FakeMetadata:
    """Answers like EC2's metadata service: a token on PUT, 404 until a notice is posted."""

    def __init__(self) -> None:
        self.notice: dict[str, str] | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                fake.requests.append(("PUT", self.path, None))
                ok = self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                )
                self._reply(200 if ok else 400, b"token-123")

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                fake.requests.append(("GET", self.path, token))
                if token != "token-123":
                    self._reply(401, b"")
                elif self.path == "/latest/meta-data/spot/instance-action" and fake.notice:
                    self._reply(200, json.dumps(fake.notice).encode())
                else:
                    self._reply(404, b"Not Found")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    fake = FakeMetadata()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()


def test_no_notice_means_no_stop(metadata: FakeMetadata) -> None:
    watch = SpotWatch(metadata.url, lambda reason: None)

    assert watch.check() is None
    assert ("GET", "/latest/meta-data/spot/instance-action", "token-123") in metadata.requests


def test_a_posted_notice_starts_the_graceful_stop(metadata: FakeMetadata) -> None:
    # GIVEN a watch polling every 50 ms and no notice yet
    stopped = threading.Event()
    reasons: list[str] = []

    def on_notice(reason: str) -> None:
        reasons.append(reason)
        stopped.set()

    watch = SpotWatch(metadata.url, on_notice, interval=0.05)
    watch.start()
    assert not stopped.wait(0.3)
    # WHEN EC2 posts the two-minute notice
    metadata.notice = NOTICE
    # THEN the watch asks for the stop once, with the notice kept for the logs
    assert stopped.wait(5)
    watch.join(5)
    assert reasons == ["spot-interruption"]
    assert watch.notice == NOTICE
    # AND it used IMDSv2: one token request for all its polls
    assert sum(1 for method, _, _ in metadata.requests if method == "PUT") == 1


def test_an_unreachable_endpoint_is_not_a_notice() -> None:
    watch = SpotWatch("http://127.0.0.1:9", lambda reason: None)

    assert watch.check() is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({"AWS_BATCH_JOB_ID": "abc"}, ("on", "emf")), ({}, ("off", "off"))],
)
def test_spot_watch_and_metrics_are_on_by_default_inside_batch(
    environ: dict[str, str], expected: tuple[str, str]
) -> None:
    argv = ["--queue-url", "https://sqs.us-east-1.amazonaws.com/123456789012/q"]
    config = Config.from_args([*argv, "--output", "s3://feats/x/"], environ)

    assert (config.spot_watch, config.metrics) == expected


def test_explicit_off_wins_inside_batch() -> None:
    argv = ["--queue-url", "https://sqs.us-east-1.amazonaws.com/123456789012/q"]
    config = Config.from_args(
        [*argv, "--output", "s3://feats/x/", "--spot-watch", "off"], {"AWS_BATCH_JOB_ID": "abc"}
    )

    assert config.spot_watch == "off"
    assert config.metadata_endpoint == "http://169.254.169.254"
