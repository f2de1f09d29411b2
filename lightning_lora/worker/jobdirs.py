"""Per-job work folders that a crashed worker does not leave behind.

A job's images, run folder and resume files live in a folder made by :func:`make_job_dir`:
``<parent>/ll-job-<name>-<random>``, holding an owner file (``.owner.json``) with the pid and the
create time of the process that made it. The worker removes the folder when the job ends; when
the worker is SIGKILLed (or the machine loses power) it cannot, so the next worker calls
:func:`remove_stale_job_dirs` at start-up: it removes every job folder whose owner is gone (no
such pid, or a pid reused by another process: the create time differs) and every folder without
a readable owner file (made by an older worker, or interrupted before the file was written) last
modified more than an hour ago. A folder whose owner is alive is never touched, nor one made on
another host or in another pid namespace sharing the parent folder (its pid means nothing here).
Whether an owner is gone is :class:`~lightning_lora.worker.owners.ProcessOwner`'s rule, the same
as for a run's lease; on this host, an owner file without the pid namespace (older workers)
counts as no owner file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from lightning_lora.worker.owners import ProcessOwner

__all__ = [
    "JOB_DIR_PREFIX",
    "OWNER_FILE",
    "UNOWNED_MAX_AGE_S",
    "job_dir_owned_here",
    "make_job_dir",
    "remove_stale_job_dirs",
]

log = logging.getLogger(__name__)

JOB_DIR_PREFIX = "ll-job-"
OWNER_FILE = ".owner.json"
UNOWNED_MAX_AGE_S = 3600.0
"""A job folder without a readable owner file is removed once unmodified for this long."""

_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def make_job_dir(parent: Path | None, name: str) -> Path:
    """Create a job's work folder, owned by this process.

    Args:
        parent: Folder to create it in (created if missing); the system's temporary folder
            (:func:`tempfile.gettempdir`) when ``None``.
        name: Part of the folder's name, e.g. the style id; characters other than letters,
            digits, ``.``, ``_`` and ``-`` become ``_`` and it is cut to 64 characters.

    Returns:
        The new, empty folder (but for its owner file), ``<parent>/ll-job-<name>-<random>``.
    """
    base = Path(tempfile.gettempdir()) if parent is None else Path(parent)
    base.mkdir(parents=True, exist_ok=True)
    safe = _UNSAFE_NAME_RE.sub("_", str(name))[:64] or "job"
    job_dir = Path(tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{safe}-", dir=base))
    # written whole then renamed: a reader never sees half a file
    tmp = job_dir / f"{OWNER_FILE}.tmp"
    record = {**ProcessOwner.this_process().to_json(), "created_at": time.time()}
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(job_dir / OWNER_FILE)
    return job_dir


def _read_owner(job_dir: Path) -> ProcessOwner | None:
    """The folder's owner, if its owner file is readable and complete."""
    try:
        record = json.loads((job_dir / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ProcessOwner.from_json(record) if isinstance(record, dict) else None


def job_dir_owned_here(job_dir: Path) -> bool:
    """Whether this process made ``job_dir`` (a requeued job takes its folder back)."""
    owner = _read_owner(job_dir)
    return owner is not None and owner.pid == os.getpid() and owner.is_local() and not owner.gone()


def remove_stale_job_dirs(
    parent: Path | None, *, unowned_max_age_s: float = UNOWNED_MAX_AGE_S
) -> list[Path]:
    """Remove the job folders left by processes that are gone.

    Looks at the folders named ``ll-job-*`` directly in ``parent`` (symbolic links and files
    are ignored) and removes those whose owner process is gone (not running, or its pid reused:
    the create time differs) and those without a readable owner file whose modification time is
    older than ``unowned_max_age_s``. Folders owned by a live process (this one included), or
    made on another host or pid namespace, are kept. Logs one line per folder removed; a folder
    that cannot be removed is logged and skipped.

    Args:
        parent: The folder job folders are made in (as given to :func:`make_job_dir`); the
            system's temporary folder when ``None``. A missing folder holds nothing.
        unowned_max_age_s: Age after which a folder without an owner file is removed.

    Returns:
        The folders removed.
    """
    base = Path(tempfile.gettempdir()) if parent is None else Path(parent)
    try:
        entries = sorted(base.glob(f"{JOB_DIR_PREFIX}*"))
    except OSError as exc:
        log.warning("could not list %s for stale job folders: %s", base, exc)
        return []
    removed: list[Path] = []
    now = time.time()
    for job_dir in entries:
        if job_dir.is_symlink() or not job_dir.is_dir():
            continue
        owner = _read_owner(job_dir)
        # an owner file without the pid namespace was written by an older worker: on this host
        # it counts as no owner file (the age rule), on another host it is left alone
        if owner is not None and (owner.pid_ns is not None or owner.host != socket.gethostname()):
            reason = owner.gone()
        else:
            try:
                age = now - job_dir.lstat().st_mtime
            except FileNotFoundError:
                continue
            too_old = age > unowned_max_age_s
            reason = f"no owner file, unmodified for {age / 60:.0f} min" if too_old else None
        if reason is None:
            continue
        try:
            shutil.rmtree(job_dir)
        except FileNotFoundError:
            continue  # another worker removed it first
        except OSError as exc:
            log.warning("could not remove stale job folder %s (%s): %s", job_dir, reason, exc)
            continue
        log.info("removed stale job folder %s (%s)", job_dir, reason)
        removed.append(job_dir)
    return removed
