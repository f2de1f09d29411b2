"""A real HTTP proxy in front of an S3 server that drops the conditional-write headers.

What an older MinIO, several S3-compatible stores or a careless proxy do: ``If-None-Match`` and
``If-Match`` never reach the store, so every write succeeds. Requests are forwarded as they come
(method, path, body, the other headers) and the answers returned unchanged.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from typing import Any, Self
from urllib.parse import urlsplit

__all__ = ["HeaderDroppingProxy"]

DROPPED = frozenset({"if-none-match", "if-match"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding"})


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in DROPPED | _HOP_BY_HOP}
        self.server.dropped += sum(k.lower() in DROPPED for k in self.headers)
        upstream = http.client.HTTPConnection(self.server.host, self.server.port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


for _method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
    setattr(_Handler, f"do_{_method}", _Handler._forward)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    host: str
    port: int
    dropped: int


class HeaderDroppingProxy:
    """Forwards to ``upstream`` (an ``http://host:port`` URL) without the conditional headers.

    Attributes:
        dropped: How many conditional headers it has dropped so far.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.host, self._server.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._server.dropped = 0
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        """The proxy's ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def dropped(self) -> int:
        return self._server.dropped

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
