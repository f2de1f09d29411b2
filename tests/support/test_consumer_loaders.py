"""Tests of the consumer-loader transcriptions in :mod:`tests.support.consumer_loaders`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import nn

from tests.support import consumer_loaders as cl

Delta = Callable[[Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]
ALL_DELTAS: dict[str, Delta] = {
    "a1111": cl.a1111_delta,
    "comfyui": cl.comfyui_delta,
    "lycoris": cl.lycoris_delta,
}


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN)


_GEN = torch.Generator().manual_seed(0)


def _a(value: float) -> torch.Tensor:
    return torch.tensor(value)


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("stem", "compvis"),
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0",
            "diffusion_model_input_blocks_5_1_transformer_blocks_0_attn2_to_out_0",
        ),
        (
            "lora_unet_down_blocks_0_attentions_1_proj_in",
            "diffusion_model_input_blocks_2_1_proj_in",
        ),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "diffusion_model_input_blocks_1_0_in_layers_2"),
        (
            "lora_unet_down_blocks_3_resnets_1_conv2",
            "diffusion_model_input_blocks_11_0_out_layers_3",
        ),
        (
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "diffusion_model_input_blocks_4_0_skip_connection",
        ),
        (
            "lora_unet_down_blocks_2_resnets_1_time_emb_proj",
            "diffusion_model_input_blocks_8_0_emb_layers_1",
        ),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "diffusion_model_input_blocks_3_0_op"),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", "diffusion_model_input_blocks_9_0_op"),
        ("lora_unet_mid_block_attentions_0_proj_out", "diffusion_model_middle_block_1_proj_out"),
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "diffusion_model_middle_block_1_transformer_blocks_0_ff_net_0_proj",
        ),
        ("lora_unet_mid_block_resnets_0_conv1", "diffusion_model_middle_block_0_in_layers_2"),
        (
            "lora_unet_mid_block_resnets_1_time_emb_proj",
            "diffusion_model_middle_block_2_emb_layers_1",
        ),
        ("lora_unet_up_blocks_0_resnets_2_conv1", "diffusion_model_output_blocks_2_0_in_layers_2"),
        (
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2",
            "diffusion_model_output_blocks_5_1_transformer_blocks_0_ff_net_2",
        ),
        (
            "lora_unet_up_blocks_3_resnets_0_conv_shortcut",
            "diffusion_model_output_blocks_9_0_skip_connection",
        ),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
        ("lora_unet_up_blocks_2_upsamplers_0_conv", "diffusion_model_output_blocks_8_2_conv"),
        ("lora_unet_conv_in", "diffusion_model_input_blocks_0_0"),
        ("lora_unet_conv_out", "diffusion_model_out_2"),
        ("lora_unet_time_embedding_linear_1", "diffusion_model_time_embed_0"),
        ("lora_unet_time_embedding_linear_2", "diffusion_model_time_embed_2"),
        # stems already in compvis form go through the lora_unet -> diffusion_model fallback
        ("lora_unet_input_blocks_1_1_proj_in", "diffusion_model_input_blocks_1_1_proj_in"),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "transformer_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        (
            "lora_te_text_model_encoder_layers_11_mlp_fc2",
            "transformer_text_model_encoder_layers_11_mlp_fc2",
        ),
    ],
)
def test_a1111_maps_sd15_names(stem: str, compvis: str) -> None:
    assert cl.a1111_module_name(stem) == compvis


@pytest.mark.parametrize(
    "stem",
    [
        "lora_unet_down_blocks_3_downsamplers_0_conv",  # SD1.5's last down block has none
        "lora_unet_up_blocks_3_upsamplers_0_conv",
        "lora_unet_conv_norm_out_x",
        "lora_te_text_model_final_layer_norm",
        "lora_te_text_model_encoder_layers_12_mlp_fc1",  # CLIP-L has 12 layers
        "unet_down_blocks_0_attentions_0_proj_in",
    ],
)
def test_a1111_rejects(stem: str) -> None:
    assert cl.a1111_module_name(stem) is None


def test_a1111_agrees_with_comfyui_table_on_sd15() -> None:
    """Two independent transcriptions (A1111's regexes, ComfyUI's table) give the same names."""
    last = len(cl.SD15_LAYOUT.down_depths) - 1
    table = cl.comfyui_unet_to_diffusers(cl.SD15_LAYOUT)
    checked = 0
    for diff, ldm in table.items():
        if diff.startswith((f"down_blocks.{last}.downsamplers", f"up_blocks.{last}.upsamplers")):
            continue
        if diff == "conv_norm_out":  # no A1111 rule; its fallback name does not exist
            assert cl.a1111_module_name("lora_unet_conv_norm_out") is None
            continue
        stem = "lora_unet_" + diff.replace(".", "_")
        assert cl.a1111_module_name(stem) == "diffusion_model_" + ldm.replace(".", "_"), stem
        checked += 1
    # 16 attentions x (3 + 13) + 22 resnets x 6 + 3 down + 3 up samplers + 4 basic
    assert checked == 16 * 16 + 22 * 6 + 6 + 4


@pytest.fixture(scope="module")
def unet(tiny_model: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")


def _stem(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _modules(unet: nn.Module, pred: Callable[[str, nn.Module], bool]) -> dict[str, str]:
    return {_stem(p): p for p, m in unet.named_modules() if pred(p, m)}


def _linear_or_conv(_: str, m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


def _is_1x1_or_linear(_: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))


def test_tiny_unet_has_the_target_classes(unet: nn.Module) -> None:
    classes = {type(m).__name__ for m in unet.modules()}
    assert {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"} <= classes


def test_comfyui_maps_every_linear_and_conv(unet: nn.Module) -> None:
    key_map = cl.comfyui_unet_key_map(unet)
    assert key_map == _modules(unet, _linear_or_conv)
    assert (
        key_map["lora_unet_down_blocks_0_downsamplers_0_conv"]
        == "down_blocks.0.downsamplers.0.conv"
    )
    assert key_map["lora_unet_conv_in"] == "conv_in"


def test_comfyui_maps_norms_on_request(unet: nn.Module) -> None:
    key_map = cl.comfyui_unet_key_map(unet, include_norms=True)
    norms = _modules(unet, lambda _, m: isinstance(m, (nn.GroupNorm, nn.LayerNorm)))
    assert key_map == {**_modules(unet, _linear_or_conv), **norms}


def test_lycoris_full_preset_covers_every_linear_and_conv(unet: nn.Module) -> None:
    assert cl.lycoris_kohya_names(unet, conv=True) == _modules(unet, _linear_or_conv)
    assert cl.lycoris_loadable_names(unet) == _modules(unet, _linear_or_conv)


def test_lycoris_without_conv_keeps_linear_and_1x1(unet: nn.Module) -> None:
    names = cl.lycoris_kohya_names(unet, conv=False)
    assert names == _modules(unet, _is_1x1_or_linear)
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in names
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in names
    assert "lora_unet_time_embedding_linear_1" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in names


def test_kohya_lora_targets_transformers_only_without_conv_dim(unet: nn.Module) -> None:
    names = cl.kohya_lora_names(unet, conv=False)
    expected = _modules(unet, lambda p, m: "attentions" in p and _is_1x1_or_linear(p, m))
    assert names == expected
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert not any("resnets" in s or "time_embedding" in s for s in names)


def test_kohya_lora_with_conv_dim_adds_resnets_and_resamplers(unet: nn.Module) -> None:
    names = cl.kohya_lora_names(unet, conv=True)
    excluded = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    assert names == _modules(unet, lambda p, m: _linear_or_conv(p, m) and p not in excluded)
    for stem in (
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ):
        assert stem in names


# ------------------------------------------------------------------------------------ types


def test_module_types() -> None:
    lora = {"lora_up.weight": _rand(2, 1), "lora_down.weight": _rand(1, 2), "alpha": _a(1)}
    loha = {k: _rand(2, 1) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    lokr = {"lokr_w1": _rand(1, 1), "lokr_w2_a": _rand(2, 1), "lokr_w2_b": _rand(1, 2)}
    assert [cl.a1111_module_type(t) for t in (lora, loha, lokr)] == ["lora", "loha", "lokr"]
    assert [cl.comfyui_module_type(t) for t in (lora, loha, lokr)] == ["lora", "loha", "lokr"]
    assert [cl.lycoris_module_type(t) for t in (lora, loha, lokr)] == ["locon", "loha", "lokr"]
    # LoKr needs lokr_w1/lokr_w1_a in LyCORIS; a w2-only stem is LoKr to ComfyUI only
    only_w2 = {"lokr_w2": _rand(2, 2)}
    assert cl.lycoris_module_type(only_w2) is None
    assert cl.a1111_module_type(only_w2) is None
    assert cl.comfyui_module_type(only_w2) == "lokr"
    # ComfyUI keeps the last adapter that accepts the keys
    assert cl.comfyui_module_types({**lora, **loha}) == ["lora", "loha"]
    assert cl.comfyui_module_type({**lora, **loha}) == "loha"
    assert cl.a1111_module_type({**lora, **loha}) == "lora"


# ------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1, 1), (6, 5, 3, 3)])
def test_lora_delta_all_loaders(shape: tuple[int, ...]) -> None:
    r = 3
    k = shape[2:]
    down, up = _rand(r, shape[1], *k), _rand(shape[0], r, *(1 for _ in k))
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _a(1.5)}
    # the conv composition sd-scripts uses to merge, as an independent reference
    conv = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) if k else None
    ref = (conv if conv is not None else up @ down) * (1.5 / r)
    for name, delta in {**ALL_DELTAS, "kohya": cl.kohya_delta}.items():
        assert _close(delta(tensors, shape), ref), name


def test_lora_alpha_rules() -> None:
    shape = (4, 3)
    down, up = _rand(2, 3), _rand(4, 2)
    base = up @ down
    no_alpha = {"lora_down.weight": down, "lora_up.weight": up}
    for delta in (cl.a1111_delta, cl.comfyui_delta, cl.kohya_delta):
        assert _close(delta(no_alpha, shape), base)  # missing alpha: scale 1
    with pytest.raises(cl.LoaderRejects):
        cl.lycoris_delta(no_alpha, shape)  # LyCORIS needs alpha
    zero = {**no_alpha, "alpha": _a(0.0)}
    assert _close(cl.lycoris_delta(zero, shape), base)  # alpha 0 -> rank
    assert _close(cl.kohya_delta(zero, shape), base)
    assert _close(cl.a1111_delta(zero, shape), torch.zeros(shape))  # 0 / dim
    assert _close(cl.comfyui_delta(zero, shape), torch.zeros(shape))
    scaled = {**no_alpha, "alpha": _a(1.0), "scale": _a(3.0)}
    assert _close(cl.a1111_delta(scaled, shape), 3 * base)  # A1111's scale key wins


def test_lora_flat_conv_factors() -> None:
    """A 2-D lora_down on a 3x3 conv: A1111/ComfyUI reshape it, LyCORIS/sd-scripts refuse."""
    shape = (4, 3, 3, 3)
    down, up = _rand(2, 27), _rand(4, 2)
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _a(2.0)}
    ref = (up @ down).reshape(shape)
    assert _close(cl.a1111_delta(tensors, shape), ref)
    assert _close(cl.comfyui_delta(tensors, shape), ref)
    for delta in (cl.lycoris_delta, cl.kohya_delta):
        with pytest.raises(cl.LoaderRejects):
            delta(tensors, shape)


def test_lora_mid_tucker() -> None:
    shape, r = (6, 5, 3, 3), 2
    down, mid, up = _rand(r, 5, 1, 1), _rand(r, r, 3, 3), _rand(6, r, 1, 1)
    tensors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    tensors["alpha"] = _a(1.0)
    # conv chain down (1x1) -> mid (3x3) -> up (1x1) as one 3x3 kernel
    ref = torch.einsum("oa,abkl,bi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 0.5
    for name, delta in ALL_DELTAS.items():
        assert _close(delta(tensors, shape), ref), name
    with pytest.raises(cl.LoaderRejects):
        cl.kohya_delta(tensors, shape)


# ------------------------------------------------------------------------------------ LoHa


def test_loha_hand_checked() -> None:
    eye = torch.eye(2)
    tensors = {
        "hada_w1_a": eye,
        "hada_w1_b": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "hada_w2_a": eye,
        "hada_w2_b": torch.full((2, 2), 2.0),
        "alpha": _a(1.0),  # scale 1 / 2
    }
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for name, delta in ALL_DELTAS.items():
        assert _close(delta(tensors, (2, 2)), expected), name


def test_loha_conv_layouts() -> None:
    shape, r = (6, 5, 3, 3), 2
    flat = {
        "hada_w1_a": _rand(6, r),
        "hada_w1_b": _rand(r, 45),
        "hada_w2_a": _rand(6, r),
        "hada_w2_b": _rand(r, 45),
        "alpha": _a(4.0),
    }
    ref = ((flat["hada_w1_a"] @ flat["hada_w1_b"]) * (flat["hada_w2_a"] @ flat["hada_w2_b"])) * 2
    for name, delta in ALL_DELTAS.items():
        assert _close(delta(flat, shape), ref.reshape(shape)), name
    # 4-D hada_w1_b: only A1111 copes
    four_d = {**flat, "hada_w1_b": flat["hada_w1_b"].reshape(r, 5, 3, 3)}
    four_d["hada_w2_b"] = flat["hada_w2_b"].reshape(r, 5, 3, 3)
    assert _close(cl.a1111_delta(four_d, shape), ref.reshape(shape))
    for delta in (cl.comfyui_delta, cl.lycoris_delta):
        with pytest.raises(cl.LoaderRejects):
            delta(four_d, shape)


def test_loha_tucker_matches_across_loaders() -> None:
    shape, r = (6, 5, 3, 3), 2
    tensors = {
        "hada_t1": _rand(r, r, 3, 3),
        "hada_w1_a": _rand(r, 6),
        "hada_w1_b": _rand(r, 5),
        "hada_t2": _rand(r, r, 3, 3),
        "hada_w2_a": _rand(r, 6),
        "hada_w2_b": _rand(r, 5),
        "alpha": _a(1.0),
    }

    def rebuild(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("xykl,xo,yi->oikl", t, a, b)

    ref = rebuild(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
    ref = ref * rebuild(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"]) * 0.5
    for name, delta in ALL_DELTAS.items():
        assert _close(delta(tensors, shape), ref), name


def test_lycoris_merge_path_scales_loha_twice() -> None:
    tensors = {k: _rand(3, 2) for k in ("hada_w1_a", "hada_w2_a")}
    tensors |= {k: _rand(2, 4) for k in ("hada_w1_b", "hada_w2_b")}
    tensors["alpha"] = _a(1.0)
    once = cl.lycoris_delta(tensors, (3, 4))
    assert _close(cl.lycoris_merge_delta(tensors, (3, 4)), once * 0.5)
    tensors["alpha"] = _a(2.0)  # alpha == rank: both paths agree
    assert _close(cl.lycoris_merge_delta(tensors, (3, 4)), cl.lycoris_delta(tensors, (3, 4)))


# ------------------------------------------------------------------------------------ LoKr


def test_lokr_full_matrices_hand_checked_scale_one() -> None:
    tensors = {
        "lokr_w1": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        "lokr_w2": torch.ones(2, 2),
        "alpha": _a(8.0),  # ignored: both factors full -> scale 1 in every loader
    }
    expected = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]]
    )
    for name, delta in ALL_DELTAS.items():
        assert _close(delta(tensors, (4, 4)), expected), name


def test_lokr_w1_decomposed_w2_full() -> None:
    """A1111/ComfyUI scale by alpha / lokr_w1_b rows; LyCORIS cannot rebuild this module."""
    w1a, w1b, w2 = _rand(2, 1), _rand(1, 2), _rand(2, 2)
    tensors = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2, "alpha": _a(3.0)}
    ref = torch.kron(w1a @ w1b, w2) * 3.0
    assert _close(cl.a1111_delta(tensors, (4, 4)), ref)
    assert _close(cl.comfyui_delta(tensors, (4, 4)), ref)
    with pytest.raises(cl.LoaderRejects):
        cl.lycoris_delta(tensors, (4, 4))


def test_lycoris_factorization_vs_peft() -> None:
    """Same split, except that PEFT does not sort an exact ``factor`` split (small side first)."""
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 300):
        for factor in (-1, 2, 3, 4, 8, 16):
            ours, peft = cl.lycoris_factorization(dim, factor), factorization(dim, factor)
            if factor > 0 and dim % factor == 0 and factor > dim // factor:
                assert peft == (factor, dim // factor) and ours == (dim // factor, factor)
            else:
                assert ours == peft, (dim, factor)


# ------------------------------------------------------------------------------------ PEFT


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.pw = nn.Conv2d(32, 64, 1)


def _peft_layers(config: object) -> dict[str, nn.Module]:
    from peft import inject_adapter_in_model

    torch.manual_seed(1)
    model = inject_adapter_in_model(config, _Net())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default" in name or "lora_" in name:
                p.normal_(0, 0.3)
    return {n: getattr(model, n) for n in ("lin", "conv", "pw")}


def _peft_tensors(
    layer: nn.Module, prefixes: tuple[str, ...], alpha: float
) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in layer.named_parameters():
        if name.startswith(prefixes) and name.endswith(".default"):
            out[name[: -len(".default")]] = p.detach().clone()
        elif name.startswith(prefixes) and name.endswith(".default.weight"):
            out[name[: -len(".default.weight")]] = p.detach().clone()
    out["alpha"] = torch.tensor(float(alpha))
    return out


def test_peft_lora_matches_every_loader() -> None:
    from peft import LoraConfig

    layers = _peft_layers(LoraConfig(r=4, lora_alpha=6, target_modules=["lin", "conv", "pw"]))
    for name, layer in layers.items():
        raw = _peft_tensors(layer, ("lora_A", "lora_B"), 6)
        tensors = {"lora_down.weight": raw["lora_A"], "lora_up.weight": raw["lora_B"]}
        tensors["alpha"] = raw["alpha"]
        ref = layer.get_delta_weight("default")
        shape = tuple(layer.base_layer.weight.shape)
        for loader, delta in {**ALL_DELTAS, "kohya": cl.kohya_delta}.items():
            assert _close(delta(tensors, shape), ref), (name, loader)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_peft_loha_matches_every_loader(effective_conv: bool) -> None:
    from peft import LoHaConfig

    config = LoHaConfig(
        r=4, alpha=6, target_modules=["lin", "conv", "pw"], use_effective_conv2d=effective_conv
    )
    for name, layer in _peft_layers(config).items():
        tensors = _peft_tensors(layer, ("hada_",), 6)
        assert ("hada_t1" in tensors) == (effective_conv and name == "conv")
        ref = layer.get_delta_weight("default")
        shape = tuple(layer.base_layer.weight.shape)
        for loader, delta in ALL_DELTAS.items():
            assert _close(delta(tensors, shape), ref), (name, loader)


@pytest.mark.parametrize(
    ("r", "decompose_both", "effective_conv"),
    [(2, False, False), (2, True, False), (2, True, True), (2, False, True)],
)
def test_peft_lokr_decomposed(r: int, decompose_both: bool, effective_conv: bool) -> None:
    """PEFT LoKr with a decomposed w2 (r < max(w2 dims) / 2): alpha / r everywhere.

    LyCORIS misreads the rank of a Tucker w2 when w1 is full (it takes ``lokr_w2_a``'s column
    count) and then fails to rebuild the module.
    """
    from peft import LoKrConfig

    config = LoKrConfig(
        r=r,
        alpha=3,
        target_modules=["lin", "conv", "pw"],
        decompose_both=decompose_both,
        use_effective_conv2d=effective_conv,
    )
    for name, layer in _peft_layers(config).items():
        tensors = _peft_tensors(layer, ("lokr_",), 3)
        assert "lokr_w2" not in tensors
        assert ("lokr_w1" in tensors) == (not decompose_both)
        ref = layer.get_delta_weight("default")
        shape = tuple(layer.base_layer.weight.shape)
        assert _close(cl.a1111_delta(tensors, shape), ref), name
        if "lokr_t2" in tensors:  # ComfyUI: torch.kron on a non-contiguous einsum result
            with contextlib.suppress(cl.LoaderRejects):
                assert _close(cl.comfyui_delta(tensors, shape), ref), name
        else:
            assert _close(cl.comfyui_delta(tensors, shape), ref), name
        if "lokr_t2" in tensors and not decompose_both:
            with pytest.raises(cl.LoaderRejects):
                cl.lycoris_delta(tensors, shape)
        else:
            assert _close(cl.lycoris_delta(tensors, shape), ref), name


def test_peft_lokr_full_matrices_differ_by_alpha_over_r() -> None:
    """PEFT scales full-matrix LoKr by alpha / r; the loaders apply it at scale 1."""
    from peft import LoKrConfig

    r, alpha = 8, 2
    config = LoKrConfig(r=r, alpha=alpha, target_modules=["lin", "conv", "pw"])
    for name, layer in _peft_layers(config).items():
        tensors = _peft_tensors(layer, ("lokr_",), alpha)
        assert {"lokr_w1", "lokr_w2"} <= set(tensors), name
        ref = layer.get_delta_weight("default")
        shape = tuple(layer.base_layer.weight.shape)
        for loader, delta in ALL_DELTAS.items():
            assert _close(delta(tensors, shape) * (alpha / r), ref), (name, loader)
        # folding alpha / r into lokr_w1 makes every loader agree with PEFT
        folded = {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / r)}
        for loader, delta in ALL_DELTAS.items():
            assert _close(delta(folded, shape), ref), (name, loader)
    assert math.isclose(alpha / r, 0.25)


def test_peft_lokr_with_a_large_decompose_factor_is_refused_by_lycoris() -> None:
    """PEFT puts ``factor`` first even when it is the larger side; LyCORIS rebuilds sorted."""
    from peft import LoKrConfig

    config = LoKrConfig(r=2, alpha=2, target_modules=["lin"], decompose_factor=16)
    layer = _peft_layers(config)["lin"]
    tensors = _peft_tensors(layer, ("lokr_",), 2)
    assert tuple(tensors["lokr_w1"].shape) == (16, 16)
    ref = layer.get_delta_weight("default")
    assert _close(cl.a1111_delta(tensors, (64, 64)), ref)  # full/full: alpha / r == 1 here
    assert _close(cl.comfyui_delta(tensors, (64, 64)), ref)
    with pytest.raises(cl.LoaderRejects):
        cl.lycoris_delta(tensors, (64, 64))
