"""Redaction of secrets from text and log records.

Secrets reach this process through environment variables (the backend's API token, the AWS keys,
the Hugging Face token, the RabbitMQ password...) and through settings files or arguments (a
token given on the command line, the webhook signing secret). :func:`redact` replaces with ``***``:

* the value of every environment variable whose *name* looks secret (:func:`is_secret_env_name`:
  ``HF_TOKEN``, ``DB_PASSWORD``, ``FOO_API_KEY``, ``WEBHOOK_SIGNING_SECRET``...) and of the names
  in :data:`SECRET_ENV_VARS`;
* the password of every URL-valued environment variable (``RABBITMQ_URL``, ``DATABASE_URL``...:
  ``scheme://user:password@host``), raw and percent-decoded;
* the values given to :func:`register_secret`;
* the password part of any ``scheme://user:password@`` URL and the token of any
  ``Bearer <token>`` found in the text itself.

Values shorter than :data:`MIN_SECRET_LENGTH` are never masked, and longer values are masked
first, so a secret containing another is masked as a whole.

:func:`redact` runs on every log record, so the list of secret values is cached: it is rebuilt
only when the environment changes (a C-level comparison of ``os.environ``'s data with a copy) or
a secret is registered.

:class:`RedactingFilter` applies :func:`redact` to every log record that reaches a handler, and
:func:`install_redaction` puts that filter on a logger's handlers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote, urlsplit

from typing_extensions import override

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "SECRET_ENV_VARS",
    "RedactingFilter",
    "clear_registered_secrets",
    "install_redaction",
    "is_secret_env_name",
    "redact",
    "register_secret",
]

MASK = "***"

SECRET_ENV_VARS: tuple[str, ...] = (
    "INTERNAL_API_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "RABBITMQ_PASSWORD",
)
"""Environment variables whose values are always masked (whatever :func:`is_secret_env_name`
says of their names)."""

URL_ENV_VARS: tuple[str, ...] = ("RABBITMQ_URL",)
"""Kept for compatibility: the password of *every* URL-valued environment variable is masked."""

MIN_SECRET_LENGTH = 4
"""Shorter values are not masked: replacing e.g. every ``a`` would only mangle the text."""

_BEARER_RE = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/=]+")
# scheme://user:password@ -> the password group is masked, whatever the scheme (amqp, amqps,
# redis, http...). The password stops at the first '@' that is followed by a host. The pattern
# starts at the literal '://' (not at the scheme) so the engine can skip to it: several times
# faster on long texts.
_URL_PASSWORD_RE = re.compile(r"(://[^\s:/@]*:)([^\s@/]+)(@)")

# Word parts of a name are separated by '_', '-' or '.'; (?<![^_.-]) is "at the start of a part".
_SECRET_NAME_RE = re.compile(
    r"""(?ix)
    TOKEN(?![^_.-])            # HF_TOKEN, GHTOKEN, TOKEN_X; not TOKENIZERS_PARALLELISM, MAX_TOKENS
    | SECRET                   # AWS_SECRET_ACCESS_KEY, CLIENT_SECRETS
    | PASSWORD | PASSWD | PASSPHRASE
    | (?<![^_.-])PASS(?![^_.-])  # DB_PASS, PASS; not COMPASS, PASSPORT, BYPASS
    | API_?KEY | PRIVATE_?KEY | ACCESS_?KEY
    | CREDENTIAL
    | AUTH(?!OR(?!IZ))         # AUTH_TOKEN, OAUTH, AUTHORIZATION; not GIT_AUTHOR_NAME, AUTHORITY
    | SIGNING
    """
)
# The last word part of names whose value describes a secret rather than holding one
# (AWS_SHARED_CREDENTIALS_FILE, TOKEN_TTL_SECONDS, AUTH_URL: a URL's password is masked anyway).
_NOT_A_VALUE_SUFFIX_RE = re.compile(
    r"(?i)(?:^|[_.-])(?:FILE|PATH|DIR|URL|URI|ENDPOINT|HOST|PORT|USER|USERNAME|REGION|ENABLED"
    r"|DISABLED|TTL|TIMEOUT|SECONDS|EXPIRY|LENGTH|TYPE|MODE|METHOD|PROVIDER)$"
)
# values of a secret-looking variable that are settings, not secrets (AUTH_ENABLED=true)
_NOT_SECRET_VALUES = frozenset({"true", "false", "yes", "no", "none", "null", "on", "off"})

_lock = threading.Lock()
_registered: set[str] = set()
_version = 0
# (environment data it was built from, _version, secret values longest first)
_cache: tuple[dict | None, int, tuple[str, ...]] = (None, -1, ())


def is_secret_env_name(name: str) -> bool:
    """Tell whether an environment variable's name says its value is a secret.

    The name is secret when it is in :data:`SECRET_ENV_VARS` or contains (case-insensitively) a
    word such as ``TOKEN`` (ending a word part), ``SECRET``, ``PASSWORD``, ``PASSWD``, ``PASS``
    (as a whole word part), ``API_KEY``/``APIKEY``, ``PRIVATE_KEY``, ``ACCESS_KEY``,
    ``CREDENTIAL``, ``AUTH`` (not ``AUTHOR``) or ``SIGNING``, unless its last word part says the
    value only describes a secret (``..._FILE``, ``..._PATH``, ``..._URL``, ``..._TTL``...).

    Args:
        name: The variable's name.

    Returns:
        ``True`` when the variable's value must be masked.
    """
    if name in SECRET_ENV_VARS:
        return True
    return bool(_SECRET_NAME_RE.search(name)) and not _NOT_A_VALUE_SUFFIX_RE.search(name)


def register_secret(value: str) -> None:
    """Mask a value in everything :func:`redact` sees from now on.

    For values the process holds outside the environment: a token given as an argument or read
    from a settings file, the webhook signing secret... Empty and short values (under
    :data:`MIN_SECRET_LENGTH` characters) are ignored, so a setting can be registered whether it
    is set or not. The value is also masked stripped of surrounding whitespace and
    percent-encoded (as it appears in a URL).

    Args:
        value: The secret.

    Raises:
        TypeError: ``value`` is not a string.
    """
    global _version
    if not isinstance(value, str):
        raise TypeError(f"register_secret() takes a str, not {type(value).__name__}")
    variants = {v for v in _variants(value) if len(v) >= MIN_SECRET_LENGTH}
    with _lock:
        if variants <= _registered:
            return
        _registered.update(variants)
        _version += 1


def clear_registered_secrets() -> None:
    """Forget the values given to :func:`register_secret` (for tests)."""
    global _version
    with _lock:
        _registered.clear()
        _version += 1


def _variants(value: str) -> Iterable[str]:
    """The forms a secret can take in a text: as is, stripped, percent-encoded."""
    yield value
    stripped = value.strip()
    yield stripped
    yield quote(stripped, safe="")


def _url_password(value: str) -> str | None:
    """The password of a ``scheme://user:password@host`` value, if it is such a URL."""
    if "://" not in value or "@" not in value:
        return None
    try:
        return urlsplit(value.strip()).password
    except ValueError:
        return None


