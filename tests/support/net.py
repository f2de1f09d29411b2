"""Local ports where nothing listens (connections are refused)."""

from __future__ import annotations

import socket


def closed_port() -> int:
    """A local TCP port that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{closed_port()}"
