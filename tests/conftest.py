"""Shared fixtures: the tiny model and demo images (built once per session), tiny configs."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.broker",
    "tests.support.production_run",
    "tests.support.trained_runs",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the tiny model's ops are too small for intra-op threads: one thread per test process (and per
# worker subprocess, which inherits the variable) is several times faster on a 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

#: Overrides that make any config a fast CPU run on the tiny model.
TINY_OVERRIDES = (
    "model=tiny",
    "trainer=cpu",
    "data.resolution=64",
    "data.batch_size=4",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "module.gradient_checkpointing=false",
    "validation.every_n_epochs=1",
)


@pytest.fixture(scope="session")
def ll_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session cache folder holding the tiny model and the demo images."""
    cache = Path(os.environ.get("LIGHTNING_LORA_TEST_CACHE") or tmp_path_factory.mktemp("ll-cache"))
    os.environ["LIGHTNING_LORA_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(ll_cache: Path) -> str:
    """Path of the tiny SD1.5-shaped model (built on first use)."""
    from lightning_lora.training.models import tiny_model_path

    return tiny_model_path(ll_cache)


@pytest.fixture(scope="session")
def demo_images(ll_cache: Path) -> Path:
    """The demo style folder (8 images, half with captions)."""
    from lightning_lora.demo.images import make_demo_images

    return make_demo_images(ll_cache / "demo-style-test")


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_model: str, demo_images: Path) -> Callable[..., object]:
    """Factory: ``make_cfg(*overrides, output_dir=None)`` -> a tiny CPU training config."""

    def make(*overrides: str, output_dir: Path | None = None, image_dir: Path | None = None):
        base: Sequence[str] = (*TINY_OVERRIDES, f"data.image_dir={image_dir or demo_images}")
        cfg = copy.deepcopy(composed(*base, *overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
        return cfg

    return make


@functools.lru_cache(maxsize=128)
def composed(*overrides: str, config_name: str = "train") -> DictConfig:
    """A config composed once per set of overrides (callers deep-copy it before changing it)."""
    from lightning_lora.config import compose_config

    return compose_config(list(overrides), config_name=config_name)
