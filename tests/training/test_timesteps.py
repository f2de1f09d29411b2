"""Timestep sampling (``lightning_lora.training.timesteps``): distributions, and the module
drawing from the configured sampler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_lora.training.timesteps import check_sampling, sample_timesteps

T = 1000


def _histogram(t: torch.Tensor, bins: int = 10) -> torch.Tensor:
    return torch.bincount(t // (T // bins), minlength=bins).float() / t.numel()


def test_uniform_is_the_recipes_randint_and_flat() -> None:
    torch.manual_seed(0)
    drawn = sample_timesteps(20000, T, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.randint(0, T, (20000,)))  # the default is unchanged
    hist = _histogram(drawn)
    assert torch.all((hist - 0.1).abs() < 0.01), hist


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 0.5)])
def test_logit_normal_histogram_follows_the_distribution(mean: float, std: float) -> None:
    torch.manual_seed(0)
    t = sample_timesteps(40000, T, torch.device("cpu"), "logit_normal", mean, std)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < T
    hist = _histogram(t)
    # P(k*100 <= t < (k+1)*100) = Phi((logit((k+1)/10) - mean)/std) - Phi((logit(k/10) - mean)/std)
    edges = [-math.inf, *(math.log(q / (1 - q)) for q in (k / 10 for k in range(1, 10))), math.inf]
    expected = [
        _normal_cdf((b - mean) / std) - _normal_cdf((a - mean) / std)
        for a, b in itertools.pairwise(edges)
    ]
    assert hist.tolist() == pytest.approx(expected, abs=0.01)
    median = float(t.float().median())
    assert median == pytest.approx(T / (1 + math.exp(-mean)), abs=10)


def test_range_covers_exactly_the_range() -> None:
    torch.manual_seed(0)
    t = sample_timesteps(20000, T, torch.device("cpu"), "range", min_timestep=200, max_timestep=400)
    assert int(t.min()) == 200 and int(t.max()) == 399
    counts = torch.bincount(t - 200, minlength=200).float()
    assert counts.numel() == 200 and float(counts.min()) > 0.5 * float(counts.mean())


def test_bad_sampling_settings_are_rejected() -> None:
    check_sampling("range", T, 100, None)
    with pytest.raises(ValueError, match="timestep_sampling"):
        check_sampling("cosmic", T)
    with pytest.raises(ValueError, match="only apply"):
        check_sampling("uniform", T, 100, None)
    with pytest.raises(ValueError, match="min_timestep < "):
        check_sampling("range", T, 500, 400)


def test_module_draws_training_timesteps_from_the_configured_sampler(tiny_module_factory) -> None:
    module = tiny_module_factory(
        "module.timestep_sampling=range", "module.min_timestep=900", "module.max_timestep=950"
    )
    seen: list[torch.Tensor] = []
    original = module.diffusion_loss

    def spy(latents, context, noise, timesteps, *args, **kwargs):
        seen.append(timesteps)
        return original(latents, context, noise, timesteps, *args, **kwargs)

    module.diffusion_loss = spy
    batch = {"latent_params": torch.randn(16, 8, 8, 8), "text_embeds": torch.randn(16, 77, 32)}
    with torch.no_grad():
        module.training_loss(batch)
    assert seen and int(seen[0].min()) >= 900 and int(seen[0].max()) < 950
