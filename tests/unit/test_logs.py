"""One JSON log format on every side: ``message``, a lower-case ``level``, fields at the top."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bottleneck_contract import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back what configure() changes on the root and the test logger."""
    root, named = logging.getLogger(), logging.getLogger("test_logs")
    saved = (list(root.handlers), root.level, list(named.handlers), named.level, named.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    named.handlers[:], named.level, named.propagate = saved[2], saved[3], saved[4]


def test_a_line_has_the_shared_keys_and_the_fields(restore_logging: None) -> None:
    # GIVEN a process configured to write into a stream
    stream = io.StringIO()
    logs.configure("INFO", stream)
    # WHEN a module logs with fields, and an exception with its traceback
    logs.log(logging.getLogger("test_logs"), logging.WARNING, "send-failed", key="a.jpg", code=7)
    try:
        raise ValueError("bad\n  value")
    except ValueError:
        logging.getLogger("test_logs").exception("crashed")
    # THEN each is one JSON line in the one format, the error on one line
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "send-failed"
    assert first["level"] == "warning"
    assert first["logger"] == "test_logs"
    assert (first["key"], first["code"]) == ("a.jpg", 7)
    assert first["time"].endswith("Z")
    assert "event" not in first
    assert second["level"] == "error"
    assert second["error"] == "ValueError: bad value"


def test_an_embedded_logger_writes_once_and_never_to_the_hosts_root(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a host (the Lambda runtime) with its own root handler
    host = io.StringIO()
    logs.configure("INFO", host)
    # WHEN a package configures its own logger twice (every invocation does) and logs
    logs.configure_logger("test_logs", logging.INFO)
    logger = logs.configure_logger("test_logs", logging.INFO)
    logs.log(logging.getLogger("test_logs.child"), logging.INFO, "scaled", jobs=2)
    # THEN one JSON line on stderr, nothing through the host's handler
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["scaled"]
    assert host.getvalue() == ""
    assert len(logger.handlers) == 1


def test_levels_may_be_names_or_numbers(restore_logging: None) -> None:
    logs.configure(logging.WARNING, io.StringIO())
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("botocore").level == logging.WARNING
    logs.configure("debug", io.StringIO())
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("botocore").level == logging.WARNING
