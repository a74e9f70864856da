"""Fixtures shared by every test layer: a fake AWS identity, moto in-process, a moto server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Set before anything imports timm or botocore: no hub downloads, no real AWS account.
os.environ["HF_HUB_OFFLINE"] = "1"
for _name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_name, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_REGION"] = "us-east-1"
for _name in [n for n in os.environ if n.startswith("AWS_ENDPOINT_URL")]:
    os.environ.pop(_name)

REGION = "us-east-1"


@pytest.fixture(autouse=True, scope="session")
def _moto_receives_each_message_once() -> None:
    """Every moto in the test process (in-process mocks and servers) takes each SQS message
    once per receive, as SQS all but always does; tests that need a duplicate inject it."""
    from consumer.embedded_moto import receive_each_message_once

    receive_each_message_once()


@pytest.fixture
def aws() -> Iterator[None]:
    """moto in-process for S3, SQS and Batch (Batch jobs are recorded, never run)."""
    from moto import mock_aws

    with mock_aws(config={"batch": {"use_docker": False}}):
        yield


@pytest.fixture
def moto_server() -> Iterator[str]:
    """A real HTTP endpoint on loopback; yields its URL. State is reset for every test."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # The server runs in this process and moto's backends are global: without a reset, buckets
    # and queues of an earlier test (or an in-process mock_aws) would still be there.
    _reset(url)
    try:
        yield url
    finally:
        _reset(url)
        server.stop()


def _reset(url: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
