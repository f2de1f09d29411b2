"""End to end: a tiny-model job through the queue worker, from the message to the webhook.

The worker's :meth:`~lightning_lora.worker.app.TrainingWorker.handle` gets a delivery built from
a job message (no broker: the queue wait is not part of it); the images come from, and the
checkpoints and the LoRA go to, a local folder standing in for S3 (:class:`LocalStorage`); the
webhooks go to the tests' local HTTP server (``tests/support/receiver.py``, standard library
only), which records when each arrived.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.models import make_images

REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalStorage:
    """The bucket as a local folder (the e2e job's storage: transfers are file copies).

    Implements the part of :class:`~lightning_lora.clients.storage.S3Storage` the worker uses.
    """

    bucket = "bench"

    def __init__(self, root: Path, images: Sequence[Path]) -> None:
        self.root = root
        self.images = {f"s3://{self.bucket}/style/{p.name}": p for p in images}
        self.download_s = 0.0
        root.mkdir(parents=True, exist_ok=True)

    def s3_url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def download_images(self, urls: Sequence[str], dest_dir: Any, **_: Any) -> list[Path]:
        start = time.perf_counter()
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths = [
            Path(shutil.copy(self.images[url], dest / f"{i:04d}.jpg")) for i, url in enumerate(urls)
        ]
        self.download_s += time.perf_counter() - start
        return paths

    def upload_file(self, path: Any, key: str, extra_metadata: Any = None) -> str:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return self.s3_url(key)

    def download_file(self, key: str, dest: Any) -> Path:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(self.root / key, dest))

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def list_keys(self, prefix: str, page_size: int = 1000) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)).startswith(prefix)
        )

    def delete_keys(self, keys: Any) -> int:
        count = 0
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
            count += 1
        return count

    # single process: the conditional writes of the worker's ledger need no locking here
    def get_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        path = self.root / key
        if not path.is_file():
            return None
        raw = path.read_bytes()
        return json.loads(raw), hashlib.md5(raw).hexdigest()

    def put_json(
        self, key: str, record: Any, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        from lightning_lora.errors import PreconditionFailedError

        current = self.get_json(key)
        if (if_none_match and current is not None) or (
            if_match is not None and (current is None or current[1] != if_match)
        ):
            raise PreconditionFailedError(f"{key} was written by someone else")
        raw = json.dumps(dict(record), sort_keys=True).encode()
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        return hashlib.md5(raw).hexdigest()

    def delete_key(self, key: str, *, if_match: str | None = None) -> bool:
        current = self.get_json(key)
        if if_match is not None and current is not None and current[1] != if_match:
            return False
        (self.root / key).unlink(missing_ok=True)
        return True


class TimingsLog(logging.Handler):
    """Keeps the worker's ``job ... timings: k=v ...`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.timings: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " timings: " in message:
            pairs = message.split(" timings: ", 1)[1].split()
            self.timings = {k: float(v) for k, v in (p.split("=", 1) for p in pairs)}


def run_e2e(workdir: Path, cuda: bool, epochs: int = 10, images: int = 8) -> dict[str, Any]:
    """Run one tiny-model job through the worker and split its time into phases.

    Skipped (``{"skipped": reason}``) while the worker (pika, pydantic, ...) or the receiver is
    not importable, e.g. on a GPU image without those wheels.

    Args:
        workdir: Scratch folder (``<workdir>/e2e`` is recreated).
        cuda: Train on the GPU (``trainer=gpu``), else ``trainer=cpu``.
        epochs: The job's ``num_epochs``.
        images: Training images in the job.

    Returns:
        Phase seconds (the worker's own timing line plus ``message_to_complete_webhook_s``),
        the outcome and the webhooks received; or ``{"skipped": reason}``.
    """
    try:
        import threading
        import types

        from lightning_lora.worker.app import TrainingWorker, split_config
        from lightning_lora.worker.cli import compose_worker_config
        from lightning_lora.worker.deliveries import Delivery
        from lightning_lora.worker.settings import load_settings

        if str(REPO_ROOT) not in sys.path:  # the receiver lives in the repository's tests
            sys.path.append(str(REPO_ROOT))
        from tests.support.receiver import WebhookReceiver
    except Exception as exc:  # the worker's packages are optional here
        return {"skipped": f"the worker is not importable: {exc!r}"}
    root = workdir / "e2e"
    shutil.rmtree(root, ignore_errors=True)
    storage = LocalStorage(root / "bucket", make_images(root / "source", images, 64))
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    timings = TimingsLog()
    app_log = logging.getLogger("lightning_lora.worker.app")
    app_log.addHandler(timings)
    try:
        with WebhookReceiver() as receiver:
            train_cfg, section = split_config(
                compose_worker_config(
                    [
                        "model=tiny",
                        f"trainer={'gpu' if cuda else 'cpu'}",
                        "trainer.enable_progress_bar=false",
                        "data.batch_size=4",
                    ]
                )
            )
            settings = load_settings(
                {
                    **section,
                    "webhook_allowlist": [receiver.base_url],
                    "work_dir": str(root / "jobs"),
                    "resume_from_s3": False,
                },
                env={"INTERNAL_API_TOKEN": "bench-token", "S3_BUCKET": "bench-bucket"},
            )
            worker = TrainingWorker(train_cfg, settings, storage=storage)
            message = {
                "style_id": 4242,
                "image_urls": sorted(storage.images),
                "webhook_url": receiver.base_url,
                "num_epochs": epochs,
                "resolution": 64,
            }
            delivery = Delivery(
                body=json.dumps(message).encode(),
                properties=types.SimpleNamespace(message_id="bench-e2e"),
                headers={},
                delivery_tag=1,
                redelivered=False,
                delivery_count=0,
                published_at=None,
                stop_requested=threading.Event(),
            )
            start = time.monotonic()  # the receiver stamps requests with time.monotonic()
            outcome = worker.handle(delivery)
            total = time.monotonic() - start
            received = [(r.received_at, r.path) for r in receiver.requests]
    finally:
        app_log.removeHandler(timings)
    complete = [t for t, path in received if path.endswith("/complete")]
    phases = dict(timings.timings)
    if phases:
        known = sum(phases.get(k, 0.0) for k in ("download_s", "training_s", "upload_and_report_s"))
        phases["setup_and_config_s"] = max(0.0, phases.get("total_s", total) - known)
    return {
        "outcome": outcome.outcome.name if hasattr(outcome, "outcome") else str(outcome),
        "device": "cuda" if cuda else "cpu",
        "images": images,
        "epochs": epochs,
        "resolution": 64,
        "worker_timings": phases,
        "handle_s": total,
        "message_to_complete_webhook_s": complete[0] - start if complete else None,
        "webhooks": dict(Counter(path for _, path in received)),
        "storage": "local folder standing in for S3; webhooks to a local HTTP server",
    }
