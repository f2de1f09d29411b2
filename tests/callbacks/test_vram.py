"""Memory logging (``lightning_lora.callbacks.vram``) in the session's production run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.support.production_run import ProductionRun

# trains: make test, not make test-fast
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_vram_callback_logs_rss_into_the_csv_logger(production_run: ProductionRun) -> None:
    metrics_csv = Path(production_run.cfg.paths.output_dir) / "csv" / "metrics.csv"
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rss = [float(r["mem/rss_gib"]) for r in rows if r.get("mem/rss_gib")]
    assert len(rss) >= 12  # every step (every_n_steps=1) and every epoch end
    assert all(v > 0 for v in rss)
    peaks = [float(r["mem/peak_rss_gib"]) for r in rows if r.get("mem/peak_rss_gib")]
    assert peaks == sorted(peaks)
    assert any("memory at step" in t for t in production_run.logs.texts)
