"""Lightning checkpoints in S3 (uploaded in the background) and resuming from them.

:class:`S3CheckpointCallback` writes a LoRA-only Lightning checkpoint (``LoRAModule`` drops the
frozen base in ``on_save_checkpoint``; optimizer, scheduler, loop and RNG states are kept) every
``every_n_epochs`` epochs with ``trainer.save_checkpoint`` into a job-local folder, then uploads it
to ``s3://{bucket}/{prefix}epoch{EEEE}-step{SSSSSS}.ckpt`` from a background thread, so training
does not wait on the network. The job hands it the prefix (``checkpoints/style_{id}/{run_id}/``,
:mod:`lightning_lora.jobs.layout`). ``EEEE`` is the 0-based index of the epoch just finished and
``SSSSSS`` the global step (the names sort by age; ``ModelCheckpoint``'s naming).

* While an upload runs, the newest checkpoint waits (one at most); an older waiting one is
  dropped.
* After each successful upload, older checkpoints under the prefix beyond ``keep_last`` are deleted
  from S3. Local files are removed once their upload was attempted.
* A failed checkpoint upload is logged as a warning and training goes on; the next checkpoint is
  the retry. (The *final* LoRA upload is different: it is fatal, see
  :func:`lightning_lora.jobs.runner.upload_final_lora`.)
* When ``fit`` ends (normally or by an exception) the callback waits at most ``final_wait_s`` for
  the upload in progress and the waiting one, then stops its thread.

``trainer.save_checkpoint`` is called on every rank (it is collective); only global rank zero
uploads.

:func:`find_resume_checkpoint` lists the checkpoints under a prefix, downloads the newest and checks
that it loads (``torch.load`` with ``weights_only=True``: a file from the bucket cannot run code)
and has ``state_dict`` and ``loops``; a corrupt or partial one is skipped with a warning and the
next older one is tried. ``train(cfg, callbacks, ckpt_path=path)`` then resumes from it.

Config: ``reporting.s3_checkpoint`` (``configs/reporting/default.yaml``) is a ``_partial_`` target
(``every_n_epochs``, ``keep_last``, ``dirpath``, ``final_wait_s``): the callback needs the job's
checkpoint prefix and an :class:`~lightning_lora.clients.storage.S3Storage`, so
:func:`lightning_lora.jobs.runner.run_reported_training` completes it per job.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_lora.clients.background import LatestOnlyWorker
from lightning_lora.clients.redaction import redact
from lightning_lora.clients.storage import S3Storage

__all__ = [
    "S3CheckpointCallback",
    "checkpoint_name",
    "find_resume_checkpoint",
    "list_checkpoints",
    "parse_checkpoint_name",
]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"(?:^|/)epoch(\d+)-step(\d+)\.ckpt$")


def checkpoint_name(epoch: int, step: int) -> str:
    """Return a checkpoint's file name: ``epoch{epoch:04d}-step{step:06d}.ckpt``.

    Args:
        epoch: 0-based index of the epoch just finished.
        step: Global optimizer step.
    """
    return f"epoch{epoch:04d}-step{step:06d}.ckpt"


def parse_checkpoint_name(key: str) -> tuple[int, int] | None:
    """Return ``(epoch, step)`` from a checkpoint key or file name, or ``None`` if not one."""
    match = _NAME_RE.search(key)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def list_checkpoints(storage: S3Storage, prefix: str) -> list[str]:
    """Keys of the checkpoints directly under ``prefix``, newest (highest epoch, then step) first.

    Args:
        storage: The bucket.
        prefix: A run's checkpoint folder, ending in ``/``.

    Returns:
        Keys under ``prefix`` (not in its subfolders) named like :func:`checkpoint_name`.

    Raises:
        DownloadError: The listing failed.
    """
    keyed = []
    for key in storage.list_keys(prefix):
        if "/" in key[len(prefix) :]:
            continue  # another run's folder
        parsed = parse_checkpoint_name(key)
        if parsed is not None:
            keyed.append((parsed, key))
    keyed.sort(reverse=True)
    return [key for _, key in keyed]


def _check_checkpoint(path: Path, expect_lora: Mapping[str, Any] | None) -> str | None:
    """Return why ``path`` is not a usable checkpoint, or ``None`` if it is."""
    try:
        # weights_only: a checkpoint fetched from the bucket must not be able to run code
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated, corrupt, not a torch file...
        return f"does not load ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(checkpoint, dict):
        return f"is a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [k for k in ("state_dict", "loops") if k not in checkpoint]
    if missing:
        return f"lacks {', '.join(missing)}"
    saved = checkpoint.get("lora_config")
    if expect_lora and isinstance(saved, Mapping):
        for name, value in expect_lora.items():
            if name in saved and saved[name] != value:
                return f"has LoRA {name} {saved[name]!r}, this run uses {value!r}"
    return None


def find_resume_checkpoint(
    storage: S3Storage,
    prefix: str,
    dest_dir: str | Path,
    expect_lora: Mapping[str, Any] | None = None,
) -> Path | None:
    """Download the newest usable checkpoint under ``prefix``, for ``train(..., ckpt_path=...)``.

    Checkpoints are tried newest first (by epoch, then step, from their names); one that cannot
    be downloaded, does not load, lacks ``state_dict``/``loops`` or (with ``expect_lora``) was
    trained with another LoRA rank/alpha is skipped with a warning.

    Args:
        storage: The bucket.
        prefix: The run's checkpoint folder (a new job never resumes another job's run).
        dest_dir: Local folder for the download (created if missing).
        expect_lora: E.g. ``{"rank": 16, "alpha": 32}``: skip checkpoints whose saved
            ``lora_config`` differs.

    Returns:
        The local checkpoint path, or ``None`` when there is no usable checkpoint.

    Raises:
        DownloadError: The checkpoints could not be listed.
    """
    dest = Path(dest_dir)
    for key in list_checkpoints(storage, prefix):
        local = dest / Path(key).name
        try:
            storage.download_file(key, local)
        except Exception as exc:
            log.warning("skipping checkpoint %s: %s", storage.s3_url(key), redact(str(exc)))
            continue
        problem = _check_checkpoint(local, expect_lora)
        if problem is None:
            log.info("resuming from %s", storage.s3_url(key))
            return local
        log.warning(
            "skipping checkpoint %s: it %s; trying an older one", storage.s3_url(key), problem
        )
        local.unlink(missing_ok=True)
    return None


class S3CheckpointCallback(L.Callback):
    """Saves a LoRA-only checkpoint every N epochs and uploads it to S3 in the background.

    Attributes:
        storage: The bucket.
        prefix: The run's checkpoint folder in the bucket.
        every_n_epochs: Checkpoint period in epochs (0 disables).
        keep_last: How many checkpoints of the run to keep in S3 (0 keeps all).
        uploaded: Keys uploaded by this callback, in order.
        failed: Number of failed checkpoint uploads.
        superseded: Number of checkpoints dropped because a newer one came before upload.
    """

    def __init__(
        self,
        storage: S3Storage,
        prefix: str,
        dirpath: str | Path | None = None,
        every_n_epochs: int = 5,
        keep_last: int = 2,
        final_wait_s: float = 300.0,
    ) -> None:
        """Configure.

        Args:
            storage: The bucket checkpoints go to.
            prefix: The run's checkpoint folder in the bucket (ends in ``/``).
            dirpath: Job-local folder for the checkpoint files; defaults to
                ``{trainer.default_root_dir}/s3_checkpoints``.
            every_n_epochs: Save and upload every this many epochs (0 disables).
            keep_last: Checkpoints of the run kept in S3; older ones are deleted (0 keeps all).
            final_wait_s: Most seconds to wait for pending uploads when ``fit`` ends.
        """
        if not prefix.endswith("/"):
            raise ValueError(f"checkpoint prefix {prefix!r} must end in '/'")
        self.storage = storage
        self.prefix = prefix
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_epochs = max(0, int(every_n_epochs))
        self.keep_last = max(0, int(keep_last))
        self.final_wait_s = float(final_wait_s)
        self.uploaded: list[str] = []
        self.failed = 0
        self.superseded = 0
        self._uploader: LatestOnlyWorker[tuple[Path, str]] | None = None
        self._last_step: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prefix={self.prefix!r}, every_n_epochs="
            f"{self.every_n_epochs}, keep_last={self.keep_last}, storage={self.storage!r})"
        )

    # ----------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "s3_checkpoints"

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
            return
        self.checkpoint_now(trainer)

    def checkpoint_now(self, trainer: L.Trainer) -> None:
        """Save a checkpoint of the current state and hand it to the uploader (idempotent per step).

        Also used by the worker on shutdown, at an epoch end, before it requeues the job.
        """
        if self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "s3_checkpoints"
        name = checkpoint_name(trainer.current_epoch, trainer.global_step)
        path = self.dirpath / name
        started = time.perf_counter()
        trainer.save_checkpoint(path)  # collective: every rank calls it, rank zero writes
        if not trainer.is_global_zero:
            return
        log.debug("checkpoint %s written in %.2fs", name, time.perf_counter() - started)
        if self._uploader is None:
            self._uploader = LatestOnlyWorker(
                lambda job: self._upload(*job),
                "s3-checkpoints",
                drain_on_close=False,
                on_error=lambda exc: log.warning(  # _upload logs its own; this is a last resort
                    "checkpoint upload failed unexpectedly: %s", redact(repr(exc))
                ),
            )
        accepted, dropped = self._uploader.offer_latest((path, self.prefix + name))
        if not accepted:
            log.warning("checkpoint uploader closed: %s not uploaded", path.name)
        elif dropped is not None:
            log.info("checkpoint %s superseded by %s before upload", dropped[0].name, path.name)
            self.superseded += 1
            dropped[0].unlink(missing_ok=True)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._finish()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()

    # ----------------------------------------------------------------- uploading

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for pending uploads and stop the upload thread (idempotent).

        Args:
            timeout_s: Most seconds to wait; ``final_wait_s`` when ``None``.

        Returns:
            Whether every checkpoint handed over was uploaded or given up in time.
        """
        uploader, self._uploader = self._uploader, None
        if uploader is None:
            return True
        timeout = self.final_wait_s if timeout_s is None else timeout_s
        idle, dropped = uploader.close(timeout)
        for path, _ in dropped:
            log.warning("checkpoint %s not uploaded: time is up", path.name)
        if not idle:
            log.warning("a checkpoint upload still runs after %.0fs; not waiting", timeout)
        return idle

    _finish = wait

    def _upload(self, path: Path, key: str) -> None:
        """Upload one checkpoint, then prune (runs on the upload thread; never raises)."""
        started = time.perf_counter()
        try:
            self.storage.upload_file(path, key, extra_metadata={"kind": "checkpoint"})
        except Exception as exc:
            self.failed += 1
            log.warning(
                "checkpoint upload failed (training goes on; the next checkpoint retries): %s",
                redact(str(exc)),
            )
            return
        finally:
            path.unlink(missing_ok=True)  # uploaded, or superseded by the next checkpoint
        self.uploaded.append(key)
        log.info(
            "checkpoint %s uploaded in %.1fs",
            self.storage.s3_url(key),
            time.perf_counter() - started,
        )
        self._prune()

    def _prune(self) -> None:
        if not self.keep_last:
            return
        try:
            old = list_checkpoints(self.storage, self.prefix)[self.keep_last :]
            if old:
                self.storage.delete_keys(old)
                log.info("deleted %d old checkpoint(s) under %s", len(old), self.prefix)
        except Exception as exc:
            log.warning("could not delete old checkpoints: %s", redact(str(exc)))
