"""Job folders of crashed workers are removed; those of live processes never are."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lightning_lora.worker.jobdirs import OWNER_FILE, make_job_dir, remove_stale_job_dirs

ROOT = Path(__file__).resolve().parents[2]

OWNER_SCRIPT = """
import sys, time
from pathlib import Path
from lightning_lora.worker.jobdirs import make_job_dir
job_dir = make_job_dir(Path(sys.argv[1]), "style-7")
(job_dir / "images").mkdir()
(job_dir / "images" / "img_0001.png").write_bytes(b"x" * 1024)
print(job_dir, flush=True)
time.sleep(600)
"""


class Owner:
    """A real subprocess that made a job folder and is still running."""

    def __init__(self, parent: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", OWNER_SCRIPT, str(parent)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        line = self.process.stdout.readline()
        assert line, "the owner subprocess died before making its folder"
        self.job_dir = Path(line.strip())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)  # reaped: the pid is gone

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.process.stdout.close()


@pytest.fixture
def owners(tmp_path: Path) -> Iterator[list[Owner]]:
    started: list[Owner] = []
    yield started
    for owner in started:
        owner.close()


def test_folder_of_a_sigkilled_owner_is_removed(
    tmp_path: Path, owners: list[Owner], caplog: pytest.LogCaptureFixture
) -> None:
    owner = Owner(tmp_path)
    owners.append(owner)
    assert owner.job_dir.parent == tmp_path and owner.job_dir.name.startswith("ll-job-style-7-")
    assert (owner.job_dir / "images" / "img_0001.png").is_file()
    assert remove_stale_job_dirs(tmp_path) == []  # alive: kept
    assert owner.job_dir.is_dir()

    pid = owner.process.pid
    owner.kill()
    caplog.set_level(logging.INFO, logger="lightning_lora.worker.jobdirs")
    assert remove_stale_job_dirs(tmp_path) == [owner.job_dir]
    assert not owner.job_dir.exists()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"removed stale job folder {owner.job_dir} (owner pid {pid} is not running)"]
    assert remove_stale_job_dirs(tmp_path) == []


def test_folder_of_a_live_owner_is_kept(tmp_path: Path, owners: list[Owner]) -> None:
    live, dead = Owner(tmp_path), Owner(tmp_path)
    owners.extend([live, dead])
    dead.kill()
    assert remove_stale_job_dirs(tmp_path) == [dead.job_dir]
    assert live.job_dir.is_dir() and (live.job_dir / "images" / "img_0001.png").is_file()


def test_our_own_folder_is_kept(tmp_path: Path) -> None:
    job_dir = make_job_dir(tmp_path, "42")
    owner = json.loads((job_dir / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()
    assert owner["create_time"] == psutil.Process().create_time()
    assert remove_stale_job_dirs(tmp_path) == []
    assert job_dir.is_dir()


def test_live_pid_with_a_different_create_time_is_removed(
    tmp_path: Path, owners: list[Owner]
) -> None:
    # the pid is running, but it is not the process that made the folder (pid reuse)
    live = Owner(tmp_path)
    owners.append(live)
    owner_file = live.job_dir / OWNER_FILE
    owner = json.loads(owner_file.read_text())
    assert owner["pid"] == live.process.pid
    owner["create_time"] -= 3600
    owner_file.write_text(json.dumps(owner))
    assert remove_stale_job_dirs(tmp_path) == [live.job_dir]
    assert live.process.poll() is None  # the process itself is untouched


def test_folders_without_owner_file_are_removed_only_when_old(tmp_path: Path) -> None:
    old, fresh, garbled = (tmp_path / f"ll-job-{n}-abc" for n in ("old", "fresh", "garbled"))
    for folder in (old, fresh, garbled):
        folder.mkdir()
    (garbled / OWNER_FILE).write_text("{not json")
    two_hours_ago = time.time() - 7200
    for folder in (old, garbled):
        os.utime(folder, (two_hours_ago, two_hours_ago))
    assert sorted(remove_stale_job_dirs(tmp_path)) == sorted([old, garbled])
    assert fresh.is_dir()
    assert remove_stale_job_dirs(tmp_path, unowned_max_age_s=-1) == [fresh]


def test_other_entries_and_foreign_hosts_are_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "not-a-job-dir"
    other.mkdir()
    os.utime(other, (0, 0))
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "ll-job-link").symlink_to(target)
    (tmp_path / "ll-job-file").write_text("x")
    foreign = tmp_path / "ll-job-foreign-abc"
    foreign.mkdir()
    (foreign / OWNER_FILE).write_text(
        json.dumps({"pid": 2**22 + 12345, "create_time": 1.0, "host": "another-host"})
    )
    assert remove_stale_job_dirs(tmp_path, unowned_max_age_s=-1) == []
    assert other.is_dir() and target.is_dir() and foreign.is_dir()
    assert (tmp_path / "ll-job-link").is_symlink() and (tmp_path / "ll-job-file").is_file()


def test_default_parent_is_the_temp_dir_and_names_are_sanitised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    job_dir = make_job_dir(None, "../evil name/x")
    assert job_dir.parent == tmp_path
    assert job_dir.name.startswith("ll-job-.._evil_name_x-")
    assert remove_stale_job_dirs(None) == [] and job_dir.is_dir()
    assert remove_stale_job_dirs(tmp_path / "missing") == []


def test_an_older_workers_owner_file_without_a_pid_namespace(tmp_path: Path) -> None:
    """Owner files of workers before the pid-namespace field: on this host they count as no
    owner file (removed once unmodified for the age limit), on another host they are kept."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, there = tmp_path / "ll-job-here-abc", tmp_path / "ll-job-there-abc"
    for folder, host in ((here, socket.gethostname()), (there, "another-host")):
        folder.mkdir()
        record = {"pid": dead.pid, "create_time": time.time() - 100, "host": host}
        (folder / OWNER_FILE).write_text(json.dumps(record))
    assert remove_stale_job_dirs(tmp_path) == []  # fresh: its pid alone proves nothing
    assert remove_stale_job_dirs(tmp_path, unowned_max_age_s=-1) == [here]
    assert there.is_dir()
