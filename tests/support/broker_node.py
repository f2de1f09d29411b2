"""A private RabbitMQ node that a test may start, stop, restart or kill on its own.

The shared broker at 127.0.0.1:5672 (``tests.support.broker``) must never be stopped or
reconfigured by a test. Tests that need a broker going away mid-job use a :class:`BrokerNode`
instead: a second node of the installed RabbitMQ with its own node name, AMQP and distribution
ports, data, logs, config, plugin list and Erlang cookie, all in one temporary folder.

Isolation from the shared node (``/etc/rabbitmq`` would otherwise force port 5672 and the
``rabbit@localhost`` name):

* ``RABBITMQ_CONF_ENV_FILE`` and ``RABBITMQ_CONFIG_FILE`` point at files in the node's folder;
  ``RABBITMQ_ADVANCED_CONFIG_FILE`` at one that does not exist there.
* ``RABBITMQ_ENABLED_PLUGINS_FILE`` is an empty plugin list (no management plugin: faster start).
* ``HOME`` is the node's folder, which holds a fresh ``.erlang.cookie``; the node and every
  ``rabbitmqctl`` call made through :meth:`BrokerNode.rabbitmqctl` read that one, so the shared
  node's cookie is neither needed nor touched.
* The scripts are run from RabbitMQ's own ``bin`` folder (``/usr/lib/rabbitmq/bin`` on Debian),
  not through the ``/usr/sbin`` wrappers, which ``cd /var/lib/rabbitmq`` and ``su rabbitmq``.
* The Erlang VM runs one scheduler, unbound, without busy waiting, to stay light on small
  machines.

RabbitMQ 3.10 does not put the node name on the VM's command line, so the node adds two marker
arguments there (``-lltest_node <name> -lltest_owner <pid of this Python process>``); cleanup kills
only VMs carrying this node's name, and :func:`reap_orphans` kills nodes whose owning process is
gone (a test run killed before its ``atexit`` hook ran).

Use the ``private_broker`` fixture (function scope: each test gets a fresh, started node and
the node is always cleaned up)::

    from tests.support.broker_node import private_broker  # noqa: F401

    def test_survives_restart(private_broker):
        params = private_broker.connection_parameters()
        ...
        private_broker.restart(down_s=2)

Without an installed ``rabbitmq-server`` the fixture skips, except when ``CI`` is ``true``:
there it fails, so that CI cannot go green by skipping.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pika
import pika.exceptions
import pytest

HOST = "127.0.0.1"

#: Ports a private node must never take: the shared node's AMQP, distribution and management
#: ports, epmd, and the range ``rabbitmqctl`` itself listens on (35672-35682).
_RESERVED_PORTS = frozenset({4369, 5672, 15672, 25672, *range(35672, 35683)})

#: Prefix of the temporary folders (also checked before :func:`reap_orphans` removes one).
_DIR_PREFIX = "lltest-rabbit-"
_NODE_MARKER = "-lltest_node"
_OWNER_MARKER = "-lltest_owner"

_live_nodes: set[BrokerNode] = set()
_live_lock = threading.Lock()


class BrokerNodeError(RuntimeError):
    """A private node failed to start or stop, or a ``rabbitmqctl`` call failed."""


def find_rabbitmq_scripts() -> Path | None:
    """The folder holding RabbitMQ's own scripts (``rabbitmq-server``, ``rabbitmqctl``, ...).

    Returns:
        ``/usr/lib/rabbitmq/bin`` (Debian, Ubuntu) or the real location of ``rabbitmq-server``
        on ``PATH`` (Homebrew, generic unix tarball), or None if RabbitMQ is not installed.
        Debian's ``/usr/sbin`` wrappers are skipped: they change user and directory.
    """
    candidates = [Path("/usr/lib/rabbitmq/bin")]
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "rabbitmq-server").is_file() and (folder / "rabbitmq-env").is_file():
            return folder
    return None


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def _free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 that is free now and not reserved or in ``taken``.

    Taken below the kernel's ephemeral range where possible: while the node is down for a
    restart, an outgoing connection of some other client could otherwise be given its port.
    """
    low = _ephemeral_range()[0]
    rng = secrets.SystemRandom()
    for attempt in range(200):
        # 100 tries below the ephemeral range, then any port the kernel offers
        candidate = rng.randrange(20000, low) if low > 21000 and attempt < 100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS and port not in taken:
            return port
    raise BrokerNodeError("no free TCP port found")