def _scan(environ: Mapping[str, str], registered: Iterable[str]) -> tuple[str, ...]:
    """Collect the secret values of an environment plus the registered ones.

    Args:
        environ: Variable names to values.
        registered: Values given to :func:`register_secret`.

    Returns:
        Distinct values of at least :data:`MIN_SECRET_LENGTH` characters, longest first.
    """
    values: set[str] = set(registered)
    for name, value in environ.items():
        if not value:
            continue
        if is_secret_env_name(name) and value.strip().lower() not in _NOT_SECRET_VALUES:
            values.update(_variants(value))
        password = _url_password(value)
        if password:
            values.update((password, unquote(password)))
    return tuple(sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True))


def _environ_data() -> dict:
    """The environment's underlying dict (cheap to compare and copy), or a copy of it."""
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else dict(os.environ)


def _secret_values() -> tuple[str, ...]:
    """Return the secret values currently known, longest first (cached).

    Returns:
        The values :func:`redact` masks, rebuilt only when the environment or the registered
        secrets changed since the last call.
    """
    global _cache
    data = _environ_data()
    snapshot, version, values = _cache
    if version == _version and snapshot == data:
        return values
    # copy first: if the environment changes during the scan, the next call sees it differ
    snapshot = data.copy()
    with _lock:
        version = _version
        registered = tuple(_registered)
    values = _scan(os.environ, registered)
    _cache = (snapshot, version, values)
    return values


def redact(text: str) -> str:
    """Mask secrets in a piece of text.

    Masks the values of secret-looking environment variables (see :func:`is_secret_env_name`)
    as currently set, the password of every URL-valued environment variable, the values given to
    :func:`register_secret`, the password part of any ``scheme://user:password@`` URL and the
    token of any ``Bearer <token>``.

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
    # cheap C-level checks first: the regular expressions cost far more than the scans
    if "@" in text and "://" in text:
        text = _URL_PASSWORD_RE.sub(rf"\1{MASK}\3", text)
    if "bearer" in text.lower():
        text = _BEARER_RE.sub(rf"\1\2{MASK}", text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in a record's message, arguments and traceback.

    The record is rewritten in place (``msg`` becomes the redacted, fully formatted message and
    ``args`` is emptied) so that every handler and formatter after it sees only redacted text.
    It never drops a record.
    """

    @override
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
