"""Prediction type, zero-terminal SNR, input perturbation and clip skip, in training, in the
validation sampler and in the LoRA metadata (``module.prediction_type``,
``module.zero_terminal_snr``, ``module.ip_noise_gamma``, ``model.clip_skip``)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

import lightning_lora.training.inference as inference
import lightning_lora.training.module as module_py
from lightning_lora.lora.export import export_lora, read_metadata
from lightning_lora.training.conditioning import check_clip_skip, prompt_embeddings
from lightning_lora.training.run import train
from lightning_lora.training.sample_prompts import SamplePrompt
from tests.conftest import TINY_OVERRIDES, composed

V = "module.prediction_type=v_prediction"
ZERO = "module.zero_terminal_snr=true"


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    return latents, context, noise, torch.tensor([5, 999])


def test_zero_terminal_snr_rescales_the_betas_through_the_tables(tiny_module_factory) -> None:
    plain = tiny_module_factory()
    module = tiny_module_factory(V, ZERO)
    base = plain.noise_scheduler
    sched = module.noise_scheduler
    assert sched is not base and base.config["rescale_betas_zero_snr"] is False  # base untouched
    # diffusers' own helper on the base betas
    assert torch.equal(sched.betas, rescale_zero_terminal_snr(base.betas.clone()))
    assert sched.alphas_cumprod[-1] == 0
    torch.testing.assert_close(sched.alphas_cumprod[0], base.alphas_cumprod[0])
    assert not torch.equal(sched.alphas_cumprod, base.alphas_cumprod)
    sqrt_alpha, sqrt_one_minus, snr = module.noise.tables("cpu", torch.float32)
    assert sqrt_alpha[-1] == 0 and sqrt_one_minus[-1] == 1 and snr[-1] == 0
    assert torch.equal(sqrt_alpha, sched.alphas_cumprod**0.5)
    # at the last timestep the input is pure noise
    latents, _, noise, _ = _inputs()
    t = torch.tensor([999, 999])
    assert torch.equal(module.noise.add_noise(latents, noise, t), noise)
    with pytest.raises(ValueError, match="v_prediction"):
        tiny_module_factory(ZERO, "module.snr_gamma=5")


@pytest.mark.parametrize("zero", [False, True])
def test_v_prediction_targets_match_a_hand_computation(tiny_module_factory, zero: bool) -> None:
    module = tiny_module_factory(V, *([ZERO] if zero else []))
    assert module.noise_scheduler.config["prediction_type"] == "v_prediction"
    latents, context, noise, timesteps = _inputs()
    ab = module.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    with torch.no_grad():
        pred = module.unet(noisy, timesteps, context).sample
        loss = module.diffusion_loss(latents, context, noise, timesteps)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    if zero:  # the last timestep's v-target is -x0
        torch.testing.assert_close(target[1], -latents[1])
    else:  # the same betas with epsilon: the target is the noise
        with torch.no_grad():
            eps = tiny_module_factory("module.prediction_type=epsilon")
            eps_loss = eps.diffusion_loss(latents, context, noise, timesteps)
        torch.testing.assert_close(eps_loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_module_factory("module.prediction_type=sample")


class _Spy:
    """Records the UNet's noisy input and the loss's target (the real functions run)."""

    def __init__(self, module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.noisy: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        real = module_py.elementwise_loss

        def loss(pred, target, *args, **kwargs):
            self.targets.append(target.detach().clone())
            return real(pred, target, *args, **kwargs)

        monkeypatch.setattr(module_py, "elementwise_loss", loss)
        module.unet.register_forward_pre_hook(
            lambda _m, args: self.noisy.append(args[0].detach().clone())
        )


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_input_perturbation_changes_the_input_not_the_target(
    tiny_module_factory, monkeypatch: pytest.MonkeyPatch, prediction: str
) -> None:
    gen = torch.Generator().manual_seed(1)
    batch = {
        "latent_params": torch.cat(
            [torch.randn(4, 4, 8, 8, generator=gen), torch.full((4, 4, 8, 8), -8.0)], dim=1
        ),
        "text_embeds": torch.randn(4, 77, 32, generator=gen),
    }
    pt = f"module.prediction_type={prediction}"
    runs = {}
    for name, overrides in {
        "default": (pt,),
        "zero": (pt, "module.ip_noise_gamma=0.0"),
        "perturbed": (pt, "module.ip_noise_gamma=0.1"),
    }.items():
        module = tiny_module_factory(*overrides)
        with monkeypatch.context() as patch:
            spy = _Spy(module, patch)
            torch.manual_seed(7)
            with torch.no_grad():
                loss = module.training_loss(batch)
        module.unet._forward_pre_hooks.clear()
        runs[name] = (loss, spy.noisy[0], spy.targets[0])
    # gamma 0 is the plain path, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(runs["default"], runs["zero"], strict=True))
    loss0, noisy0, target0 = runs["zero"]
    loss1, noisy1, target1 = runs["perturbed"]
    assert torch.equal(target1, target0)  # the target of the original noise
    assert not torch.equal(noisy1, noisy0) and not torch.equal(loss1, loss0)
    # the input moved by sqrt(1 - abar_t) * gamma * N(0, 1) (the timesteps are the plain run's:
    # the extra draw comes after them), so per sample a std of at most gamma
    scale = (noisy1 - noisy0).flatten(1).std(dim=1) / 0.1
    assert torch.all(scale > 0) and torch.all(scale < 1.3)


def test_clip_skip_is_the_penultimate_layer_through_the_final_norm(tiny_module_factory) -> None:
    plain = tiny_module_factory()
    skip = tiny_module_factory("model.clip_skip=2")
    assert skip.clip_skip == 2 and plain.clip_skip == 1
    captions = ["a red circle on a blue background", ""]
    te, tok = skip.text_encoder, skip.tokenizer
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = te(ids.input_ids, output_hidden_states=True)
        assert len(out.hidden_states) == 3  # embeddings + 2 layers
        hand = _final_layer_norm(te)(out.hidden_states[1])
        ours = skip.encode_text(captions)
        last = plain.encode_text(captions)
        # the samplers' prompt embeddings are the same
        sampled = prompt_embeddings(tok, te, captions[0], 2)
    torch.testing.assert_close(last, out.last_hidden_state)
    assert torch.equal(ours, hand)
    assert not torch.allclose(ours, last)
    assert torch.equal(sampled[0], hand[0])
    with pytest.raises(ValueError, match="clip_skip must be between 1"):
        check_clip_skip(3, te)  # load_components checks it


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    """CLIP's final layer norm (under ``text_model`` before transformers 5)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def _components(module):
    from lightning_lora.training.models import SDComponents

    return SDComponents(
        module.unet,
        module.vae,
        module.text_encoder,
        module.tokenizer,
        module.noise_scheduler,
        "",
        module.clip_skip,
    )


