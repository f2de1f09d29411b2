"""Load test of the queue runner: N tiny jobs over W worker processes, exactly once each.

Run by hand (the broker must be running on ``RABBITMQ_HOST`` or 127.0.0.1:5672)::

    .venv/bin/python benchmarks/load_test.py --jobs 30 --workers 2

It starts moto's S3 server and a webhook receiver in this process, ``--workers``
``lightning-lora-worker`` subprocesses on a fresh queue, publishes ``--jobs`` jobs (tiny model,
1 epoch, 2 images each), waits for every terminal webhook, stops the workers with SIGTERM and
checks that each job completed exactly once, nothing failed and both queues are empty. It prints
jobs/min and the p50/p95 latency from publishing a message to receiving its completion webhook.
Exit status 0 when all checks pass. ``tests/benchmarks/test_load_test.py`` runs a small version
in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_lora.worker.broker import BrokerSettings, publish_job  # noqa: E402
from tests.support.broker import channel, depth  # noqa: E402
from tests.support.receiver import WebhookReceiver  # noqa: E402
from tests.support.s3 import fake_aws_env, start_moto_server  # noqa: E402

COMPLETE_PATH = "/api/webhooks/training/complete"
FAILED_PATH = "/api/webhooks/training/failed"
PROGRESS_PATH = "/api/webhooks/training/progress"
WORKER_SCRIPT = Path(sys.executable).parent / "lightning-lora-worker"
TRAIN_OVERRIDES = (
    "callbacks=production",
    "model=tiny",
    "trainer=cpu",
    "data.resolution=64",
    "data.batch_size=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "module.gradient_checkpointing=false",
    "reporting.webhook.interval_s=5",
    "reporting.s3_checkpoint.every_n_epochs=0",
)


@dataclasses.dataclass
class LoadResult:
    """What a load run measured and found.

    Attributes:
        jobs: Jobs published.
        workers: Worker processes.
        wall_s: First publish to last terminal webhook, in seconds.
        latencies_s: Per completed job, publish to completion webhook received.
        completions: Style id -> accepted completion webhooks.
        failures: Style id -> failure webhooks.
        queue_depth: Messages left in the work queue after the workers stopped.
        dlq_depth: Messages in the dead-letter queue after the workers stopped.
        worker_exit_codes: Exit status of each worker after SIGTERM.
        log_dir: Where the workers' logs are.
        steady_s: First progress webhook (a worker started training) to the last terminal
            webhook: the wall time without the workers' start-up (imports, model load).
        service_s: Per job, the worker's own ``total_s`` (download, training, upload, report),
            read from the ``timings:`` log lines.
    """

    jobs: int
    workers: int
    wall_s: float
    latencies_s: list[float]
    completions: dict[int, int]
    failures: dict[int, int]
    queue_depth: int
    dlq_depth: int
    worker_exit_codes: list[int | None]
    log_dir: str
    steady_s: float = 0.0
    service_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def exactly_once(self) -> bool:
        """Every job completed exactly once and none failed."""
        return (
            all(self.completions.get(i, 0) == 1 for i in range(1, self.jobs + 1))
            and not any(self.failures.values())
            and len(self.completions) == self.jobs
        )

    @property
    def ok(self) -> bool:
        """Exactly once, both queues empty, every worker exited 0."""
        return (
            self.exactly_once
            and self.queue_depth == 0
            and self.dlq_depth == 0
            and all(code == 0 for code in self.worker_exit_codes)
        )

    @property
    def jobs_per_min(self) -> float:
        """Completed jobs per minute over the wall time."""
        return 60.0 * len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_jobs_per_min(self) -> float:
        """Completed jobs per minute once the workers were up."""
        return 60.0 * len(self.latencies_s) / self.steady_s if self.steady_s > 0 else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        """Percentile ``q`` (0..100, nearest rank) of the latencies (or of ``values``)."""
        values = sorted(self.latencies_s if values is None else values)
        if not values:
            return float("nan")
        rank = max(1, min(len(values), math.ceil(q / 100 * len(values))))
        return values[rank - 1]

    def summary(self) -> dict[str, object]:
        """The figures as a JSON-friendly dict."""
        return {
            "jobs": self.jobs,
            "workers": self.workers,
            "wall_s": round(self.wall_s, 1),
            "jobs_per_min": round(self.jobs_per_min, 2),
            "steady_s": round(self.steady_s, 1),
            "steady_jobs_per_min": round(self.steady_jobs_per_min, 2),
            "service_p50_s": round(self.percentile(50, self.service_s), 2),
            "service_p95_s": round(self.percentile(95, self.service_s), 2),
            "latency_p50_s": round(self.percentile(50), 1),
            "latency_p95_s": round(self.percentile(95), 1),
            "latency_mean_s": round(statistics.fmean(self.latencies_s), 1)
            if self.latencies_s
            else None,
            "exactly_once": self.exactly_once,
            "queue_depth": self.queue_depth,
            "dlq_depth": self.dlq_depth,
            "worker_exit_codes": self.worker_exit_codes,
            "ok": self.ok,
            "log_dir": self.log_dir,
        }


def _service_times(logs: Path) -> list[float]:
    """The ``total_s`` of every ``job ... timings:`` line in the workers' logs."""
    pattern = re.compile(r" timings: .*total_s=([0-9.]+)")
    times = []
    for path in sorted(logs.glob("worker*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                times.append(float(match.group(1)))
    return times


def _prepare_assets(cache: Path) -> list[Path]:
    """Build the tiny model and two demo images in ``cache`` (idempotent)."""
    os.environ["LIGHTNING_LORA_CACHE"] = str(cache)
    from lightning_lora.demo.images import make_demo_images
    from lightning_lora.training.models import tiny_model_path

    tiny_model_path(cache)
    return sorted(make_demo_images(cache / "demo-style-load").glob("*.png"))[:2]


def run_load(
    jobs: int,
    workers: int,
    *,
    timeout_s: float = 1800.0,
    cache_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    settle_s: float = 2.0,
) -> LoadResult:
    """Run the load test and return what it measured (never raises on a failed check).

    Args:
        jobs: Jobs to publish.
        workers: Worker processes to start.
        timeout_s: Most seconds to wait for all terminal webhooks.
        cache_dir: Cache for the tiny model (``LIGHTNING_LORA_CACHE`` or the default).
        log_dir: Folder for the workers' logs (a fresh temporary folder when ``None``).
        settle_s: Seconds to wait after the last webhook for (wrong) duplicates.

    Returns:
        The measurements and checks.
    """
    from lightning_lora.training.models import default_cache_dir

    cache = Path(cache_dir or os.environ.get("LIGHTNING_LORA_CACHE") or default_cache_dir())
    images = _prepare_assets(cache)
    logs = Path(log_dir or tempfile.mkdtemp(prefix="ll-load-"))
    logs.mkdir(parents=True, exist_ok=True)
    name = f"load_{uuid.uuid4().hex[:10]}"
    broker = BrokerSettings(
        host=os.environ.get("RABBITMQ_HOST", "127.0.0.1"), queue=name, connection_name=name
    )
    moto = start_moto_server()
    receiver = WebhookReceiver().start()
    procs: list[subprocess.Popen] = []
    sinks = []
    try:
        bucket = moto.create_bucket()
        urls = []
        for i, png in enumerate(images):
            key = f"styles/load/{i}.png"
            moto.admin_client.upload_file(str(png), bucket, key)
            urls.append(f"s3://{bucket}/{key}")
        env = {
            **os.environ,
            **fake_aws_env(moto.endpoint_url, bucket),
            "LIGHTNING_LORA_CACHE": str(cache),
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_QUEUE": broker.queue,
            "RABBITMQ_HEARTBEAT": "10",
            "INTERNAL_API_TOKEN": "load-test-token",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        args = [
            str(WORKER_SCRIPT),
            *TRAIN_OVERRIDES,
            "worker.webhook_allowlist=[127.0.0.1]",
            "worker.grace_period_s=60",
        ]
        for w in range(workers):
            sink = (logs / f"worker{w}.log").open("w", encoding="utf-8")
            sinks.append(sink)
            procs.append(
                subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
            )
        published: dict[int, float] = {}
        for style_id in range(1, jobs + 1):
            job = {
                "style_id": style_id,
                "image_urls": urls,
                "webhook_url": receiver.base_url,
                "seed": style_id,
            }
            published[style_id] = time.monotonic()
            publish_job(broker, job, message_id=f"{name}-{style_id}")
        start = min(published.values())

        def terminal_ids(reqs: list) -> set[int]:
            return {
                (r.json or {}).get("style_id")
                for r in reqs
                if r.path in (COMPLETE_PATH, FAILED_PATH) and 200 <= r.status < 300
            }

        try:
            receiver.wait_for(lambda reqs: len(terminal_ids(reqs)) >= jobs, timeout_s)
        except AssertionError:
            print(f"timed out after {timeout_s:.0f}s", file=sys.stderr)
        requests = receiver.requests
        ends = [r.received_at for r in requests if r.path in (COMPLETE_PATH, FAILED_PATH)]
        wall = (max(ends) - start) if ends else 0.0
        firsts = [r.received_at for r in requests if r.path == PROGRESS_PATH]
        steady = (max(ends) - min(firsts)) if ends and firsts else 0.0
        time.sleep(settle_s)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(120))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        requests = receiver.requests
        completions: dict[int, int] = {}
        failures: dict[int, int] = {}
        latencies = []
        for r in requests:
            sid = (r.json or {}).get("style_id")
            if r.path == COMPLETE_PATH and 200 <= r.status < 300:
                completions[sid] = completions.get(sid, 0) + 1
                if completions[sid] == 1 and sid in published:
                    latencies.append(r.received_at - published[sid])
            elif r.path == FAILED_PATH:
                failures[sid] = failures.get(sid, 0) + 1
        return LoadResult(
            jobs=jobs,
            workers=workers,
            wall_s=wall,
            latencies_s=latencies,
            completions=completions,
            failures=failures,
            queue_depth=depth(broker.queue),
            dlq_depth=depth(broker.dlq),
            worker_exit_codes=codes,
            log_dir=str(logs),
            steady_s=steady,
            service_s=_service_times(logs),
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        for sink in sinks:
            sink.close()
        receiver.stop()
        moto.stop()
        try:
            with channel() as ch:
                ch.queue_delete(broker.queue)
                ch.queue_delete(broker.dlq)
        except Exception as exc:  # the figures matter more than the cleanup
            print(f"could not delete the test queues: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the load test, print the figures as JSON, exit 1 on a failed check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for all jobs")
    parser.add_argument("--log-dir", default=None, help="folder for the workers' logs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run_load(args.jobs, args.workers, timeout_s=args.timeout, log_dir=args.log_dir)
    print(json.dumps(result.summary(), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
