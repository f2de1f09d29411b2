"""Exported LoRA files: diffusers loading, kohya keys and alpha, metadata, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lightning_lora.config import compose_config
from lightning_lora.lora.export import read_metadata
from lightning_lora.training.run import TrainResult, train
from tests.conftest import TINY_OVERRIDES
from tests.support.unets import unet_output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, demo_images) -> TrainResult:
    out = tmp_path_factory.mktemp("export-run")
    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            f"data.image_dir={demo_images}",
            "lora.rank=4",
            "lora.alpha=8",
            "trainer.max_epochs=3",
            "module.optimizer.lr=1e-2",
        ],
        output_dir=out,
    )
    return train(cfg)


def _pipe(tiny_model: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.eval()
    return pipe


def _trainedunet_output(tiny_model: str, result: TrainResult) -> torch.Tensor:
    """The UNet output with the LoRA as trained (from the peft state in the checkpoint)."""
    from lightning_lora.lora.adapters import inject_lora, lora_config
    from lightning_lora.training.models import load_components

    unet = load_components(tiny_model, reuse=False).unet
    inject_lora(unet, lora_config(rank=4, alpha=8, dropout=0.0), seed=0)
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    state = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items()}
    missing = unet.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    unet.eval()
    return unet_output(unet)


def test_diffusers_file_loads_and_reproduces_the_trained_unet(trained, tiny_model) -> None:
    assert trained.lora.diffusers.name == "pytorch_lora_weights.safetensors"
    pipe = _pipe(tiny_model)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(trained.lora.folder))
    with_lora = unet_output(pipe.unet)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the UNet
    # alpha/rank = 2 must survive the round trip: same output as the trained model
    torch.testing.assert_close(with_lora, _trainedunet_output(tiny_model, trained))


def test_kohya_file_has_kohya_keys_and_the_real_alpha(trained) -> None:
    sd = load_file(trained.lora.kohya)
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in sd)
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in sd
    )
    assert any(k.endswith("_to_out_0.lora_up.weight") for k in sd)
    for k in downs:
        stem = k.removesuffix(".lora_down.weight")
        assert sd[f"{stem}.lora_up.weight"].shape[1] == 4
        assert sd[k].shape[0] == 4
        assert float(sd[f"{stem}.alpha"]) == 8.0
    assert len(sd) == 3 * len(downs)


def test_kohya_file_converts_back_to_the_same_unet(trained, tiny_model) -> None:
    from_diffusers = _pipe(tiny_model)
    from_diffusers.load_lora_weights(str(trained.lora.folder))
    from_kohya = _pipe(tiny_model)
    from_kohya.load_lora_weights(
        str(trained.lora.kohya.parent), weight_name=trained.lora.kohya.name
    )
    torch.testing.assert_close(unet_output(from_kohya.unet), unet_output(from_diffusers.unet))


def test_metadata_describes_the_run(trained: TrainResult, demo_images: Path) -> None:
    for path in (trained.lora.diffusers, trained.lora.kohya):
        meta = read_metadata(path)
        assert meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "8"
        assert meta["ss_num_epochs"] == "3"
        assert meta["ss_steps"] == "6"
        assert meta["ss_resolution"] == "64"
        assert meta["ss_num_train_images"] == str(len(list(demo_images.glob("*.png"))))
        assert len(meta["ss_dataset_hash"]) == 64
        assert meta["ss_base_model"].endswith("tiny-sd15-v1")
        assert meta["lightning_lora_version"]
    assert "lora_adapter_metadata" in read_metadata(trained.lora.diffusers)
