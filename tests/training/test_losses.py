"""Loss types and timestep weightings (``lightning_lora.training.losses``): values, and the
module using them."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lora.training.losses import debiased_weights, elementwise_loss, timestep_weights

T = 1000


def test_loss_types_match_a_hand_computation() -> None:
    pred = torch.tensor([0.0, 1.0, -2.0, 3.0])
    target = torch.tensor([0.0, 0.0, 1.0, -1.0])
    diffs = [0.0, 1.0, -3.0, 4.0]
    c = 0.5
    l2 = elementwise_loss(pred, target)
    huber = elementwise_loss(pred, target, "huber", c)
    smooth = elementwise_loss(pred, target, "smooth_l1", c)
    for i, d in enumerate(diffs):
        assert float(l2[i]) == pytest.approx(d * d)
        assert float(huber[i]) == pytest.approx(2 * c * (math.sqrt(d * d + c * c) - c))
        assert float(smooth[i]) == pytest.approx(2 * (math.sqrt(d * d + c * c) - c))
    assert l2.dtype == huber.dtype == torch.float32


def test_huber_is_quadratic_near_zero_and_linear_far_away() -> None:
    c = 0.1
    small, large = torch.tensor([1e-3]), torch.tensor([100.0])
    zero = torch.zeros(1)
    assert float(elementwise_loss(small, zero, "huber", c)) == pytest.approx(1e-6, rel=1e-3)
    assert float(elementwise_loss(large, zero, "huber", c)) == pytest.approx(2 * c * 100, rel=2e-3)


def test_bad_loss_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"module\.loss"):
        elementwise_loss(torch.zeros(1), torch.zeros(1), "l1")
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(torch.zeros(1), torch.zeros(1), "huber", 0.0)


def test_snr_weightings_match_a_hand_computation() -> None:
    snr = torch.tensor([0.25, 4.0, 1e6])
    debiased = debiased_weights(snr, "epsilon")
    assert debiased.tolist() == pytest.approx([2.0, 0.5, 1 / math.sqrt(1000)])  # clamped at 1000
    v = debiased_weights(snr, "v_prediction")
    assert v.tolist() == pytest.approx([1 / 1.25, 1 / 5.0, 1 / 1001])
    min_snr = timestep_weights(snr, "epsilon", snr_gamma=1.0)
    assert min_snr.tolist() == pytest.approx([1.0, 0.25, 1e-6])
    both = timestep_weights(snr, "epsilon", snr_gamma=1.0, debiased_estimation=True)
    assert both.tolist() == pytest.approx([2.0, 0.125, 1e-6 / math.sqrt(1000)])
    assert timestep_weights(snr, "epsilon") is None


def _inputs():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    return latents, context, noise, torch.tensor([5, 600])


def test_module_uses_the_configured_loss_and_weighting(tiny_module_factory) -> None:
    latents, context, noise, timesteps = _inputs()
    base = tiny_module_factory()
    with torch.no_grad():
        pred = base.unet(base.noise.add_noise(latents, noise, timesteps), timesteps, context).sample
        l2 = base.diffusion_loss(latents, context, noise, timesteps)
        torch.testing.assert_close(l2, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))
        huber = tiny_module_factory("module.loss=huber", "module.huber_c=0.2")
        expected = (2 * 0.2 * (torch.sqrt((pred - noise) ** 2 + 0.04) - 0.2)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(
            huber.diffusion_loss(latents, context, noise, timesteps), expected
        )
        debiased = tiny_module_factory("module.debiased_estimation=true")
        abar = base.noise_scheduler.alphas_cumprod[timesteps]
        snr = abar / (1 - abar)
        torch.testing.assert_close(
            debiased.diffusion_loss(latents, context, noise, timesteps), l2 / snr.sqrt()
        )
