"""LoCon, LoHa and LoKr files against their consumers: A1111, ComfyUI, kohya/LyCORIS (issue 25).

Each type trains on the tiny model (``experiment=tiny``); its kohya/LyCORIS file must use the
names each consumer maps and make each consumer apply, module by module, the delta PEFT trained
(``get_delta_weight``). The consumers' naming and arithmetic are transcribed from their code in
:mod:`tests.support.consumer_loaders`. Our own loader (``lightning-lora-generate``'s) must
reproduce the trained UNet from each type's folder.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra.utils import instantiate
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors.torch import load_file

from lightning_lora.config import compose_config
from lightning_lora.lora.adapters import inject_lora, lora_config
from lightning_lora.lora.export import read_metadata
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training.inference import add_loras, load_pipeline, set_lora_scale
from lightning_lora.training.run import TrainResult, train
from tests.support import consumer_loaders as consumers
from tests.support.unets import unet_output

#: Per type: overrides of a run whose modules cover the type's variants (LoCon: its own conv
#: rank/alpha and patterns, the mixed alphas diffusers' kohya loader once mis-scaled; LoKr: rank
#: 2 factors the second matrix, the to_k pattern keeps both full).
RUNS = {
    "locon": (
        "lora.rank=4",
        "lora.alpha=8",
        "lora.conv_rank=2",
        "lora.conv_alpha=1",
        "lora.rank_pattern={to_k: 6}",
        "lora.alpha_pattern={to_v: 3}",
    ),
    "loha": ("lora.rank=4", "lora.alpha=2", "lora.conv_rank=2", "lora.conv_alpha=3"),
    "lokr": ("lora.rank=2", "lora.alpha=4", "lora.rank_pattern={to_k: 8}"),
}


def _overrides(kind: str, demo_images: Path) -> list[str]:
    return [
        "experiment=tiny",
        f"data.image_dir={demo_images}",
        f"lora.type={kind}",
        *RUNS[kind],
        "trainer.max_epochs=2",
        "module.optimizer.lr=5e-2",  # weights far from their init: every factor non-zero
        "validation.every_n_epochs=100",
    ]


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, tmp_path_factory, tiny_model, demo_images) -> tuple[str, TrainResult, list]:
    kind = request.param
    out = tmp_path_factory.mktemp(f"interop-{kind}")
    overrides = _overrides(kind, demo_images)
    result = train(compose_config(overrides, output_dir=out))
    return kind, result, overrides


def _trained_unet(result: TrainResult, overrides: list[str], tmp_path: Path) -> torch.nn.Module:
    """The UNet as trained: a fresh adapter of the run's config with the checkpoint's weights."""
    cfg = compose_config(overrides, output_dir=tmp_path)
    unet = instantiate(cfg.model).unet
    inject_lora(unet, build_lora_configs(cfg.lora)[0], seed=0)
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    state = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items()}
    assert not unet.load_state_dict(state, strict=False).unexpected_keys
    return unet.eval()


def _stems(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in load_file(str(path)).items():
        stem, suffix = key.split(".", 1)
        grouped[stem][suffix] = tensor
    return dict(grouped)


def _sd15_unet() -> torch.nn.Module:
    """SD1.5's UNet layout (diffusers' defaults, 768-d cross attention) on the meta device."""
    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr"])
def test_every_sd15_module_a_type_targets_has_a_name_every_consumer_maps(kind: str) -> None:
    """On SD1.5's real layout (A1111 maps names by SD1.x's block arithmetic, not by lookup)."""
    unet = _sd15_unet()
    config = lora_config(type=kind)
    stems = {
        f"lora_unet_{name.replace('.', '_')}": name
        for name, _ in unet.named_modules()
        if check_target_module_exists(config, name)
    }
    # 16 attention blocks x 8 projections; 22 ResNets x 2 convs, 14 shortcuts, 6 samplers
    assert len(stems) == (128 if kind == "lora" else 128 + 44 + 14 + 6)
    comfy = consumers.comfyui_unet_key_map(unet)
    trainer = (
        consumers.kohya_lora_names(unet, conv=kind != "lora")
        if kind in ("lora", "locon")
        else consumers.lycoris_kohya_names(unet, conv=True)
    )
    for stem, name in stems.items():
        assert consumers.a1111_module_name(stem) is not None, stem
        assert comfy.get(stem) == name, stem
        assert trainer.get(stem) == name, stem


@pytest.mark.slow
def test_every_consumer_maps_every_module_and_applies_the_trained_delta(
    trained, tiny_model, tmp_path
) -> None:
    kind, result, overrides = trained
    unet = _trained_unet(result, overrides, tmp_path)
    layers = {
        f"lora_unet_{name.replace('.', '_')}": module
        for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    stems = _stems(result.lora.kohya)
    assert set(stems) == set(layers)  # every trained module in the file, nothing else
    plain = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")  # no adapter
    comfy = consumers.comfyui_unet_key_map(plain)
    trainer_names = (
        consumers.kohya_lora_names(plain, conv=True)
        if kind == "locon"
        else consumers.lycoris_kohya_names(plain, conv=True)
    )
    convs = 0
    for stem, tensors in stems.items():
        layer = layers[stem]
        weight = layer.get_base_layer().weight
        expected = layer.get_delta_weight("default").detach()
        convs += weight.ndim == 4
        assert stem in comfy, stem
        assert stem in trainer_names, stem
        wanted_type = "lora" if kind == "locon" else kind
        assert consumers.a1111_module_type(tensors) == wanted_type, stem
        for apply in (
            consumers.a1111_delta,
            consumers.comfyui_delta,
            consumers.kohya_delta if kind == "locon" else consumers.lycoris_delta,
        ):
            delta = apply(tensors, tuple(weight.shape))
            torch.testing.assert_close(
                delta.reshape(weight.shape), expected, rtol=1e-4, atol=1e-6, msg=stem
            )
    assert convs > 10  # the ResNet and sampler convolutions are in the file
    if kind == "lokr":  # both Kronecker layouts: full matrices (scale folded in) and factored
        full = [s for s, t in stems.items() if "lokr_w2" in t]
        factored = [s for s, t in stems.items() if "lokr_w2_a" in t]
        assert full and factored
        assert all(s.endswith("to_k") for s in full)


@pytest.mark.slow
def test_the_metadata_names_the_network_for_kohya_and_lycoris(trained) -> None:
    kind, result, _ = trained
    meta = read_metadata(result.lora.kohya)
    assert meta["lightning_lora_network_type"] == kind
    module = "networks.lora" if kind == "locon" else "lycoris.kohya"
    assert meta["ss_network_module"] == module
    if kind != "locon":
        assert f'"algo": "{kind}"' in meta["ss_network_args"]
    if kind != "lokr":
        assert '"conv_dim": "2"' in meta["ss_network_args"]
    card = result.lora.card.read_text(encoding="utf-8")
    assert {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}[kind] in card
    assert ("lightning-lora-generate" in card) == (kind != "locon")  # diffusers loads no LoHa/LoKr


@pytest.mark.slow
def test_our_generate_loader_reproduces_the_trained_unet(trained, tiny_model, tmp_path) -> None:
    kind, result, overrides = trained
    expected = unet_output(_trained_unet(result, overrides, tmp_path))
    pipe = load_pipeline(tiny_model)
    base = unet_output(pipe.unet)
    loras = add_loras(pipe, [result.lora.folder])
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3
    set_lora_scale(pipe, loras, 0.0)  # scale 0 is the base model exactly
    torch.testing.assert_close(unet_output(pipe.unet), base, rtol=0, atol=0)
    if kind == "locon":  # diffusers loads both of LoCon's files alike
        other = load_pipeline(tiny_model)
        add_loras(other, [result.lora.kohya])
        torch.testing.assert_close(unet_output(other.unet), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_generate_cli_draws_with_each_type(trained, tiny_model, tmp_path) -> None:
    from PIL import Image

    from lightning_lora.tools import generate

    _, result, _ = trained
    common = ["--tiny", "--steps", "2", "--resolution", "64", "--prompt", "a house"]
    args = [*common, "--lora", str(result.lora.folder), "--lora-scale", "0", "1"]
    assert generate.main([*args, "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (64, 128)  # a row per scale
    # the LyCORIS/kohya file directly, as a file from elsewhere would come
    assert (
        generate.main([*common, "--lora", str(result.lora.kohya), "--out", str(tmp_path / "k.png")])
        == 0
    )
    top, bottom = (grid.crop((0, 64 * i, 64, 64 * (i + 1))).tobytes() for i in (0, 1))
    assert top != bottom  # the LoRA changes the image


@pytest.mark.slow
def test_bake_merges_each_type_into_the_base_unet(trained, tiny_model, tmp_path) -> None:
    from lightning_lora.tools.lora_tools import bake

    _, result, overrides = trained
    expected = unet_output(_trained_unet(result, overrides, tmp_path))
    baked = bake(result.lora.kohya, tiny_model, tmp_path / "baked")
    assert len(baked) == len(_stems(result.lora.kohya))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "baked", subfolder="unet")
    # float32 weights with the delta added in (rounded once) against PEFT's separate branch:
    # agreement to 2e-4, where the LoRA moves the output by more than 1e-2
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    assert (expected - unet_output(base.eval())).abs().max() > 1e-2
    torch.testing.assert_close(unet_output(unet.eval()), expected, rtol=1e-3, atol=2e-4)
