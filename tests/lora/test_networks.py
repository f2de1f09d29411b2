"""Network types, per-module ranks and alphas, learning rates by block and LoRA+ (issue 25)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra.utils import instantiate
from peft import LoHaConfig, LoKrConfig, LoraConfig

from lightning_lora.lora.adapters import inject_lora, lora_config
from lightning_lora.lora.kohya import kohya_state_dict
from lightning_lora.lora.networks import (
    LearningRates,
    learning_rates,
    module_rank_alpha,
    module_scale,
    network_metadata,
    network_type,
)
from lightning_lora.lora.text_encoder import build_lora_configs
from tests.conftest import TINY_OVERRIDES, composed

CONV3 = "down_blocks.0.resnets.0.conv1"
SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"
ATTN = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def test_each_type_is_its_peft_config_on_its_targets() -> None:
    plain = lora_config(rank=4, alpha=8)
    assert type(plain) is LoraConfig and network_type(plain) == "lora"
    assert "conv1" not in plain.target_modules
    for kind, cls in (("locon", LoraConfig), ("loha", LoHaConfig), ("lokr", LoKrConfig)):
        config = lora_config(rank=4, alpha=8, type=kind)
        assert type(config) is cls and network_type(config) == kind
        assert {"to_q", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"} <= set(
            config.target_modules
        )
    lokr = lora_config(type="lokr", decompose_both=True, decompose_factor=8, rank_dropout=0.1)
    assert (lokr.decompose_both, lokr.decompose_factor, lokr.rank_dropout) == (True, 8, 0.1)
    with pytest.raises(ValueError, match=r"lora\.type"):
        lora_config(type="glora")
    with pytest.raises(ValueError, match=r"lora\.conv_rank"):
        lora_config(type="locon", conv_rank=0)


def test_conv_rank_applies_to_the_3x3_convolutions_and_patterns_win() -> None:
    config = lora_config(
        rank=8, alpha=16, type="locon", conv_rank=4, conv_alpha=2, rank_pattern={"conv2": 6}
    )
    assert module_rank_alpha(config, CONV3) == (4, 2.0)
    assert module_rank_alpha(config, "up_blocks.0.upsamplers.0.conv") == (4, 2.0)
    assert module_rank_alpha(config, SHORTCUT) == (8, 16.0)  # 1x1: the linear rank, as kohya
    assert module_rank_alpha(config, ATTN) == (8, 16.0)
    assert module_rank_alpha(config, "mid_block.resnets.1.conv2")[0] == 6  # the user's pattern
    rs = lora_config(rank=4, alpha=8, use_rslora=True)
    assert module_scale(rs, ATTN) == pytest.approx(8 / 2)
    # conv_alpha defaults to conv_rank (scale 1), as kohya's conv_alpha default
    assert module_rank_alpha(lora_config(type="loha", conv_rank=3), CONV3) == (3, 3.0)


def test_the_peft_layers_take_the_per_module_ranks(tiny_model) -> None:
    components = instantiate(composed(*TINY_OVERRIDES).model)
    config = lora_config(rank=4, alpha=8, type="locon", conv_rank=2, rank_pattern={"to_k": 3})
    inject_lora(components.unet, config, seed=0)
    modules = dict(components.unet.named_modules())
    assert modules[CONV3].r["default"] == 2 and modules[CONV3].scaling["default"] == 1.0
    assert modules[SHORTCUT].r["default"] == 4
    to_k = ATTN.replace("to_q", "to_k")
    assert modules[to_k].r["default"] == 3
    kohya = kohya_state_dict(
        {
            f"{name}.{part}.weight": p
            for name in (CONV3, to_k)
            for part, p in (
                ("lora_A", modules[name].lora_A["default"].weight),
                ("lora_B", modules[name].lora_B["default"].weight),
            )
        },
        config,
    )
    # one alpha in the file (diffusers' kohya loader mis-scales mixed ones); a module of another
    # alpha carries the ratio in its factors: alpha / rank of the file gives PEFT's delta
    for name in (CONV3, to_k):
        stem = f"lora_unet_{name.replace('.', '_')}"
        assert float(kohya[f"{stem}.alpha"]) == 8.0
        up, down = kohya[f"{stem}.lora_up.weight"], kohya[f"{stem}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)) * 8.0 / down.shape[0]
        expected = modules[name].get_delta_weight("default").detach()
        torch.testing.assert_close(delta.reshape(expected.shape), expected)


def test_dora_with_a_lycoris_type_is_ignored_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        config = lora_config(type="loha", use_dora=True)
    assert type(config) is LoHaConfig
    assert "lora.use_dora applies to LoRA and LoCon" in caplog.text


def test_block_multipliers_and_lora_plus_by_parameter_name() -> None:
    rates = LearningRates(block={"down": [0.5, 1, 2, 3], "mid": 0.0, "up": 2}, plus_ratio=16)
    a = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    assert rates.multiplier(a) == 2
    assert rates.multiplier(a.replace("lora_A", "lora_B")) == 32
    assert rates.multiplier("mid_block.resnets.0.conv1.lora_A.default.weight") == 0
    assert rates.multiplier("up_blocks.3.resnets.2.conv2.hada_w1_a.default") == 2
    te = "text_model.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert rates.multiplier(te) == 16  # LoRA+ on the text encoder's B too; no block there
    with pytest.raises(ValueError, match=r"lora\.block_lr\.down lists 1 values"):
        LearningRates(block={"down": [1.0]}).multiplier(a)
    with pytest.raises(ValueError, match=r"lora\.block_lr takes"):
        LearningRates(block={"middle": 1.0})
    with pytest.raises(ValueError, match=r"lora\.plus_lr_ratio"):
        LearningRates(plus_ratio=0)
    assert LearningRates(block={"down": 1, "mid": 1.0, "up": [1, 1]}).is_plain


def test_the_optimizer_groups_follow_blocks_and_lora_plus(tiny_model) -> None:
    cfg = composed(
        *TINY_OVERRIDES,
        "module.optimizer.lr=1e-3",
        "lora.type=locon",
        "lora.block_lr={down: 0.5, mid: 0, up: [1, 2, 3, 4]}",
        "lora.plus_lr_ratio=4",
        "lora.text_encoder.enabled=true",
        "lora.text_encoder.lr=1e-4",
    )
    unet_config, te_config, te_lr = build_lora_configs(cfg.lora)
    module = instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model),
        lora=unet_config,
        text_encoder_lora=te_config,
        text_encoder_lr=te_lr,
        lora_lr=learning_rates(cfg.lora),
        lora_seed=0,
    )
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(module.unet.named_parameters())
    down_a = "down_blocks.1.resnets.0.conv1.lora_A.default.weight"
    up_b = "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.default.weight"
    assert lr_of[id(named[down_a])] == pytest.approx(5e-4)
    assert lr_of[id(named[up_b])] == pytest.approx(1e-3 * 4 * 4)
    assert lr_of[id(named["mid_block.resnets.0.conv2.lora_A.default.weight"])] == 0
    te_b = next(p for n, p in module.text_encoder.named_parameters() if ".lora_B." in n)
    assert lr_of[id(te_b)] == pytest.approx(1e-4 * 4)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable tensor in exactly one group


def test_the_metadata_names_the_network_as_kohya_and_lycoris_do() -> None:
    plain = network_metadata(lora_config(rank=4, alpha=8), LearningRates())
    assert plain["network_module"] == "networks.lora" and "network_args" not in plain
    locon = network_metadata(
        lora_config(rank=4, alpha=8, type="locon", conv_rank=2, conv_alpha=1),
        LearningRates(block={"down": 1.0, "up": [1, 0.5]}, plus_ratio=16),
    )
    assert locon["network_args"] == {
        "conv_dim": "2",
        "conv_alpha": "1",
        "up_lr_weight": "1,0.5",
        "loraplus_lr_ratio": "16",
    }
    lokr = network_metadata(lora_config(rank=4, type="lokr", decompose_factor=8), LearningRates())
    assert lokr["network_module"] == "lycoris.kohya"
    assert lokr["network_args"]["algo"] == "lokr" and lokr["network_args"]["factor"] == "8"
    assert json.dumps(lokr)  # JSON-able for the safetensors metadata


def test_a_lycoris_adapter_trains_only_its_own_tensors(tiny_model) -> None:
    components = instantiate(composed(*TINY_OVERRIDES).model)
    for kind, marker in (("loha", "hada_"), ("lokr", "lokr_")):
        count = inject_lora(components.unet, lora_config(rank=2, type=kind), seed=0)
        trainable = [n for n, p in components.unet.named_parameters() if p.requires_grad]
        assert trainable and all(marker in n for n in trainable)
        assert count == sum(p.numel() for p in components.unet.parameters() if p.requires_grad)
        x = torch.randn(1, 4, 8, 8)
        ctx = torch.randn(1, 77, components.unet.config.cross_attention_dim)
        components.unet(x, torch.tensor([10]), ctx).sample.mean().backward()
        grads = [p.grad for p in components.unet.parameters() if p.requires_grad]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_reused_unet_switches_types_without_wrapping_old_layers(tiny_model) -> None:
    """A sweep over lora.type in one process reuses the UNet: no wrapper may wrap another."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = instantiate(composed(*TINY_OVERRIDES).model).unet
    for kind in ("lora", "loha", "locon", "lokr", "lora"):
        inject_lora(unet, lora_config(rank=2, type=kind), seed=0)
        layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
        assert not any(n.endswith("base_layer") for n in layers), kind
        assert not any(isinstance(m.get_base_layer(), BaseTunerLayer) for m in layers.values())
        if kind == "lora":  # the attention projections only: no convolution left wrapped
            assert layers and all(
                n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in layers
            )
        else:
            assert any(n.endswith("conv1") for n in layers)
    reused = inject_lora(unet, lora_config(rank=2, type="lora"), seed=0)
    assert reused == sum(p.numel() for p in unet.parameters() if p.requires_grad)


def test_a_checkpoint_of_another_network_type_is_refused(tiny_model) -> None:
    from lightning_lora.lora.networks import check_checkpoint_record

    cfg = composed(*TINY_OVERRIDES, "lora.rank=4", "lora.alpha=4")
    module = instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model), lora=build_lora_configs(cfg.lora)[0], lora_seed=0
    )
    checkpoint: dict = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    record = checkpoint["lora_config"]
    assert (record["type"], record["rank"], record["alpha"]) == ("lora", 4, 4.0)
    module.on_load_checkpoint(checkpoint)  # the same network resumes
    module.on_load_checkpoint({"lora_config": {"rank": 4, "alpha": 4}})  # a record before types
    with pytest.raises(ValueError, match=r"loha/4/4\.0 differ from this run.s lora/"):
        module.on_load_checkpoint({"lora_config": {**record, "type": "loha"}})
    with pytest.raises(ValueError, match=r"lora/4/4\.0 differ from this run.s lokr/4/4\.0"):
        check_checkpoint_record(record, lora_config(rank=4, alpha=4, type="lokr"))
