"""Trained runs shared across test modules, each made once per session.

* ``tiny_multirun``: ``lightning-lora-train -m experiment=tiny lora.rank=2,4`` in a subprocess
  (``tests/tools/test_sweep_report.py``, ``tests/test_notebooks.py``);
* ``same_config_twice``: two in-process runs of one config and seed
  (``tests/training/test_run.py``, ``tests/tools/test_generate.py``);
* ``one_thread``: one intra-op thread for a test (``pytest.mark.usefixtures("one_thread")``).

Registered as a plugin by the root ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_lora.config import compose_config
from lightning_lora.tools import sweep_report
from lightning_lora.training.run import train
from tests.conftest import TINY_OVERRIDES

BIN = Path(sys.executable).parent


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, far faster than oversubscribed threads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(ll_cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIGHTNING_LORA_CACHE": str(ll_cache),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def tiny_multirun(
    tmp_path_factory: pytest.TempPathFactory, ll_cache: Path, tiny_model: str
) -> Path:
    """``lightning-lora-train -m experiment=tiny lora.rank=2,4`` in a subprocess (run once)."""
    sweep_dir = tmp_path_factory.mktemp("multirun") / "sweep"
    overrides = ["experiment=tiny", "lora.rank=2,4", "trainer.enable_progress_bar=false"]
    assert (BIN / "lightning-lora-train").is_file()
    try:  # runs BIN/lightning-lora-train -m <overrides> hydra.sweep.dir=<sweep_dir>
        sweep_report.run_example_sweep(
            sweep_dir, overrides, env=subprocess_env(ll_cache), timeout=500
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"multirun failed:\n{exc.stdout[-3000:]}\n{exc.stderr[-5000:]}")
    return sweep_dir


def run_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text("utf-8"))


@pytest.fixture(scope="session")
def same_config_twice(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: str, demo_images: Path
) -> tuple:
    """Two runs of one config and seed; the high lr makes the LoRA visibly change images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("repro")
    overrides = [
        *TINY_OVERRIDES,
        f"data.image_dir={demo_images}",
        "module.optimizer.lr=2e-2",
        "validation.prompts=[]",
        "seed=7",
    ]
    try:
        return tuple(
            train(compose_config(overrides, output_dir=root / name)) for name in ("a", "b")
        )
    finally:
        torch.set_num_threads(threads)
