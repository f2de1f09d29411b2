"""Which process owns something, and whether that process is gone: one rule for the worker.

A run's lease (:mod:`lightning_lora.worker.ledger`) and a job's work folder
(:mod:`lightning_lora.worker.jobdirs`) both record their owner as a :class:`ProcessOwner`: host
name, pid, the process's create time and its pid namespace. :meth:`ProcessOwner.gone` says the
owner is gone only when that can be known from here: same host *and* same pid namespace (two
containers may share a host name while their pids mean nothing to each other), and then no such
pid, a zombie, or a pid reused by a later process (another create time). Anything else (another
host, another namespace, a namespace that was not recorded, a process we may not inspect) counts
as possibly alive.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import Any

import psutil

__all__ = ["ProcessOwner", "pid_namespace"]

# create times of one process read at different moments agree to the clock tick (10 ms); a
# reused pid's process started later, by far more than this
_CREATE_TIME_TOLERANCE_S = 1.0


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace (Linux), ``None`` where it is unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class ProcessOwner:
    """A process, as recorded by what it owns.

    Attributes:
        host: The host name (``socket.gethostname()``).
        pid: The process id in its pid namespace.
        create_time: The process's create time (``psutil``), which tells a reused pid apart.
        pid_ns: The pid namespace's inode, ``None`` where unknown (or in older records).
    """

    host: str
    pid: int
    create_time: float
    pid_ns: int | None = None

    @classmethod
    def this_process(cls) -> ProcessOwner:
        """The current process."""
        me = psutil.Process()
        return cls(socket.gethostname(), me.pid, me.create_time(), pid_namespace())

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ProcessOwner | None:
        """The owner stored in ``record`` (a JSON object), or ``None`` if it holds none."""
        pid, create_time = record.get("pid"), record.get("create_time")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        if not isinstance(create_time, int | float) or isinstance(create_time, bool):
            return None
        host, pid_ns = record.get("host"), record.get("pid_ns")
        return cls(
            host=host if isinstance(host, str) else "",
            pid=pid,
            create_time=float(create_time),
            pid_ns=pid_ns if isinstance(pid_ns, int) and not isinstance(pid_ns, bool) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The owner as a JSON object (read back by :meth:`from_json`)."""
        return dataclasses.asdict(self)

    def is_local(self) -> bool:
        """Whether its pid means something here: this host and this pid namespace."""
        ours = pid_namespace()
        same_ns = self.pid_ns is not None and ours is not None and self.pid_ns == ours
        return self.host == socket.gethostname() and same_ns

    def gone(self) -> str | None:
        """Why the owner is known to be gone, or ``None`` when it may be alive."""
        if not self.is_local():
            return None
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return f"owner pid {self.pid} has exited"
            create_time = process.create_time()
        except psutil.NoSuchProcess:
            return f"owner pid {self.pid} is not running"
        except psutil.Error:  # access denied...: it exists, assume it is the owner
            return None
        if abs(create_time - self.create_time) > _CREATE_TIME_TOLERANCE_S:
            return f"owner pid {self.pid} now belongs to another process"
        return None
