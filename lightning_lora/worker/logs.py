r"""Logging set-up of the worker: text or JSON lines, secrets masked, control characters escaped.

:func:`configure_logging` puts one handler on the root logger. Every record goes through
:class:`~lightning_lora.clients.redaction.RedactingFilter` first (secrets become ``***``), then
through the formatter, which escapes control characters and line separators, so that hostile text
(an S3 key with a U+2028, a ``\r\n`` followed by a fake record, an ANSI escape) can neither split a
record into several physical lines nor forge one. Escaping after redaction means an escape can never
cut a secret in two and let it through the mask.

* ``text``: ``%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s``; the message
  has every control character (category Cc: ``\n``, ``\r``, ``\t``, ESC, U+0085...) and
  every line or paragraph separator (Zl, Zp: U+2028, U+2029) written as a visible escape
  (``\n``, ``\x1b``, ``\u2028``). A traceback keeps its newlines; its other control
  characters are escaped the same way.
* ``json``: one JSON object per line, ASCII only (so every control character and separator is
  ``\uXXXX``-escaped by :func:`json.dumps`): ``ts`` (ISO-8601, UTC), ``level``, ``logger``,
  ``thread``, ``message``, the record's ``extra`` fields (``job_id``, ``style_id``...; strings
  redacted too) and ``exc``/``stack`` when the record has a traceback/stack.

The worker chooses the format with the ``LOG_FORMAT`` environment variable
(:data:`LOG_FORMAT_ENV_VAR`)::

    configure_logging(args.log_level, os.environ.get("LOG_FORMAT", "text"))
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from typing_extensions import override

from lightning_lora.clients.redaction import install_redaction, redact

__all__ = [
    "LOG_FORMATS",
    "LOG_FORMAT_ENV_VAR",
    "TEXT_FORMAT",
    "EscapingFormatter",
    "JsonFormatter",
    "configure_logging",
    "escape_control",
]

LOG_FORMAT_ENV_VAR = "LOG_FORMAT"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"

# Cc (C0, DEL, C1: includes U+0085 NEL) + Zl (U+2028) + Zp (U+2029): the whole of both categories
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE_RE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# attributes every LogRecord has: anything else on a record came from ``extra``
_RECORD_ATTRS = frozenset(
    {
        *logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)
_JSON_FIELDS = ("ts", "level", "logger", "thread", "message", "exc", "stack")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, *, keep_newlines: bool = False) -> str:
    r"""Replace control characters and line separators by visible escapes.

    Args:
        text: Any text.
        keep_newlines: Leave ``\n`` as is (for tracebacks, whose lines are ours).

    Returns:
        ``text`` with each character of categories Cc, Zl and Zp written as ``\n``, ``\r``,
        ``\t``, ``\xHH`` or ``\uHHHH``.
    """
    pattern = _CONTROL_BUT_NEWLINE_RE if keep_newlines else _CONTROL_RE
    return pattern.sub(_escape_char, text)


class EscapingFormatter(logging.Formatter):
    """A text formatter whose every record is one physical line (plus its own traceback lines).

    The formatted line (header and message) is escaped with :func:`escape_control`; the
    traceback and stack keep their newlines but have their other control characters escaped.
    """

    @override
    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` like :class:`logging.Formatter`, escaping as described above.

        Args:
            record: The record.

        Returns:
            The text to write.
        """
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape_control(self.formatMessage(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{escape_control(record.exc_text.rstrip(), keep_newlines=True)}"
        if record.stack_info:
            stack = self.formatStack(record.stack_info).rstrip()
            text = f"{text}\n{escape_control(stack, keep_newlines=True)}"
        return text


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of ASCII JSON (see the module's description)."""

    @override
    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as a JSON object on one line.

        Args:
            record: The record.

        Returns:
            The JSON text, without a newline.
        """
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[f"extra.{key}" if key in _JSON_FIELDS else key] = _json_safe(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, allow_nan=False, default=str)


def _json_safe(value: object) -> object:
    """An ``extra`` value as JSON can hold it, strings redacted (extras skip the filter)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    return redact(str(value))


class _WorkerHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (recognised when it is called again)."""


def configure_logging(
    level: str | int, fmt: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Set up the root logger for the worker.

    Replaces the handler a previous call installed (other handlers are left alone), sets the
    root level and installs :func:`~lightning_lora.clients.redaction.install_redaction` on the root
    logger and its handlers.

    Args:
        level: A level name (``"info"``, ``"DEBUG"``...; case does not matter) or number.
        fmt: ``"text"`` or ``"json"`` (case does not matter), usually the value of
            ``LOG_FORMAT``.
        stream: Where the lines go; ``sys.stdout`` (as it is at call time) when ``None``.

    Returns:
        The handler installed.

    Raises:
        ValueError: ``fmt`` is not a known format, or ``level`` not a known level.
    """
    kind = fmt.strip().lower() if isinstance(fmt, str) else fmt
    if kind not in LOG_FORMATS:
        raise ValueError(
            f"{LOG_FORMAT_ENV_VAR} must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}"
        )
    if isinstance(level, str):
        number = logging.getLevelNamesMapping().get(level.strip().upper())
        if number is None:
            raise ValueError(f"unknown log level {level!r} (try DEBUG, INFO, WARNING, ERROR)")
        level = number
    handler = _WorkerHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if kind == "json" else EscapingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _WorkerHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    install_redaction(root)
    return handler
