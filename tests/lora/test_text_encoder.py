"""Text-encoder LoRA: own lr, diffusers and kohya keys, loaded back by diffusers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lightning_lora.lora.export import read_metadata
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # trains


def _te_out(text_encoder: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(2, 12).view(1, 10)
    with torch.no_grad():
        return text_encoder(ids)[0]


def _pipe(tiny_model: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.text_encoder.eval()
    return pipe


class _Probe(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_keys = set(batch)

    def on_train_start(self, trainer, pl_module) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs = [g["lr"] for g in groups]
        self.group_sizes = [len(g["params"]) for g in groups]

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.text_encoder.eval()
        self.te_out = _te_out(pl_module.text_encoder)


def _kohya_te_names(text_encoder: torch.nn.Module, targets: set[str]) -> set[str]:
    """Kohya names of the text encoder's target linears in the SD1.5 checkpoint's layout.

    SD1.5's CLIP names its modules ``text_model.encoder.layers.N...``; transformers 5 drops the
    ``text_model.`` level in memory.
    """
    return {
        "lora_te_"
        + (name if name.startswith("text_model.") else f"text_model.{name}").replace(".", "_")
        for name, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def _kohya_unet_names(unet: torch.nn.Module, targets: set[str]) -> set[str]:
    return {
        "lora_unet_" + name.replace(".", "_")
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name.endswith(f".{t}") or name.endswith(f"_{t}") for t in targets)
    }


def test_text_encoder_lora_trains_exports_and_loads(make_cfg, tiny_model) -> None:
    probe = _Probe()
    cfg = make_cfg(
        "lora.text_encoder.enabled=true",
        "lora.text_encoder.rank=2",
        "lora.text_encoder.alpha=4",
        "lora.text_encoder.lr=5e-2",
        "lora.dropout=0.0",
        "module.optimizer.lr=1e-2",
        "trainer.max_epochs=1",
    )
    result = train(cfg, callbacks=[probe])
    # latents stay cached; the captions, not cached embeddings, reach the step (encoded there)
    assert "latent_params" in probe.batch_keys and "captions" in probe.batch_keys
    assert "text_embeds" not in probe.batch_keys
    assert probe.lrs == [1e-2, 5e-2] and probe.group_sizes[1] > 0

    base = _pipe(tiny_model)
    assert (probe.te_out - _te_out(base.text_encoder)).abs().max() > 1e-4  # the TE LoRA trained
    diffusers_sd = load_file(result.lora.diffusers)
    te_keys = [k for k in diffusers_sd if k.startswith("text_encoder.")]
    assert te_keys and any(k.startswith("unet.") for k in diffusers_sd)
    loaded = _pipe(tiny_model)
    loaded.load_lora_weights(str(result.lora.folder))
    torch.testing.assert_close(_te_out(loaded.text_encoder), probe.te_out)

    kohya = load_file(result.lora.kohya)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya, sorted(
        kohya
    )[:5]
    stems = {k.split(".")[0] for k in kohya}
    te_stems = {s for s in stems if s.startswith("lora_te_")}
    unet_stems = stems - te_stems
    # the key check against the SD1.5 layouts: one LoRA per target linear, no other names
    assert te_stems == _kohya_te_names(
        base.text_encoder, {"q_proj", "k_proj", "v_proj", "out_proj"}
    )
    assert unet_stems == _kohya_unet_names(base.unet, {"to_q", "to_k", "to_v", "to_out.0"})
    for stem in te_stems:
        assert kohya[f"{stem}.lora_down.weight"].shape[0] == 2
        assert float(kohya[f"{stem}.alpha"]) == 4.0
    from_kohya = _pipe(tiny_model)
    from_kohya.load_lora_weights(str(result.lora.kohya.parent), weight_name=result.lora.kohya.name)
    torch.testing.assert_close(_te_out(from_kohya.text_encoder), probe.te_out, rtol=1e-4, atol=1e-5)

    for path in (result.lora.diffusers, result.lora.kohya):
        meta = read_metadata(path)
        assert meta["ss_train_text_encoder"] == "true"
        assert meta["ss_text_encoder_lr"] == "0.05"
        assert meta["lightning_lora_text_encoder_dim"] == "2"


def test_without_text_encoder_lora_metadata_says_so_and_a_reused_encoder_is_clean(
    make_cfg, tiny_model, tmp_path
) -> None:
    # a first run in this process gives the shared text encoder an adapter; the next must not
    # keep it
    train(
        make_cfg(
            "lora.text_encoder.enabled=true", "trainer.max_epochs=1", output_dir=tmp_path / "with"
        )
    )
    result = train(make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "without"))
    assert not any(k.startswith("text_encoder.") for k in load_file(result.lora.diffusers))
    assert not any(k.startswith("lora_te_") for k in load_file(result.lora.kohya))
    assert read_metadata(result.lora.kohya)["ss_train_text_encoder"] == "false"
    from lightning_lora.training.models import load_components

    text_encoder = load_components(tiny_model).text_encoder
    assert not any("lora_" in n for n, _ in text_encoder.named_parameters())
