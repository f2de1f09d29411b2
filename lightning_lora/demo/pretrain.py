"""``make pretrain-tiny``: pretrain the demo's tiny SD1.5-shaped model on procedural shapes (CPU).

The model can draw what :mod:`lightning_lora.demo.shapes` draws ("a red circle on a blue
background") from its caption. It has SD1.5's parts and layout, only small: an ``AutoencoderKL``
that downsamples by 8 to 4 latent channels, a ``UNet2DConditionModel`` with three cross-attention
down blocks and one plain one, a 2-layer ``CLIPTextModel`` and a ``CLIPTokenizer`` whose vocabulary
has the scenes' words as tokens, and SD1.5's noise schedule. It is saved as a diffusers pipeline
folder and loaded with ``from_pretrained``, like SD1.5.

Three stages, each a plain PyTorch loop (a one-off build script: nothing here is resumed, logged
to a tracker or distributed, so Lightning would add nothing but start-up time):

1. the VAE learns to reconstruct scenes, half in the named colours and half in any RGB colour
   captioned with the nearest colour words (L1 + L2 + a small KL term); its latents' standard
   deviation sets ``scaling_factor``, as SD1.5's 0.18215 was set;
2. every scene of the training set is encoded once (the VAE is frozen from here on);
3. the UNet and the text encoder learn to denoise those latents given the captions (epsilon
   prediction on SD1.5's schedule, min-SNR weighting, 10 % empty captions for classifier-free
   guidance); the saved weights are their exponential moving average.

Run it with ``python -m lightning_lora.demo.pretrain --out lightning_lora/pretrained/...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_lora.demo.shapes import (
    WORDS,
    background_colour,
    colour_prompts,
    draw_scene,
    nearest_colour,
    random_scene,
)
from lightning_lora.training.models import (
    SD15_SCHEDULER,
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    char_vocab,
    save_model_folder,
)

log = logging.getLogger(__name__)

#: The demo model's UNet: the tiny test model's (SD1.5's block layout, few channels, 8x8 latents
#: at 64 px) with a wider text context, and several channels per norm group: one channel a group
#: normalises away each channel's mean, which is what carries a flat background's colour.
DEMO_UNET = {**TINY_UNET, "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 8}
#: The demo model's VAE: the tiny test model's (downsamples by 8 to 4 channels, like SD1.5's) with
#: one norm group, so the normalisation keeps how the channels differ and flat colours survive it.
DEMO_VAE = {**TINY_VAE, "norm_num_groups": 1}
#: The demo model's text encoder: the tiny test model's, twice as wide.
DEMO_CLIP = {**TINY_CLIP, "hidden_size": 64, "intermediate_size": 128}


@dataclass
class PretrainConfig:
    """The knobs of a pretraining run (the defaults made the shipped model).

    Attributes:
        scenes: Size of the procedural training set.
        resolution: Image side in pixels.
        vae_steps: VAE optimizer steps.
        vae_batch: VAE batch size.
        vae_lr: VAE peak learning rate (cosine decay to 10 %).
        kl_weight: Weight of the VAE's KL term.
        unet_steps: UNet + text encoder optimizer steps.
        unet_batch: UNet batch size.
        unet_lr: UNet peak learning rate (cosine decay to 10 %).
        snr_gamma: Min-SNR-gamma weighting of the UNet loss.
        noise_offset: Offset noise of the UNet training (lets it change a whole image's colour).
        caption_dropout: Share of empty captions (the unconditional prediction of CFG).
        ema_decay: Decay of the exponential moving average of the UNet and text encoder
            weights that is saved (diffusers' ``EMAModel``, with its warm-up).
        snapshot_every: Also save the model every N UNet steps, to ``<out>-stepN`` (0: never).
        seed: Seed of everything.
        threads: Intra-op threads.
    """

    scenes: int = 8192
    resolution: int = 64
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    snr_gamma: float = 5.0
    noise_offset: float = 0.05
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snapshot_every: int = 0
    seed: int = 0
    threads: int = 2


def build_tokenizer(words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over every byte plus one token for each of ``words``.

    The merges are grown until each word is a single token (a merge that one word needs can split
    another, so the list is checked and extended until nothing splits).

    Args:
        words: Whole words to give tokens.

    Returns:
        The tokenizer.

    Raises:
        RuntimeError: If the merges do not converge (never seen).
    """
    vocab = char_vocab()
    merges: list[tuple[str, str]] = []
    for _ in range(32):
        tokenizer = CLIPTokenizer(
            vocab=dict(vocab),
            merges=list(merges),  # type: ignore[arg-type]  # annotated str; BPE takes (a, b) pairs
            model_max_length=77,
        )
        split = [tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) > 1]
        if not split:
            return tokenizer
        for tokens in split:
            current = tokens[0]
            for token in tokens[1:]:
                merges.append((current, token))
                current += token
                vocab.setdefault(current, len(vocab))
    raise RuntimeError("the tokenizer's merges did not converge")


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak.

    Hand-written for its floor: diffusers' ``get_cosine_schedule_with_warmup`` decays to 0, and
    torch's warm-up + ``CosineAnnealingLR`` chain needs three scheduler objects per stage.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def make_scenes(count: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Draw the training set: half in the named colours, half in any colour.

    A scene of the second half takes uniformly random RGB colours and is captioned with the
    nearest colour words, so the model learns to draw every colour (as SD1.5 can), with the words
    pulling toward their hue: a LoRA can then move it to colours the captions never name. Both
    the VAE and the UNet train on this set.

    Args:
        count: Number of scenes.
        resolution: Image side in pixels.
        seed: Seed of the scenes.

    Returns:
        Images in [-1, 1] as ``(count, 3, resolution, resolution)``, and their captions.
    """
    rng = random.Random(seed)
    arrays, captions = [], []
    for i in range(count):
        scene = random_scene(rng)
        colours = None
        if i % 2:
            while True:
                background = _random_rgb(rng)
                shape = _random_rgb(rng)
                names = nearest_colour(background), nearest_colour(shape)
                if names[0] != names[1]:
                    break
            scene = dataclasses.replace(scene, background=names[0], colour=names[1])
            colours = {"background": background, "shape": shape}
        arrays.append(np.asarray(draw_scene(scene, resolution, colours)))
        captions.append(scene.caption)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, captions


def train_vae(images: torch.Tensor, cfg: PretrainConfig) -> AutoencoderKL:
    """Stage 1: train the VAE and set its ``scaling_factor``.

    Args:
        images: The training set in [-1, 1].
        cfg: The run's knobs.

    Returns:
        The trained VAE (eval mode, frozen).
    """
    vae = AutoencoderKL(**DEMO_VAE)
    with torch.no_grad():
        # start with a small posterior std (logvar -6): at the default init (std 1) the latents
        # drown in sampling noise, and Adam moves logvar only about lr per step, so the first
        # thousand steps would go to shrinking it (measured: eval L1 0.110 against 0.081 after
        # 200 steps)
        vae.quant_conv.bias[DEMO_VAE["latent_channels"] :] = -6.0
        vae.quant_conv.weight[DEMO_VAE["latent_channels"] :] *= 0.1
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.monotonic()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        x = images[torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log.info(
                "vae step %d/%d l1 %.4f (%.0f s)",
                step,
                cfg.vae_steps,
                l1.item(),
                time.monotonic() - start,
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(b).latent_dist.mean for b in images[:1024].split(256)])
    vae.register_to_config(scaling_factor=round(1.0 / means.std().item(), 5))
    log.info("vae scaling_factor %.5f", vae.config.scaling_factor)
    return vae


def train_unet(
    latents: torch.Tensor,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    scaling_factor: float,
    cfg: PretrainConfig,
    snapshot: Callable[[int, UNet2DConditionModel, CLIPTextModel], None] | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel, list[float]]:
    """Stage 3: train the UNet and the text encoder to denoise the latents given the captions.

    Args:
        latents: The VAE posterior's mean and std, ``(n, 8, h, w)`` (sampled each step), unscaled.
        captions: One caption per latent.
        tokenizer: The tokenizer.
        scaling_factor: The VAE's ``scaling_factor``.
        cfg: The run's knobs.
        snapshot: Called with the step and the EMA weights every ``cfg.snapshot_every`` steps
            (to look at the model while it trains).

    Returns:
        The UNet, the text encoder (both eval mode, frozen) and the loss of every step.
    """
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEMO_CLIP,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**DEMO_UNET)
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay)
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    start = time.monotonic()
    unet.train()
    text_encoder.train()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr)
        index = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        mean, std = latents[index].chunk(2, dim=1)
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor
        batch_ids = ids[index].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(
                (x0.shape[0], x0.shape[1], 1, 1), generator=gen
            )
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        hidden = text_encoder(batch_ids)[0]
        pred = unet(noisy, t, hidden).sample
        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        losses.append(loss.item())
        if snapshot and cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            ema.store(params)
            ema.copy_to(params)
            snapshot(step + 1, unet, text_encoder)
            ema.restore(params)
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log.info(
                "unet step %d/%d loss %.4f (%.0f s)",
                step,
                cfg.unet_steps,
                recent,
                time.monotonic() - start,
            )
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, losses


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Stage 2: the VAE posterior of every scene, once.

    Args:
        vae: The trained VAE.
        images: The training set in [-1, 1].

    Returns:
        ``(n, 8, h, w)``: the posterior's mean and std, concatenated on the channel axis.
    """
    parts = []
    for batch in images.split(256):
        dist = vae.encode(batch).latent_dist
        parts.append(torch.cat([dist.mean, dist.std], dim=1))
    return torch.cat(parts)


def check_colour_prompts(
    model: str | Path, steps: int = 20, guidance_scale: float = 5.0, seeds: int = 2
) -> dict[str, float]:
    """How often the model paints the background colour its prompt asks for.

    Args:
        model: The model folder.
        steps: Denoising steps per image.
        guidance_scale: Classifier-free guidance scale.
        seeds: Images per colour.

    Returns:
        Each colour word to the share of its images whose border is nearest to that colour, and
        ``"all"`` to the share over every image.
    """
    from lightning_lora.training.inference import generate, load_pipeline

    pipe = load_pipeline(model)
    hits: dict[str, float] = {}
    for colour, prompt in colour_prompts().items():
        images = generate(pipe, [prompt] * seeds, 64, steps, guidance_scale, seed=0)
        hits[colour] = sum(background_colour(img) == colour for img in images) / seeds
    hits["all"] = sum(hits.values()) / len(hits)
    return hits


def pretrain(out: str | Path, cfg: PretrainConfig, check_prompts: bool = True) -> Path:
    """Run the three stages and save the model folder.

    Args:
        out: The model folder to write (replaced if it exists).
        cfg: The run's knobs.
        check_prompts: Measure how often the model paints the prompted background colour
            (:func:`check_colour_prompts`) and record it in ``pretraining.json``.

    Returns:
        The folder.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.monotonic()
    images, captions = make_scenes(cfg.scenes, cfg.resolution, cfg.seed)
    log.info("%d scenes drawn (%.0f s)", len(images), time.monotonic() - start)
    vae = train_vae(images, cfg)
    latents = encode_scenes(vae, images)
    tokenizer = build_tokenizer()

    def snapshot(step: int, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
        save_model_folder(f"{out}-step{step}", tokenizer, text_encoder, vae, unet)

    unet, text_encoder, losses = train_unet(
        latents, captions, tokenizer, vae.config["scaling_factor"], cfg, snapshot
    )
    elapsed = time.monotonic() - start
    out = save_model_folder(out, tokenizer, text_encoder, vae, unet)
    colour_hits = check_colour_prompts(out) if check_prompts else None
    log.info("background colour as prompted: %s", colour_hits)
    (out / "pretraining.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "seconds": round(elapsed, 1),
                "torch": torch.__version__,
                "final_unet_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
                "background_colour_as_prompted": colour_hits,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("pretrained in %.0f s; saved to %s", elapsed, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m lightning_lora.demo.pretrain``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model folder to write")
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pretrain(out, PretrainConfig(**args))


if __name__ == "__main__":
    main()
