"""Config composition (``lightning_lora.config`` and ``lightning_lora/configs``): the experiment
presets compose and train, launchers, sweepers and loggers compose, and the Optuna recipe search
names real knobs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lightning_lora.config import CONFIG_DIR, compose_config
from lightning_lora.training.run import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


#: Presets meant for a GPU: run on CPU at full precision without compiling.
GPU_PRESETS = {"sd15_fast", "sd15_quality", "sd15_locon", "sd15_loha", "sd15_lokr"}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={name}"], output_dir=tmp_path)
    assert cfg.lora.rank >= 1 and cfg.trainer.max_epochs >= 1
    if name == "sd15_fast":
        assert cfg.trainer.precision == "bf16-mixed"
        assert cfg.data.cache_latents and cfg.data.batch_size == 8
        assert not cfg.module.gradient_checkpointing
        assert cfg.module.optimizer.fused is True
        assert cfg.module.compile_mode == "default" and cfg.module.channels_last
    if name == "sd15_quality":
        assert cfg.module.gradient_checkpointing
        assert cfg.module.scheduler._target_.endswith("get_cosine_schedule_with_warmup")
        assert cfg.module.snr_gamma == 5 and cfg.data.random_flip
        base = compose_config([], output_dir=tmp_path)
        assert cfg.module.optimizer.lr < base.module.optimizer.lr
        assert cfg.trainer.max_epochs > compose_config(["experiment=sd15_fast"]).trainer.max_epochs
    if name in ("sd15_locon", "sd15_loha", "sd15_lokr"):  # the quality recipe, another network
        assert cfg.lora.type == name.removeprefix("sd15_") and cfg.module.snr_gamma == 5
    if name == "tiny":
        assert cfg.trainer.accelerator == "cpu" and cfg.data.resolution == 64
        assert cfg.trainer.max_epochs <= 2


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_expected_presets_exist() -> None:
    assert {"tiny", "demo", "sd15_fast", "sd15_quality"} <= set(EXPERIMENTS)
    assert {"sd15_locon", "sd15_loha", "sd15_lokr"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_runs_tiny(name: str, make_cfg, tmp_path: Path) -> None:
    overrides = [
        f"experiment={name}",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=1",
        "module.compile_mode=none",
        "validation.num_inference_steps=2",
    ]
    if name in GPU_PRESETS:
        overrides.append("trainer.precision=32-true")
    result = train(make_cfg(*overrides, output_dir=tmp_path / name))
    assert result.metrics["steps"] == 1
    assert np.isfinite(result.metrics["val/loss"])
    assert result.lora is not None and result.lora.diffusers.is_file()


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_launcher_and_sweeper_configs_compose() -> None:
    cfg = _compose_with_hydra(["hydra/launcher=local_parallel", "experiment=tiny"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 2
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "hparams_search=sd15_optuna"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {
        "lora.rank",
        "lora.alpha",
        "module.optimizer.lr",
        "trainer.max_epochs",
    }
    assert cfg.optimized_metric == "val/loss"
    callback = cfg.hydra.callbacks.sweep_report._target_
    assert callback == "lightning_lora.tools.sweep_report.SweepReportCallback"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_optional_loggers_compose(tmp_path: Path) -> None:
    cfg = compose_config(["logger=[csv,tensorboard,wandb,mlflow]"], output_dir=tmp_path)
    targets = {name: node._target_ for name, node in cfg.logger.items()}
    assert targets == {
        "csv": "lightning.pytorch.loggers.CSVLogger",
        "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
        "wandb": "lightning.pytorch.loggers.WandbLogger",
        "mlflow": "lightning.pytorch.loggers.MLFlowLogger",
    }


def _first_value(spec: str) -> str:
    match = re.search(r"choice\(([^,)]+)", spec)
    if match:
        return match.group(1).strip()
    return re.search(r"interval\(([^,]+)", spec).group(1).strip()


def test_the_optuna_recipe_search_names_real_knobs() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train", overrides=["hparams_search=sd15_optuna_recipe"], return_hydra_config=True
            )
    finally:
        GlobalHydra.instance().clear()
    params = dict(cfg.hydra.sweeper.params)
    assert {
        "module.loss",
        "module.timestep_sampling",
        "module.ema.enabled",
        "lora.use_dora",
    } <= set(params)
    overrides = [f"{key}={_first_value(spec)}" for key, spec in params.items()]
    trial = compose_config(overrides)  # an unknown key would fail to compose
    for override in overrides:
        key, value = override.split("=", 1)
        node = trial
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value.lower() or float(node) == float(value), override
