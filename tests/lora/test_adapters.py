"""DoRA and rsLoRA: trained, exported in diffusers and kohya format, loaded back by diffusers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lightning_lora.lora.export import read_metadata
from lightning_lora.training.run import train
from tests.support.unets import unet_output

pytestmark = pytest.mark.slow  # trains


class _TrainedOutput(L.Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.unet.eval()
        self.out = unet_output(pl_module.unet)
        pl_module.unet.train()


def _pipe(tiny_model: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.eval()
    return pipe


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_variant_exports_load_in_diffusers_as_trained(variant: str, make_cfg, tiny_model) -> None:
    trained = _TrainedOutput()
    cfg = make_cfg(
        f"lora.{variant}=true",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0.0",
        "module.optimizer.lr=1e-2",
        "trainer.max_epochs=1",
    )
    result = train(cfg, callbacks=[trained])
    base = unet_output(_pipe(tiny_model).unet)
    assert (trained.out - base).abs().max() > 1e-4  # the LoRA changes the UNet
    from_diffusers = _pipe(tiny_model)
    from_diffusers.load_lora_weights(str(result.lora.folder))
    torch.testing.assert_close(unet_output(from_diffusers.unet), trained.out)

    meta = read_metadata(result.lora.diffusers)
    assert meta[f"lightning_lora_{variant}"] == "true"
    if variant == "use_dora":  # kohya's dora_scale is another decomposition: diffusers only
        assert result.lora.kohya is None
        assert not (result.lora.folder / "lora_kohya.safetensors").exists()
        assert any("lora_magnitude_vector" in k for k in load_file(result.lora.diffusers))
        return
    kohya = load_file(result.lora.kohya)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    alphas = {float(kohya[k.replace(".lora_down.weight", ".alpha")]) for k in downs}
    # kohya loaders scale alpha/rank: alpha*sqrt(r)/r = alpha/sqrt(r), rsLoRA's scale
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(8 * math.sqrt(4))
    assert len(kohya) == 3 * len(downs)
    from_kohya = _pipe(tiny_model)
    from_kohya.load_lora_weights(str(result.lora.kohya.parent), weight_name=result.lora.kohya.name)
    torch.testing.assert_close(unet_output(from_kohya.unet), trained.out, rtol=1e-4, atol=1e-5)


def test_kohya_conversion_refuses_dora() -> None:
    from lightning_lora.lora.adapters import lora_config
    from lightning_lora.lora.kohya import kohya_state_dict

    with pytest.raises(ValueError, match="diffusers format only"):
        kohya_state_dict({}, lora_config(use_dora=True))
