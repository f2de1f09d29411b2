"""The Hydra app ``lightning-lora-train`` (``lightning_lora.tools.train``): overrides, multirun,
outputs, an Optuna search."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from lightning_lora.lora.export import read_metadata
from lightning_lora.tools import sweep_report
from tests.conftest import TINY_OVERRIDES
from tests.support.trained_runs import run_summary

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

SCRIPT = Path(sys.executable).parent / "lightning-lora-train"


def _run(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_LORA_CACHE": str(cache), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_single_run_with_overrides(tmp_path: Path, ll_cache: Path, demo_images: Path) -> None:
    run_dir = tmp_path / "single"
    proc = _run(
        [
            *TINY_OVERRIDES,
            f"data.image_dir={demo_images}",
            "lora.rank=2",
            "lora.alpha=3",
            "trainer.max_epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        ll_cache,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"LoRA (diffusers): {run_dir}/lora/pytorch_lora_weights.safetensors" in proc.stdout
    meta = read_metadata(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "3")
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert "rank: 2" in saved and "alpha: 3" in saved  # the resolved config is saved
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["val/loss"] > 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["versions"]["torch"] != "unknown" and info["versions"]["python"]


def test_multirun_gives_one_folder_per_run(
    tmp_path: Path, ll_cache: Path, demo_images: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = _run(
        [
            "-m",
            *TINY_OVERRIDES,
            f"data.image_dir={demo_images}",
            "trainer.max_epochs=1",
            "lora.rank=2,4",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        ll_cache,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(
        read_metadata(sweep_dir / str(i) / "lora" / "pytorch_lora_weights.safetensors")[
            "ss_network_dim"
        ]
        for i in (0, 1)
    )
    assert ranks == ["2", "4"]


def test_bad_override_names_the_key(tmp_path: Path, ll_cache: Path) -> None:
    proc = _run(["model=tiny", "trainer=cpu", "lora.rnak=4"], ll_cache, tmp_path)
    assert proc.returncode != 0
    assert "lora.rnak" in proc.stderr


@contextmanager
def _restored_logging() -> Iterator[None]:
    """Undo Hydra's job logging setup after an in-process Hydra app."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def _run_hydra_app(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``lightning-lora-train <argv>`` in this process (saves a subprocess' start-up)."""
    from hydra.core.global_hydra import GlobalHydra

    from lightning_lora.tools.train import main

    monkeypatch.setattr(sys, "argv", ["lightning-lora-train", *argv])
    try:
        with _restored_logging():
            main()
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.usefixtures("one_thread")
def test_optuna_search_runs_two_tiny_trials(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_dir = tmp_path / "optuna"
    _run_hydra_app(
        [
            "-m",
            "hparams_search=sd15_optuna",
            "experiment=tiny",
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=1",
            "validation.prompts=[]",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        monkeypatch,
    )
    runs = sweep_report.find_run_dirs(sweep_dir)
    assert len(runs) == 2
    losses = []
    for run in runs:
        overrides = dict(
            o.split("=", 1)
            for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text("utf-8"))
        )
        assert int(overrides["lora.rank"]) in (4, 8, 16, 32)
        assert int(overrides["lora.alpha"]) in (4, 8, 16, 32)
        assert 1e-5 <= float(overrides["module.optimizer.lr"]) <= 1e-3
        assert overrides["trainer.max_epochs"] == "1"  # pinned on the command line
        summary = run_summary(run)
        assert summary["metadata"]["network_dim"] == int(overrides["lora.rank"])
        losses.append(summary["metrics"]["val/loss"])
    # the Hydra app returned val/loss to the sweeper, which minimised it
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text("utf-8"))
    assert results["best_value"] == pytest.approx(min(losses))
    with open(sweep_dir / "sweep_report.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2
