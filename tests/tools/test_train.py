"""The Hydra app `lightning-lora-train`: overrides, multirun, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora.lora.export import read_metadata
from tests.conftest import TINY_OVERRIDES

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
