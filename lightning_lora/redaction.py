"""Redaction of secrets from text and log records.

Secrets reach this process through environment variables (the backend's API token, the AWS keys,
the RabbitMQ password). :func:`redact` replaces their current values, the password of any URL
with credentials (``amqp://user:password@host``) and any ``Bearer <token>`` with ``***``.
:class:`RedactingFilter` applies it to every log record that reaches a handler, and
:func:`install_redaction` puts that filter on a logger's handlers.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import unquote, urlsplit

__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "RedactingFilter",
    "install_redaction",
    "redact",
]

MASK = "***"

SECRET_ENV_VARS: tuple[str, ...] = (
    "INTERNAL_API_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "RABBITMQ_PASSWORD",
)
"""Environment variables whose values are always masked."""

URL_ENV_VARS: tuple[str, ...] = ("RABBITMQ_URL",)
"""Environment variables holding a URL whose password is masked."""

MIN_SECRET_LENGTH = 4
"""Shorter values are not masked: replacing e.g. every ``a`` would only mangle the text."""

_BEARER_RE = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/=]+")
# scheme://user:password@ -> the password group is masked, whatever the scheme (amqp, amqps,
# redis, http...). The password stops at the first '@' that is followed by a host.
_URL_PASSWORD_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)([^\s@/]+)(@)")


def _secret_values() -> list[str]:
    """Return the secret values currently set in the environment, longest first.

    Returns:
        Distinct values (raw and, for URL passwords, also percent-decoded), longest first so a
        secret containing another is masked as a whole.
    """
    values: set[str] = set()
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= MIN_SECRET_LENGTH:
            values.add(value)
    for name in URL_ENV_VARS:
        url = os.environ.get(name, "")
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            for candidate in (password, unquote(password)):
                if len(candidate) >= MIN_SECRET_LENGTH:
                    values.add(candidate)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Mask secrets in a piece of text.

    Masks the values of :data:`SECRET_ENV_VARS` as currently set in the environment, the
    password of ``RABBITMQ_URL``, the password part of any ``scheme://user:password@`` URL and
    the token of any ``Bearer <token>``.

    Args:
        text: Any text; non-strings are converted with ``str()``.

    Returns:
        The text with every secret replaced by ``***``.
    """
    if not isinstance(text, str):
        text = str(text)
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in a record's message, arguments and traceback.

    The record is rewritten in place (``msg`` becomes the redacted, fully formatted message and
    ``args`` is emptied) so that every handler and formatter after it sees only redacted text.
    It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place.

        Args:
            record: The record about to be emitted.

        Returns:
            Always ``True``.
        """
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a :class:`RedactingFilter` to a logger's handlers (and the logger itself).

    Calling it again adds nothing twice; handlers added later are covered by calling it again.

    Args:
        logger: The logger to protect; the root logger when ``None``.

    Returns:
        The filter in use.
    """
    target = logger if logger is not None else logging.getLogger()
    existing = next((f for f in target.filters if isinstance(f, RedactingFilter)), None)
    redacting = existing or RedactingFilter()
    if existing is None:
        target.addFilter(redacting)
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    return redacting
