"""The module/optimizer group: each choice instantiates and trains the tiny model; schedule-free's
weight modes."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from lightning_lora.config import compose_config
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training.run import train
from tests.conftest import TINY_OVERRIDES, composed

CHOICES = ("adamw", "adamw_fused", "prodigy", "schedule_free", "adafactor")

PACKAGES = {"prodigy": "prodigyopt", "schedule_free": "schedulefree"}


def _module(*overrides: str):
    cfg = composed(*TINY_OVERRIDES, "lora.dropout=0.0", *overrides)
    return instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model), lora=build_lora_configs(cfg.lora)[0], lora_seed=0
    )


def test_the_default_is_the_previous_adamw_with_the_multi_tensor_update() -> None:
    node = composed(*TINY_OVERRIDES).module.optimizer
    assert dict(node) == {
        "_target_": "lightning_lora.training.optimizers.adamw",
        "_partial_": True,
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "eps": 1e-8,
        "fused": None,
        "foreach": True,
    }


@pytest.mark.parametrize(
    ("overrides", "fused", "foreach"),
    [
        ((), None, True),
        (("module.optimizer.fused=true",), True, None),  # torch refuses fused and foreach both
        (("module/optimizer=adamw_fused",), True, None),
        (("module.optimizer.foreach=null",), None, None),
    ],
)
def test_fused_alone_asks_for_the_fused_kernel(overrides, fused, foreach, tiny_model) -> None:
    optimizer = _module(*overrides).configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


@pytest.mark.parametrize("choice", CHOICES)
def test_each_optimizer_trains_the_tiny_model(choice: str, tiny_model) -> None:
    package = PACKAGES.get(choice)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[optimizers]')")
    lr = "1.0" if choice == "prodigy" else "1e-2"
    module = _module(f"module/optimizer={choice}", f"module.optimizer.lr={lr}")
    optimizer = module.configure_optimizers()["optimizer"]
    if choice == "adamw_fused":
        assert optimizer.defaults["fused"] is True
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedule-free: what LoRAModule.on_train_epoch_start does
    named = [(n, p) for n, p in module.unet.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    batch = {"latent_params": torch.randn(2, 8, 8, 8), "text_embeds": torch.randn(2, 77, 32)}
    for _ in range(3):
        optimizer.zero_grad()
        module.training_loss(batch).backward()
        optimizer.step()
    changed = [not torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True)]
    # every lora_B moves (they start at zero, so lora_A's first gradients are zero: prodigy's tiny
    # first steps may leave a few A matrices unchanged in fp32)
    assert all(c for c, (n, _) in zip(changed, named, strict=True) if "lora_B" in n), choice
    assert sum(changed) >= 0.9 * len(params), f"{choice}: {sum(changed)}/{len(params)} changed"
    assert all(torch.isfinite(p).all() for p in params)


def test_adamw_8bit_refuses_a_cpu_clearly(tiny_model) -> None:
    module = _module("module/optimizer=adamw_8bit")
    with pytest.raises(ValueError, match=r"CUDA GPU only.*module/optimizer=adamw"):
        module.configure_optimizers()


class _Modes(L.Callback):
    """At the end: the weights as the optimizer left them (eval) and its train weights."""

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        names = [n for n, p in pl_module.unet.named_parameters() if p.requires_grad]
        self.train_mode_at_end = opt.param_groups[0]["train_mode"]
        self.eval_weights = {n: p.detach().clone() for n, p in pl_module.unet.named_parameters()}
        opt.train()
        self.train_weights = {n: p.detach().clone() for n, p in pl_module.unet.named_parameters()}
        with torch.no_grad():  # back to exactly the eval weights (eval() again would round)
            for n, p in pl_module.unet.named_parameters():
                p.copy_(self.eval_weights[n])
        for group in opt.param_groups:
            group["train_mode"] = False
        self.names = names


@pytest.mark.slow  # trains
def test_schedule_free_exports_and_checkpoints_its_eval_weights(make_cfg) -> None:
    pytest.importorskip("schedulefree")
    modes = _Modes()
    result = train(
        make_cfg("module/optimizer=schedule_free", "module.optimizer.lr=1e-2"), callbacks=[modes]
    )
    assert modes.train_mode_at_end is False
    exported = load_file(result.lora.diffusers)
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    differ = 0
    for name in modes.names:
        key = "unet." + name.replace(".lora_A.default.", ".lora.down.").replace(
            ".lora_B.default.", ".lora.up."
        )
        torch.testing.assert_close(exported[key], modes.eval_weights[name], rtol=0, atol=0)
        torch.testing.assert_close(ckpt["state_dict"][f"unet.{name}"], modes.eval_weights[name])
        differ += not torch.equal(modes.eval_weights[name], modes.train_weights[name])
    assert differ > 0  # the eval (averaged) weights are not the train weights


@pytest.mark.slow  # trains three times
def test_schedule_free_resume_from_the_epoch_checkpoint_is_exact(make_cfg, tmp_path) -> None:
    pytest.importorskip("schedulefree")
    options = ("module/optimizer=schedule_free", "module.optimizer.lr=1e-2")
    full = train(make_cfg("trainer.max_epochs=4", *options, output_dir=tmp_path / "full"))
    first = train(make_cfg("trainer.max_epochs=2", *options, output_dir=tmp_path / "first"))
    resumed = train(
        make_cfg("trainer.max_epochs=4", *options, output_dir=tmp_path / "resumed"),
        ckpt_path=first.last_checkpoint,
    )
    a, b = load_file(full.lora.diffusers), load_file(resumed.lora.diffusers)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("choice", ["adamw_fused", "adamw_8bit", "schedule_free", "adafactor"])
def test_every_optimizer_choice_instantiates_as_a_partial(choice: str) -> None:
    cfg = compose_config([f"module/optimizer={choice}"])
    factory = instantiate(cfg.module.optimizer)
    assert callable(factory) and cfg.module.optimizer.lr > 0
