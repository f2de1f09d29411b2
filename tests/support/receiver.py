"""A real, scriptable HTTP server on 127.0.0.1 that records every request.

Used to test webhook clients over the network without patching ``requests``::

    with WebhookReceiver() as receiver:
        receiver.script("/api/webhooks/training/complete", 500, 503, 200)
        client = WebhookClient(receiver.base_url, token="t")
        assert client.send_complete(1, "s3://b/k", {})
        assert [r.status for r in receiver.requests] == [500, 503, 200]

Responses are taken, per path, from a FIFO queue filled with :meth:`WebhookReceiver.script`;
when the queue of a path is empty its default (:meth:`WebhookReceiver.set_default`) is used,
else ``200`` with ``{"ok": true}``. A :class:`Reply` can delay its answer (to exceed a client's
read timeout), hang until :meth:`WebhookReceiver.release` or shutdown, or dribble its whole answer
a byte at a time (a slow backend or proxy: each byte comes well within a per-read timeout).

Each request is recorded (:class:`RecordedRequest`) as soon as its body has been read, before
any delay, so tests can observe requests that are still in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

__all__ = ["RecordedRequest", "Reply", "WebhookReceiver"]

MAX_HANG_S = 60.0
"""A hanging request is answered after this long even if never released."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """A scripted response.

    Attributes:
        status: HTTP status code.
        body: JSON-serializable body; ``{"ok": status < 400}`` when ``None``.
        headers: Extra response headers (e.g. ``{"Retry-After": "1"}``).
        delay_s: Seconds to wait before answering (cut short when the server stops).
        hang: Wait until :meth:`WebhookReceiver.release` (or server stop) before answering.
        dribble_s: Send the answer (status line, headers, body) one byte every ``dribble_s``
            seconds; ``pad`` spaces after the JSON body make it last.
        pad: Spaces appended to the body (with ``dribble_s``: how long the answer lasts).
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0
    hang: bool = False
    dribble_s: float = 0.0
    pad: int = 0


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request as received.

    Attributes:
        method: HTTP method, e.g. ``"PATCH"``.
        path: Path without the query string.
        query: Query string (may be empty).
        headers: Request headers; use :meth:`header` for case-insensitive lookup.
        body: Raw body bytes.
        json: Parsed JSON body, or ``None`` if the body is empty or not JSON.
        received_at: ``time.monotonic()`` when the body had been read.
        status: Status code the server answers (or will answer) with.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float
    status: int

    def header(self, name: str) -> str | None:
        """Return a header's value, looked up case-insensitively."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


def _as_reply(response: int | Reply) -> Reply:
    return response if isinstance(response, Reply) else Reply(status=int(response))


class _Handler(http.server.BaseHTTPRequestHandler):
    """Records the request and answers with the next scripted reply for its path."""

    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: simple and robust

    def _handle(self) -> None:
        receiver = self.server.receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        reply = receiver._next_reply(path)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        receiver._record(
            RecordedRequest(
                method=self.command,
                path=path,
                query=query,
                headers=dict(self.headers.items()),
                body=body,
                json=parsed,
                received_at=time.monotonic(),
                status=reply.status,
            )
        )
        receiver._wait_before_reply(reply)
        self._answer(reply)

    def _answer(self, reply: Reply) -> None:
        payload = reply.body if reply.body is not None else {"ok": reply.status < 400}
        data = json.dumps(payload).encode("utf-8") + b" " * reply.pad
        if reply.dribble_s > 0:
            self._dribble(reply, data)
            return
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client gave up (timeout) and closed the connection
            pass

    def _dribble(self, reply: Reply, data: bytes) -> None:
        head = [f"HTTP/1.0 {reply.status} Dribbling"]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}", "", ""]
        raw = "\r\n".join(head).encode("latin-1") + data
        stopped = self.server.receiver._stopping
        try:
            for index in range(len(raw)):
                self.wfile.write(raw[index : index + 1])
                self.wfile.flush()
                if stopped.wait(reply.dribble_s):
                    return
        except OSError:  # the client gave up and closed the connection
            self.server.receiver._count_cut()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


for _method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
    setattr(_Handler, f"do_{_method}", _Handler._handle)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that disconnect early."""


class WebhookReceiver:
    """A threaded HTTP server on ``127.0.0.1`` (free port) that records and scripts requests.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._scripts: dict[str, collections.deque[Reply]] = collections.defaultdict(
            collections.deque
        )
        self._defaults: dict[str, Reply] = {}
        self._default = Reply()
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._in_flight = 0
        self._cut = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> WebhookReceiver:
        """Start serving on a free port."""
        server = _Server((self._host, 0), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging requests, stop serving and close the socket."""
        self._stopping.set()
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None, "receiver not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------- scripting

    def script(self, path: str, *responses: int | Reply) -> None:
        """Append replies (status codes or :class:`Reply`) to ``path``'s queue."""
        with self._lock:
            self._scripts[path].extend(_as_reply(r) for r in responses)

    def set_default(self, response: int | Reply, path: str | None = None) -> None:
        """Set the reply used when ``path``'s queue (or, with ``None``, any queue) is empty."""
        with self._lock:
            if path is None:
                self._default = _as_reply(response)
            else:
                self._defaults[path] = _as_reply(response)

    def release(self) -> None:
        """Let every hanging request (current and future) answer."""
        self._release.set()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` (or :meth:`stop`) has been called."""
        return self._release.is_set()

    # ----------------------------------------------------------------- observing

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Return the requests received so far for ``path``."""
        return [r for r in self.requests if r.path == path]

    @property
    def cut_short(self) -> int:
        """Dribbled answers the client hung up on before their last byte."""
        with self._lock:
            return self._cut

    @property
    def in_flight(self) -> int:
        """Requests received but not yet answered."""
        with self._lock:
            return self._in_flight

    def wait_for(
        self, predicate: Callable[[list[RecordedRequest]], bool], timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until ``predicate(requests)`` is true.

        Args:
            predicate: Called with a snapshot of the requests each time one arrives.
            timeout: Most seconds to wait.

        Returns:
            The snapshot that satisfied the predicate.

        Raises:
            AssertionError: Not satisfied in time (lists the requests received).
        """
        with self._lock:
            if self._lock.wait_for(lambda: predicate(list(self._requests)), timeout):
                return list(self._requests)
            seen = [(r.method, r.path, r.status) for r in self._requests]
        raise AssertionError(f"condition not met within {timeout}s; requests: {seen}")

    def wait_for_count(
        self, count: int, path: str | None = None, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests (to ``path`` if given) arrived; return them."""
        self.wait_for(lambda rs: sum(path is None or r.path == path for r in rs) >= count, timeout)
        return [r for r in self.requests if path is None or r.path == path]

    # ----------------------------------------------------------------- handler side

    def _next_reply(self, path: str) -> Reply:
        with self._lock:
            queue = self._scripts.get(path)
            if queue:
                return queue.popleft()
            return self._defaults.get(path, self._default)

    def _count_cut(self) -> None:
        with self._lock:
            self._cut += 1
            self._lock.notify_all()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._lock.notify_all()

    def _wait_before_reply(self, reply: Reply) -> None:
        try:
            if reply.hang:
                self._release.wait(MAX_HANG_S)
            if reply.delay_s > 0:
                self._stopping.wait(reply.delay_s)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
