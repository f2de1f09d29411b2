"""One fixed probe of a UNet: its output on seeded latents, timesteps and text states."""

from __future__ import annotations

import torch


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's prediction for two seeded 8x8 latents at timesteps 10 and 500 (no grad)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx).sample
