"""Loss types, timestep weightings and timestep sampling: values and distributions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra.utils import instantiate

from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training.losses import debiased_weights, elementwise_loss, timestep_weights
from lightning_lora.training.timesteps import check_sampling, sample_timesteps

T = 1000


# ------------------------------------------------------------------------------ loss values
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


# ------------------------------------------------------------------------------ timesteps
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


# ------------------------------------------------------------------------------ in the module
@pytest.fixture(scope="module")
def tiny_module_factory(tiny_model):
    from tests.conftest import TINY_OVERRIDES, composed

    def make(*overrides: str):
        cfg = composed(*TINY_OVERRIDES, "lora.dropout=0.0", *overrides)
        components = instantiate(cfg.model)
        return instantiate(cfg.module, _partial_=True)(
            components=components, lora=build_lora_configs(cfg.lora)[0], lora_seed=0
        )

    return make


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
        pred = base.unet(base.add_noise(latents, noise, timesteps), timesteps, context).sample
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
