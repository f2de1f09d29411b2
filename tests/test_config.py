"""The training options compose: under the worker's config, and in the Optuna recipe search."""

from __future__ import annotations

import re

import pytest
from hydra.utils import instantiate

from lightning_lora.config import CONFIG_DIR, compose_config
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.worker.cli import compose_worker_config

OPTIONS = (
    "module/optimizer=prodigy",
    "module.loss=huber",
    "module.huber_c=0.2",
    "module.timestep_sampling=logit_normal",
    "module.logit_mean=0.5",
    "module.debiased_estimation=true",
    "module.ema.enabled=true",
    "module.ema.device=cpu",
    "lora.use_rslora=true",
    "lora.text_encoder.enabled=true",
    "lora.text_encoder.lr=5e-5",
)


def test_the_new_options_compose_under_the_worker_config() -> None:
    cfg = compose_worker_config(["model=tiny", *OPTIONS])
    assert cfg.task_name == "worker" and "worker" in cfg  # still the worker's config
    module = cfg.module
    assert module.optimizer._target_ == "lightning_lora.training.optimizers.prodigy"
    assert module.optimizer.lr == 1.0
    assert (module.loss, module.huber_c, module.timestep_sampling) == ("huber", 0.2, "logit_normal")
    assert module.debiased_estimation and module.ema.enabled and module.ema.device == "cpu"
    unet, text_encoder, lr = build_lora_configs(cfg.lora)
    assert unet.use_rslora and text_encoder is not None and text_encoder.use_rslora
    assert lr == 5e-5 and sorted(text_encoder.target_modules) == [
        "k_proj",
        "out_proj",
        "q_proj",
        "v_proj",
    ]
    # the training config's defaults are unchanged by the worker config
    plain = compose_worker_config(["model=tiny"])
    assert plain.module.optimizer._target_ == "torch.optim.AdamW"
    assert (plain.module.loss, plain.module.timestep_sampling) == ("l2", "uniform")
    assert not plain.module.ema.enabled and not plain.lora.text_encoder.enabled
    assert build_lora_configs(plain.lora)[1] is None


def test_a_dora_job_delivers_the_diffusers_file_only_and_drops_a_stale_kohya_file(
    s3_env, tmp_path
) -> None:
    from lightning_lora.jobs.layout import kohya_key, model_key
    from lightning_lora.jobs.runner import upload_final_lora
    from lightning_lora.lora.export import LoraFiles
    from lightning_lora.training.run import TrainResult

    assert compose_worker_config(["model=tiny", "lora.use_dora=true"]).lora.use_dora
    stale = tmp_path / "old_kohya.safetensors"
    stale.write_bytes(b"an earlier training's kohya file")
    s3_env.upload_file(stale, kohya_key(7), {"style_id": 7})
    diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    diffusers.write_bytes(b"dora weights")
    result = TrainResult(
        output_dir=tmp_path,
        lora=LoraFiles(tmp_path, diffusers, None),
        metrics={},
        metadata={"num_epochs": 1, "network_dim": 4, "network_alpha": 4},
    )
    model_url, kohya_url = upload_final_lora(s3_env, 7, result)
    assert kohya_url is None and model_url.endswith(model_key(7))
    assert kohya_key(7) not in set(s3_env.list_keys("models/style_7/"))
    assert model_key(7) in set(s3_env.list_keys("models/style_7/"))


@pytest.mark.parametrize("choice", ["adamw_fused", "adamw_8bit", "schedule_free", "adafactor"])
def test_every_optimizer_choice_instantiates_as_a_partial(choice: str) -> None:
    cfg = compose_config([f"module/optimizer={choice}"])
    factory = instantiate(cfg.module.optimizer)
    assert callable(factory) and cfg.module.optimizer.lr > 0


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
