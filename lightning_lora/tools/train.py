"""``lightning-lora-train``: the Hydra entry point, a thin wrapper around :func:`train`.

``python -m lightning_lora.tools.train`` works too (process-based launchers pickle :func:`main`
by reference).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lightning_lora.config import CONFIG_DIR
from lightning_lora.training.run import train

__all__ = ["main"]

log = logging.getLogger(__name__)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``lightning-lora-train``: train with Hydra overrides; returns the sweep objective."""
    result = train(cfg)
    if result.lora is not None:
        print(f"LoRA (diffusers): {result.lora.diffusers}")
        print(f"LoRA (kohya):     {result.lora.kohya or 'not written (DoRA: diffusers only)'}")
        if result.sample_grid:
            print(f"samples:          {result.sample_grid}")
        if result.lora.card:
            print(f"model card:       {result.lora.card}")
        print(f"metrics:          {result.output_dir / 'summary.json'}")
    name = str(cfg.get("optimized_metric", "val/loss"))
    try:
        return result.objective(name)
    except KeyError:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweeper must never optimise a missing value
        log.warning("optimized_metric %r was not logged by this run", name)
        return None


if __name__ == "__main__":
    # `python -m lightning_lora.tools.train`: run the importable `main` (not `__main__.main`), so
    # that process-based launchers (hydra/launcher=local_parallel) pickle the task by reference
    from lightning_lora.tools.train import main as _importable_main

    _importable_main()