def test_the_options_are_in_the_lora_metadata(tiny_module_factory, tmp_path: Path) -> None:
    from lightning_lora.training.metadata import training_options_metadata

    overrides = (V, ZERO, "module.ip_noise_gamma=0.05", "model.clip_skip=2")
    cfg = composed(*TINY_OVERRIDES, "lora.dropout=0.0", *overrides)
    module = tiny_module_factory(*overrides)
    meta = training_options_metadata(cfg, module)
    files = export_lora(module.unet, tmp_path / "lora", meta)
    for path in (files.diffusers, files.kohya):
        stored = read_metadata(path)
        assert stored["ss_v_parameterization"] == "True"
        assert stored["ss_zero_terminal_snr"] == "True"
        assert stored["ss_clip_skip"] == "2"
        assert float(stored["ss_ip_noise_gamma"]) == 0.05
        assert stored["lightning_lora_prediction_type"] == "v_prediction"
    plain = training_options_metadata(
        composed(*TINY_OVERRIDES, "lora.dropout=0.0"), tiny_module_factory()
    )
    assert plain["v_parameterization"] == "False" and plain["zero_terminal_snr"] == "False"
    assert plain["clip_skip"] == 1 and plain["ip_noise_gamma"] == 0.0


def test_the_validation_sampler_uses_the_options(
    tiny_module_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_module_factory(V, ZERO, "model.clip_skip=2")
    built = []
    real = inference.build_pipeline

    def spy(components, unet=None):
        pipe = real(components, unet)
        built.append(pipe)
        return pipe

    monkeypatch.setattr(inference, "build_pipeline", spy)
    sample = SamplePrompt("a red circle", "", 3, 64, 64, 2, 5.0)
    image = inference.sample_prompt_images(module, [sample])[0]
    scheduler = built[0].scheduler
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config["prediction_type"] == "v_prediction"
    assert scheduler.config["rescale_betas_zero_snr"] is True
    assert scheduler.config["timestep_spacing"] == "trailing"
    assert torch.equal(scheduler.betas, module.noise_scheduler.betas)
    # by hand: the pipeline with the penultimate layer's embeddings and those betas
    monkeypatch.undo()
    pipe = real(_components(module))
    pipe.set_progress_bar_config(disable=True)
    module.unet.eval()
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    te, tok = module.text_encoder, module.tokenizer

    def penultimate(text: str) -> torch.Tensor:
        ids = tok([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        return _final_layer_norm(te)(hidden)

    with torch.no_grad():
        hand = pipe(
            prompt_embeds=penultimate("a red circle"),
            negative_prompt_embeds=penultimate(""),
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=5.0,
            latents=latents,
        ).images[0]
        unskipped = pipe(
            "a red circle",
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=5.0,
            latents=latents,
        ).images[0]
    assert image.tobytes() == hand.tobytes()
    assert image.tobytes() != unskipped.tobytes()


class _CachedContext(L.Callback):
    """Compares the cached text embeddings of the first batch with the module's encoding."""

    def __init__(self) -> None:
        self.checked = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.checked:
            return
        captions = sorted({item.caption for item in trainer.datamodule.items})
        skipped = pl_module.encode_text(captions)
        ids = pl_module.tokenizer(
            captions, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            last = pl_module.text_encoder(ids)[0]
        for row in batch["text_embeds"]:  # each row: a caption's clip-skipped encoding
            assert any(torch.allclose(row, e, atol=1e-6) for e in skipped)
            assert not any(torch.allclose(row, e, atol=1e-3) for e in last)
        self.checked = True


def test_a_run_with_every_option(make_cfg) -> None:
    check = _CachedContext()
    cfg = make_cfg(
        V,
        ZERO,
        "module.ip_noise_gamma=0.1",
        "model.clip_skip=2",
        "trainer.max_epochs=1",
        "validation.every_n_epochs=1",
        "validation.prompts=[a red circle]",
        "validation.num_inference_steps=2",
    )
    result = train(cfg, callbacks=[check])
    assert check.checked  # the cached captions were encoded with the clip skip
    assert math.isfinite(result.metrics["train/loss"]) and math.isfinite(result.metrics["val/loss"])
    assert result.sample_grid is not None and result.sample_grid.is_file()
    meta = read_metadata(result.lora.diffusers)
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == ("True", "True")
    assert meta["ss_clip_skip"] == "2" and float(meta["ss_ip_noise_gamma"]) == 0.1


def test_a_disk_cache_is_not_reused_across_clip_skips(make_cfg, tmp_path: Path) -> None:
    """The disk cache's text-embedding keys hold the clip skip: no embeddings of another layer."""
    cache = f"data.cache.dir={tmp_path / 'cache'}"
    train(make_cfg("trainer.max_epochs=1", cache))  # clip skip 1 fills the cache first
    check = _CachedContext()
    train(make_cfg("trainer.max_epochs=1", "model.clip_skip=2", cache), callbacks=[check])
    assert check.checked  # the second run's cached captions are the penultimate layer's
