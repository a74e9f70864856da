"""JSON logs, one format on every side: one object per line on stderr with ``time``, ``level``
(lower case), ``logger``, ``message`` (a short stable phrase) and the call's structured fields.

The consumer, the Lambda and the tools all write it, so that CloudWatch Logs Insights and ``jq``
query every component the same way without parsing prose. Call sites pass their fields as
``extra={"fields": {...}}``, or through :func:`log`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure", "configure_logger", "log"]

_NOISY = ("botocore", "boto3", "urllib3", "s3transfer", "timm", "PIL", "werkzeug")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line; exceptions become a one-line ``error`` field."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            doc["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return json.dumps(doc, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (test capture replaces it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _level(level: int | str) -> int:
    return level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]


def configure(level: int | str = "INFO", stream: TextIO | None = None) -> None:
    """A process's logging (the consumer, a tool): every record to ``stream`` (default: stderr)
    as JSON lines, through the root logger; chatty libraries quieted to WARNING at least."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level(level))
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, _level(level)))


def configure_logger(name: str, level: int | str = logging.INFO) -> logging.Logger:
    """One package's logging inside a host that owns the root logger (the Lambda runtime): the
    JSON handler on logger ``name`` once, and no propagation, or the runtime's root handler would
    print every line a second time in its own text format."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(_level(level))
    logger.propagate = False
    return logger


def log(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` as top-level keys of its JSON line."""
    logger.log(level, message, extra={"fields": fields})
