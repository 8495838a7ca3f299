"""Log output: human-readable lines by default, one JSON object per line for machines.

Structured fields passed as ``extra=`` (``agent``, ``check``, ``status``, ``duration_ms``,
...) appear as keys in JSON; the text format already carries them in the message.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

__all__ = ["LOG_FORMATS", "JsonFormatter", "first_line", "setup_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields, "exc"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class OneLine(logging.Filter):
    """The AMQP libraries log a lost connection with a traceback (aiormq's reader, aio-pika's
    callbacks): a broker restart is not a bug, so their records keep one line, the
    exception's type and text appended (the traceback at DEBUG only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = record.name.split(".", 1)[0] in QUIET_TRACEBACKS
        if quiet and record.exc_info and record.levelno > logging.DEBUG:
            error = record.exc_info[1]
            if error is not None:
                record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
                record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


QUIET_TRACEBACKS = ("aiormq", "aio_pika", "faststream")


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if logging.getLevelName(level) != logging.DEBUG:
        handler.addFilter(OneLine())


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