def _port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _beam_processes() -> Iterator[tuple[int, list[str]]]:
    """``(pid, argv)`` of every Erlang VM on this machine whose command line can be read."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and "beam" in Path(argv[0]).name:
            yield int(entry.name), argv


def _marker(argv: list[str], flag: str) -> str | None:
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index(flag) + 1]
    return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def node_beam_pids(node_name: str) -> list[int]:
    """Pids of the Erlang VMs started by a :class:`BrokerNode` named ``node_name``.

    Matched by the marker argument on the VM's command line, so no other node (the shared one
    included) can match.
    """
    return [pid for pid, argv in _beam_processes() if _marker(argv, _NODE_MARKER) == node_name]


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid, _ in _beam_processes() if pid in pids]
        if not alive:
            return
        time.sleep(0.05)


def reap_orphans() -> int:
    """Kill private nodes left behind by test processes that no longer exist.

    Only VMs started by a :class:`BrokerNode` (they carry the marker arguments) whose owner
    process is dead are killed, and only their own temporary folders are removed; nodes of
    other, running test sessions are left alone.

    Returns:
        How many VMs were killed.
    """
    orphans: dict[int, str | None] = {}
    for pid, argv in _beam_processes():
        owner = _marker(argv, _OWNER_MARKER)
        if owner is not None and owner.isdigit() and not _pid_alive(int(owner)):
            orphans[pid] = _marker(argv, "-home")
    for pid in orphans:
        _kill(pid)
    _wait_gone(list(orphans), timeout=10)
    for home in orphans.values():
        if home and Path(home).name.startswith(_DIR_PREFIX):
            shutil.rmtree(home, ignore_errors=True)
    return len(orphans)


class BrokerNode:
    """A private RabbitMQ node on its own ports, with its own data in a temporary folder.

    Durable queues and persistent messages survive :meth:`stop`/:meth:`start` and
    :meth:`restart` (the data folder and node name stay the same). Always call
    :meth:`cleanup` (or use the node as a context manager); an ``atexit`` hook does it too.

    Attributes:
        node_name: Erlang node name, ``<prefix>-<random>@localhost``.
        port: AMQP port on 127.0.0.1 (guest/guest).
        dist_port: Erlang distribution port on 127.0.0.1 (``rabbitmqctl`` connects to it).
        dir: The node's temporary folder (config, cookie, ``mnesia/``, ``log/``).
        timings: ``(operation, seconds)`` of every start, stop and restart so far.
    """

    def __init__(
        self,
        *,
        prefix: str = "lltest",
        config: Mapping[str, str] | None = None,
        scripts: Path | None = None,
    ) -> None:
        """Prepare (but do not start) a node.

        Args:
            prefix: Start of the node name.
            config: Extra ``rabbitmq.conf`` settings, e.g. ``{"heartbeat": "5"}`` or
                ``{"consumer_timeout": "60000"}``; they override the defaults written here.
            scripts: RabbitMQ's script folder; found with :func:`find_rabbitmq_scripts` if None.

        Raises:
            BrokerNodeError: If RabbitMQ is not installed.
        """
        found = scripts or find_rabbitmq_scripts()
        if found is None:
            raise BrokerNodeError("rabbitmq-server is not installed")
        self.scripts = found
        self.node_name = f"{prefix}-{secrets.token_hex(4)}@localhost"
        self.port = _free_port(set())
        self.dist_port = _free_port({self.port})
        self.dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
        self.timings: list[tuple[str, float]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files(config or {})
        self._env = self._build_env()
        with _live_lock:
            _live_nodes.add(self)

    # -- setup -------------------------------------------------------------------------------

    def _write_files(self, config: Mapping[str, str]) -> None:
        settings = {
            "listeners.tcp.default": f"{HOST}:{self.port}",
            "loopback_users.guest": "true",
            "log.console": "false",
            "log.file.level": "info",
            **config,
        }
        conf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.dir / "rabbitmq.conf").write_text(conf)
        (self.dir / "rabbitmq-env.conf").write_text("# private test node: no settings\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)

    def _build_env(self) -> dict[str, str]:
        # nothing of the caller's RabbitMQ/Erlang settings may leak into the private node
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_", "CONF_ENV_FILE"))
        }
        erl_args = (
            "+S 1:1 +SDcpu 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
            " -kernel inet_dist_use_interface {127,0,0,1}"
            f" {_NODE_MARKER} {self.node_name} {_OWNER_MARKER} {os.getpid()}"
        )
        env.update(
            HOME=str(self.dir),
            ERL_EPMD_ADDRESS=HOST,
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_SCHEDULER_BIND_TYPE="u",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=erl_args,
        )
        return env

    # -- helpers -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the node's ``rabbitmq-server`` process is alive (it may still be booting)."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """AMQP URL of the node (guest/guest, default vhost)."""
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    def connection_parameters(self, **kwargs: object) -> pika.ConnectionParameters:
        """``pika.ConnectionParameters`` for this node; keyword arguments override defaults.

        Args:
            **kwargs: Any ``pika.ConnectionParameters`` argument (``heartbeat``,
                ``client_properties``, ...).

        Returns:
            Parameters with host, port and guest credentials set.
        """
        options: dict[str, object] = {
            "host": HOST,
            "port": self.port,
            "credentials": pika.PlainCredentials("guest", "guest"),
            "connection_attempts": 1,
            "socket_timeout": 5,
        }
        options.update(kwargs)
        return pika.ConnectionParameters(**options)  # type: ignore[arg-type]

    @property
    def server_log(self) -> Path:
        """The node's own log file."""
        return self.dir / "log" / f"{self.node_name}.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the startup output and of the node's log, for error messages."""
        parts = []
        for path in (self.dir / "server.out", self.server_log):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def rabbitmqctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``rabbitmqctl -n <node> *args`` with this node's environment and cookie.

        Args:
            *args: Command and arguments, e.g. ``"list_queues", "name", "messages"``.
            timeout: Seconds before the call is abandoned.
            check: Raise on a non-zero exit status.

        Returns:
            The command's standard output.

        Raises:
            BrokerNodeError: If ``check`` and the command fails or times out.
        """
        cmd = [str(self.scripts / "rabbitmqctl"), "-n", self.node_name, *args]
        try:
            result = subprocess.run(
                cmd, env=self._env, cwd=self.dir, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise BrokerNodeError(f"{' '.join(args)}: timed out after {timeout}s") from exc
            return ""
        if check and result.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmqctl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def _amqp_ok(self) -> bool:
        try:
            connection = pika.BlockingConnection(self.connection_parameters(socket_timeout=2))
        except pika.exceptions.AMQPError:
            return False
        connection.close()
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> float:
        """Start the node and wait until it is fully booted and accepts AMQP connections.

        Does nothing if it is already running.

        Args:
            timeout: Seconds to wait for the node.

        Returns:
            Seconds it took.

        Raises:
            BrokerNodeError: If the node exits or is not ready within ``timeout`` (the message
                holds the end of its logs); the half-started node is killed.
        """
        if self.running:
            return 0.0
        began = time.monotonic()
        deadline = began + timeout
        with (self.dir / "server.out").open("ab") as out:
            # foreground server in its own session: this process keeps its pid, Ctrl-C in a
            # terminal does not reach it, and its exit is seen at once
            self._process = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self._env,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # the AMQP listener opens late in boot: poll it cheaply before running rabbitmqctl
            # (each call boots an Erlang VM of its own)
            while not _port_open(self.port):
                self._check_alive("exited while starting")
                if time.monotonic() > deadline:
                    raise BrokerNodeError(f"node did not open port {self.port} in {timeout}s")
                time.sleep(0.1)
            remaining = max(1, int(deadline - time.monotonic()))
            self.rabbitmqctl("await_startup", "--timeout", str(remaining), timeout=remaining + 15)
            while not self._amqp_ok():
                self._check_alive("exited after boot")
                if time.monotonic() > deadline:
                    raise BrokerNodeError(f"no AMQP connection to port {self.port} in {timeout}s")
                time.sleep(0.1)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, BrokerNodeError):
                raise BrokerNodeError(f"{self.node_name}: {exc}\n{self.log_tail()}") from exc
            raise
        elapsed = time.monotonic() - began
        self.timings.append(("start", elapsed))
        return elapsed

    def _check_alive(self, what: str) -> None:
        if not self.running:
            code = self._process.returncode if self._process else None
            raise BrokerNodeError(f"rabbitmq-server {what} (exit status {code})")

    def stop(self, timeout: float = 60) -> float:
        """Stop the whole node (``rabbitmqctl stop``): every client connection drops.

        Waits until the server process has exited and the AMQP port refuses connections. Falls
        back to SIGTERM, then SIGKILL, if the node does not go on its own. Does nothing if the
        node is not running.

        Args:
            timeout: Seconds to wait for the node to exit.

        Returns:
            Seconds it took.
        """
        if not self.running:
            return 0.0
        assert self._process is not None
        began = time.monotonic()
        try:
            self.rabbitmqctl("stop", timeout=timeout)
            self._process.wait(timeout=max(1.0, timeout - (time.monotonic() - began)))
        except (BrokerNodeError, subprocess.TimeoutExpired):
            self._terminate()
        deadline = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - began
        self.timings.append(("stop", elapsed))
        return elapsed

    def restart(self, down_s: float = 0.0, timeout: float = 60) -> float:
        """Stop the node, stay down ``down_s`` seconds, start it again (same data).

        Args:
            down_s: Seconds between the node being down and the new start.
            timeout: Limit for the stop and for the start, each.

        Returns:
            Seconds the whole restart took.
        """
        began = time.monotonic()
        self.stop(timeout)
        time.sleep(down_s)
        self.start(timeout)
        elapsed = time.monotonic() - began
        self.timings.append(("restart", elapsed))
        return elapsed

    def kill(self) -> None:
        """SIGKILL the node at once (a crash: no graceful connection close, no flush)."""
        # only while the server script is an un-reaped child is its pid (= process group of the
        # node, which runs in its own session) certainly still ours
        if self.running:
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        leftovers = self.beam_pids()
        for pid in leftovers:
            _kill(pid)
        _wait_gone(leftovers, timeout=10)

    def _terminate(self) -> None:
        # the VM handles SIGTERM as a graceful stop; the server script forwards it
        assert self._process is not None
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def beam_pids(self) -> list[int]:
        """Pids of Erlang VMs running this node (see :func:`node_beam_pids`)."""
        return node_beam_pids(self.node_name)

    def connections(self) -> list[dict[str, str | None]]:
        """Client connections of the node.

        Returns:
            One dict per connection: ``pid`` (as ``close_connection`` takes it), ``name``
            (``"client -> server"`` address pair), ``user`` and the client-provided
            ``connection_name`` (None if it sent none).
        """
        # the JSON formatter renders pids as "#PID<...>", which close_connection rejects: take
        # the pids from the plain listing and join on the (unique) address-pair name
        plain = self.rabbitmqctl("list_connections", "-q", "--no-table-headers", "name", "pid")
        pids = dict(line.rsplit("\t", 1) for line in plain.splitlines() if "\t" in line)
        out = self.rabbitmqctl(
            "list_connections", "name", "user", "client_properties", "--formatter", "json"
        )
        result: list[dict[str, str | None]] = []
        for row in json.loads(out.strip() or "[]"):
            props = row.get("client_properties") or []
            names = [p[2] for p in props if isinstance(p, list) and p[:1] == ["connection_name"]]
            result.append(
                {
                    "pid": pids.get(row.get("name")),
                    "name": row.get("name"),
                    "user": row.get("user"),
                    "connection_name": names[0] if names else None,
                }
            )
        return result

    def close_connections(self, name_contains: str, reason: str = "closed by test") -> int:
        """Force-close client connections whose ``connection_name`` contains a string.

        Args:
            name_contains: Substring of the client-provided ``connection_name``.
            reason: Close reason the clients receive.

        Returns:
            How many connections were closed.
        """
        closed = 0
        for conn in self.connections():
            name, pid = conn["connection_name"], conn["pid"]
            if name is not None and pid is not None and name_contains in name:
                # a connection that closed meanwhile is not an error
                self.rabbitmqctl("close_connection", pid, reason, check=False)
                closed += 1
        return closed

    def cleanup(self) -> None:
        """Stop the node if running, kill any VM of this node left over, remove its folder.

        Safe to call more than once.
        """
        try:
            # cleanup must not fail: the kill below is the backstop
            with contextlib.suppress(Exception):
                self.stop(timeout=20)
        finally:
            self.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
            with _live_lock:
                _live_nodes.discard(self)

    def __enter__(self) -> BrokerNode:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"BrokerNode({self.node_name!r}, port={self.port}, {state})"


@atexit.register
def _cleanup_all() -> None:
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        node.cleanup()


def require_rabbitmq() -> Path:
    """RabbitMQ's script folder; skip the test if RabbitMQ is not installed.

    Returns:
        The folder from :func:`find_rabbitmq_scripts`.

    Raises:
        pytest.fail.Exception: If RabbitMQ is missing and ``CI`` is ``true`` (CI must not go
            green by skipping).
        pytest.skip.Exception: If RabbitMQ is missing otherwise.
    """
    scripts = find_rabbitmq_scripts()
    if scripts is None:
        reason = "rabbitmq-server is not installed: the private broker node cannot run"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
        pytest.skip(reason)
    return scripts


@contextlib.contextmanager
def started_node(
    *, prefix: str = "lltest", config: Mapping[str, str] | None = None
) -> Iterator[BrokerNode]:
    """A started :class:`BrokerNode` (orphans of dead test runs reaped first), always cleaned up.

    Args:
        prefix: Start of the node name.
        config: Extra ``rabbitmq.conf`` settings (see :class:`BrokerNode`).

    Yields:
        The started node.
    """
    scripts = require_rabbitmq()
    reap_orphans()
    node = BrokerNode(prefix=prefix, config=config, scripts=scripts)
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


@pytest.fixture
def private_broker() -> Iterator[BrokerNode]:
    """A fresh, started private :class:`BrokerNode` for one test, cleaned up afterwards.

    The test may stop, restart or kill it at will. Skips if RabbitMQ is not installed, unless
    ``CI=true`` (then the test fails).
    """
    with started_node() as node:
        yield node


@pytest.fixture(scope="module")
def _private_broker_module() -> Iterator[BrokerNode]:
    with started_node() as node:
        yield node


@pytest.fixture
def private_broker_reused(_private_broker_module: BrokerNode) -> BrokerNode:
    """One private node for all tests of a module (saves a start per test), started again here.

    Queues and messages carry over between the module's tests: use unique queue names. A
    test that stops the node need not start it again; the next test's setup does.
    """
    _private_broker_module.start()
    return _private_broker_module
