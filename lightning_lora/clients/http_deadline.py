"""One HTTP request with a total deadline: connect, send and the whole answer.

Hand-written over :mod:`http.client` because neither ``requests`` nor ``urllib3`` (nor ``httpx``)
has a total deadline for a synchronous call: their timeouts bound each socket operation, so a
backend or proxy that answers a byte at a time holds a call for as long as it likes. Here a
watchdog timer shuts the connection's socket down when the deadline passes; the blocked read
returns at once and the call fails as timed out. One connection per request, closed before
returning: nothing is pooled, so nothing outlives the call.

Not covered: the host name lookup before connecting (``getaddrinfo`` cannot be interrupted);
use an address or a resolver that answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["DeadlineExceeded", "HttpReply", "request_with_deadline"]

MAX_ANSWER_BYTES = 64 * 1024
"""The most of an answer's body that is read (and thrown away): webhooks carry no data back."""


class DeadlineExceeded(TimeoutError):
    """The request did not complete (connect, send, whole answer) before its deadline."""


@dataclasses.dataclass(frozen=True)
class HttpReply:
    """What came back: the status line and the headers (the body is read and dropped)."""

    status: int
    reason: str
    headers: Mapping[str, str]

    def header(self, name: str) -> str | None:
        """A header's value, looked up case-insensitively."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


def _tls_context() -> ssl.SSLContext:
    """The system's trust store, or the bundle named by ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE``."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or None
    return ssl.create_default_context(cafile=bundle)


def request_with_deadline(
    method: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    deadline_s: float,
) -> HttpReply:
    """Make one request that ends, one way or another, within ``deadline_s`` seconds.

    Args:
        method: The HTTP method.
        url: An ``http://`` or ``https://`` URL (no redirects are followed).
        body: The request body.
        headers: The request headers.
        deadline_s: Seconds for the whole exchange.

    Returns:
        The answer's status and headers.

    Raises:
        DeadlineExceeded: The exchange did not complete in time.
        OSError, http.client.HTTPException: The connection failed or the answer is malformed.
    """
    parts = urlsplit(url)
    started = time.monotonic()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=deadline_s, context=_tls_context()
        )
    else:
        connection = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=deadline_s
        )
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(deadline_s, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(method, target or "/", body=body, headers=dict(headers))
        answer = connection.getresponse()
        answer.read(MAX_ANSWER_BYTES)
        reply = HttpReply(answer.status, answer.reason, dict(answer.getheaders()))
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or time.monotonic() - started >= deadline_s:
            raise DeadlineExceeded(f"no complete answer within {deadline_s:.1f}s") from exc
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():  # cut while the last bytes came in: not a complete answer
        raise DeadlineExceeded(f"no complete answer within {deadline_s:.1f}s")
    return reply
