"""The sweep report (``lightning_lora.tools.sweep_report``) of a multirun, and its CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lightning_lora.tools import sweep_report
from tests.support.trained_runs import BIN, run_summary

# trains: make test, not make test-fast
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_multirun_trains_two_loras_and_writes_the_sweep_report(tiny_multirun: Path) -> None:
    runs = sweep_report.find_run_dirs(tiny_multirun)
    assert [r.name for r in runs] == ["0", "1"]
    for run, rank in zip(runs, ("2", "4"), strict=True):
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text("utf-8"))
        assert f"lora.rank={rank}" in overrides
        summary = run_summary(run)
        assert Path(summary["lora"]).is_file()
        assert (run / "lora" / "lora_kohya.safetensors").is_file()
        assert summary["metadata"]["network_dim"] == int(rank)
        assert np.isfinite(summary["metrics"]["val/loss"])

    # written by the Hydra callback at the end of the multirun
    with open(tiny_multirun / "sweep_report.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [row["lora.rank"] for row in table] == ["2", "4"]
    for row, run in zip(table, runs, strict=True):
        metrics = run_summary(run)["metrics"]
        assert float(row["val/loss"]) == metrics["val/loss"]
        assert float(row["train_seconds"]) == metrics["train_seconds"]
        assert float(row["samples_per_s"]) == metrics["samples_per_s"]
        assert row["lora"] == run_summary(run)["lora"]
        assert row["status"] == "ok"
        assert "experiment=tiny" in row["overrides"]
    markdown = (tiny_multirun / "sweep_report.md").read_text("utf-8")
    assert markdown.count("| 0 | 2 |") == 1 and markdown.count("| 1 | 4 |") == 1
    with Image.open(tiny_multirun / "sweep_report.png") as plot:
        assert plot.width > 200 and plot.height > 200


def test_sweep_report_cli_rewrites_the_report(tiny_multirun: Path, tmp_path: Path, capsys) -> None:
    assert (BIN / "lightning-lora-sweep-report").is_file()
    assert sweep_report.main([str(tiny_multirun), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Best: run" in out and "| lora.rank |" in out
    assert (tmp_path / "sweep_report.csv").read_text("utf-8") == (
        tiny_multirun / "sweep_report.csv"
    ).read_text("utf-8")
    assert (tmp_path / "sweep_report.png").stat().st_size > 0


def _fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), "utf-8")
    if metrics is not None:
        summary = {"metrics": metrics, "metadata": {}, "lora": f"{run}/lora/x.safetensors"}
        (run / "summary.json").write_text(json.dumps(summary), "utf-8")


def test_sweep_report_handles_failed_runs_and_mixed_parameters(tmp_path: Path) -> None:
    metrics = {"val/loss": 0.5, "train_seconds": 10.0, "samples_per_s": 2.0}
    _fake_run(tmp_path, "0", ["module.optimizer.lr=1e-5", "module/scheduler=cosine"], metrics)
    _fake_run(tmp_path, "2", ["module.optimizer.lr=1e-3", "module/scheduler=constant"], None)
    _fake_run(
        tmp_path, "10", ["module.optimizer.lr=1e-3", "+extra=1"], {**metrics, "val/loss": 0.25}
    )
    report = sweep_report.write_report(tmp_path, direction="minimize")
    assert [r.run for r in report.rows] == ["0", "2", "10"]  # natural job order
    assert report.swept == ["module.optimizer.lr", "module/scheduler", "extra"]
    assert [r.status for r in report.rows] == ["ok", "missing summary", "ok"]
    assert report.best is not None and report.best.run == "10"
    assert report.plot_path is not None and report.plot_path.stat().st_size > 0
    assert "Best: run `10`" in report.markdown_path.read_text("utf-8")
    assert sweep_report.write_report(tmp_path, direction="maximize").best.run == "0"
