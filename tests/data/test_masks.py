"""Masked loss: masks from alpha or <stem>.mask.png, their geometry, and zero gradient outside."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.data.buckets import BatchRequest
from lightning_lora.data.datamodule import StyleDataModule
from lightning_lora.data.masks import latent_weights, load_mask


def _half_alpha(path: Path, size=(64, 64)) -> Path:
    """An RGBA image whose left half is transparent (alpha 0) and right half opaque."""
    img = Image.new("RGBA", size, (200, 50, 50, 255))
    img.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    img.save(path)
    return path


def test_mask_file_wins_over_alpha_and_plain_images_have_none(tmp_path: Path) -> None:
    alpha = _half_alpha(tmp_path / "a.png")
    mask = load_mask(alpha, (64, 64))
    assert mask.getpixel((5, 5)) == 0 and mask.getpixel((60, 5)) == 255
    Image.new("L", (64, 64), 128).save(tmp_path / "a.mask.png")
    assert load_mask(alpha, (64, 64)).getpixel((5, 5)) == 128
    plain = tmp_path / "p.jpg"
    Image.new("RGB", (64, 64)).save(plain)
    assert load_mask(plain, (64, 64)) is None


def test_latent_weights_follow_crop_and_flip(tmp_path: Path) -> None:
    _half_alpha(tmp_path / "a.png", size=(80, 56))  # wide: bucket 80x48 at step 16
    dm = StyleDataModule(
        str(tmp_path),
        resolution=64,
        masked_loss=True,
        random_flip=True,
        batch_size=1,
        bucketing={"step": 16},
    )
    dm.setup("fit")
    assert dm.num_images == 1 and dm.buckets == [(80, 48)]
    dm.build_cache(
        lambda px: torch.zeros(px.shape[0], 8, px.shape[2] // 8, px.shape[3] // 8),
        lambda caps: torch.zeros(len(caps), 3, 2),
        torch.device("cpu"),
    )
    (tensors,) = dm.cache.store.tensors.values()
    weights = tensors["loss_weights"][0, 0]
    assert weights.shape == (6, 10)
    # 80x56 -> crop rows 4..51 (no resize): the transparent half is x < 40, latent columns 0-4
    torch.testing.assert_close(weights[:, :5], torch.zeros(6, 5))
    torch.testing.assert_close(weights[:, 5:], torch.ones(6, 5))
    torch.testing.assert_close(tensors["flipped_loss_weights"][0, 0], weights.flip(-1))
    batch = dm.cache[BatchRequest((0,), epoch=0)]
    assert batch["loss_weights"].shape == (1, 1, 6, 10)
    uncached = StyleDataModule(
        str(tmp_path), resolution=64, masked_loss=True, cache_latents=False, bucketing={"step": 16}
    )
    uncached.setup("fit")
    sample = uncached.images[BatchRequest((0,), epoch=0)]
    torch.testing.assert_close(sample["loss_weights"][0, 0], weights)


def test_masks_are_off_by_default(tmp_path: Path) -> None:
    _half_alpha(tmp_path / "a.png")
    dm = StyleDataModule(str(tmp_path), resolution=64, batch_size=1)
    dm.setup("fit")
    dm.build_cache(
        lambda px: torch.zeros(px.shape[0], 8, 8, 8),
        lambda caps: torch.zeros(len(caps), 3, 2),
        torch.device("cpu"),
    )
    assert "loss_weights" not in dm.cache[BatchRequest((0,), epoch=0)]


@pytest.fixture
def module(make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg()
    return instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model), lora=instantiate(cfg.lora)
    )


def test_masked_out_latent_pixels_get_no_gradient(module) -> None:
    torch.manual_seed(0)
    for p in module.unet.parameters():  # a non-zero LoRA B, so every LoRA weight gets gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    latents = torch.randn(2, 4, 8, 8)
    context = module.encode_text(["a", "b"])
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([100, 700])
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :, :4] = 0  # the left half masked out
    outputs = []

    def keep(mod, args, out):
        out[0].retain_grad()
        outputs.append(out[0])

    handle = module.unet.register_forward_hook(keep)
    try:
        loss = module.diffusion_loss(latents, context, noise, timesteps, weights=weights)
        loss.mean().backward()
    finally:
        handle.remove()
    grad = outputs[0].grad
    assert torch.count_nonzero(grad[..., :4]) == 0  # masked out: exactly no gradient
    assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()

    module.zero_grad()
    zero = torch.zeros(2, 1, 8, 8)
    module.diffusion_loss(latents, context, noise, timesteps, weights=zero).mean().backward()
    lora_grads = [p.grad for p in module.unet.parameters() if p.requires_grad]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in lora_grads)
    # and the unmasked loss is the plain mean
    module.unet.eval()  # LoRA dropout off: two passes compare
    plain = module.diffusion_loss(latents, context, noise, timesteps, compiled=False)
    ones = module.diffusion_loss(
        latents, context, noise, timesteps, compiled=False, weights=torch.ones(2, 1, 8, 8)
    )
    torch.testing.assert_close(plain, ones)


def test_training_loss_uses_the_batch_weights(module) -> None:
    params = torch.randn(2, 8, 8, 8)
    embeds = module.encode_text(["a", "b"])
    batch = {"latent_params": params, "text_embeds": embeds}
    torch.manual_seed(1)
    full = module.training_loss(batch)
    torch.manual_seed(1)
    none = module.training_loss({**batch, "loss_weights": torch.zeros(2, 1, 8, 8)})
    torch.manual_seed(1)
    half = module.training_loss({**batch, "loss_weights": torch.full((2, 1, 8, 8), 0.5)})
    assert float(none.detach()) == 0.0
    torch.testing.assert_close(half, full * 0.5)
    assert latent_weights(torch.ones(1, 1, 16, 24)).shape == (1, 1, 2, 3)
