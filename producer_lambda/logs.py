"""JSON log lines: one object per line on stderr, which Lambda and terminals both keep.

Every line has ``time``, ``level``, ``logger`` and ``event`` (a short stable word), plus the
keyword fields of the call, so CloudWatch Logs Insights can filter on them without parsing text.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["LOGGER_NAME", "JsonFormatter", "configure", "log"]

LOGGER_NAME = "producer_lambda"
_logger = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object; the call's ``fields`` become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (test capture replaces it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(level: int = logging.INFO) -> logging.Logger:
    """Attach the JSON handler to the ``producer_lambda`` logger once, and set its level.

    The logger does not propagate: the Lambda runtime's root handler would print every line a
    second time in its own text format.
    """
    if not any(isinstance(h, _StderrHandler) for h in _logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        _logger.addHandler(handler)
    _logger.setLevel(level)
    _logger.propagate = False
    return _logger


def log(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as one JSON line (if the logger is enabled for ``level``)."""
    _logger.log(level, event, extra={"fields": fields})
