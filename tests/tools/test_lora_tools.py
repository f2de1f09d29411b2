"""``lightning-lora-tools`` on the tiny model: resize, merge, bake and extract against diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lightning_lora.lora import surgery
from lightning_lora.lora.export import read_metadata
from lightning_lora.lora.safetensors_io import save_file
from lightning_lora.tools import lora_tools
from lightning_lora.tools.lora_tools import main
from tests.support.unets import unet_output

#: Tiny-UNet modules the synthetic LoRAs target: attention Linears, a feed-forward, a time
#: embedding projection, 1x1 and 3x3 convolutions.
UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.0.conv_shortcut",
    "mid_block.resnets.0.time_emb_proj",
)
#: diffusers' kohya text-encoder loader infers the key format from an ``out_proj`` LoRA: a file
#: with attention LoRAs but none on ``out_proj`` fails to load there ("Could not automatically
#: infer state dict type"), so the comparison targets all four projections.
TE_MODULES = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.k_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layers.0.self_attn.out_proj",
    "encoder.layers.1.mlp.fc1",
)


def _pipe(model: str | Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def _te_out(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer(["a red house"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.fixture(scope="module")
def base(tiny_model: str) -> StableDiffusionPipeline:
    """The tiny pipeline (read only: its modules' shapes and the base output)."""
    return _pipe(tiny_model)


def _random_lora(
    pipe: StableDiffusionPipeline,
    names: tuple[str, ...],
    rank: int,
    alpha: float,
    seed: int,
    te_names: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A kohya LoRA with random factors (large enough to change the output) on real modules."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    targets = [(n, "lora_unet_", dict(pipe.unet.named_modules())[n]) for n in names]
    te_modules = dict(pipe.text_encoder.named_modules())
    targets += [(n, "lora_te_text_model_", te_modules[n]) for n in te_names]
    for name, prefix, module in targets:
        stem = surgery.stem_of(name, prefix)
        weight = module.weight
        if weight.dim() == 4:
            down = torch.randn(rank, *weight.shape[1:], generator=gen)
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, weight.shape[1], generator=gen)
            up = torch.randn(weight.shape[0], rank, generator=gen)
        sd[f"{stem}.lora_down.weight"] = down * 0.2
        sd[f"{stem}.lora_up.weight"] = up * 0.2
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def _write(sd: dict[str, torch.Tensor], path: Path, dim: int = 4) -> Path:
    meta = {"ss_network_dim": str(dim), "ss_network_alpha": "8", "ss_training_comment": "test"}
    save_file(sd, path, metadata=meta)
    return path


def _with_lora(
    tiny_model: str, *files: Path, weights: list[float] | None = None
) -> StableDiffusionPipeline:
    pipe = _pipe(tiny_model)
    for i, path in enumerate(files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
    if weights is not None:
        pipe.set_adapters([f"l{i}" for i in range(len(files))], weights)
    return pipe


@pytest.fixture(scope="module")
def lora_a(base, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-a") / "a.safetensors"
    return _write(_random_lora(base, UNET_MODULES, rank=4, alpha=8.0, seed=1), path)


def test_resize_at_full_rank_reproduces_the_unet(base, tiny_model, lora_a, tmp_path) -> None:
    out = tmp_path / "full.safetensors"
    reports = lora_tools.resize_file(lora_a, out, rank=4)
    assert len(reports) == len(UNET_MODULES)
    assert all(r.rank == 4 and r.share == pytest.approx(1.0) for r in reports)
    original = unet_output(_with_lora(tiny_model, lora_a).unet)
    assert (original - unet_output(base.unet)).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(
        unet_output(_with_lora(tiny_model, out).unet), original, atol=1e-4, rtol=1e-4
    )
    meta = read_metadata(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert json.loads(meta["lightning_lora_tool"])["tool"] == "resize"


def test_resize_to_a_lower_rank_reports_the_share(base, tiny_model, lora_a, tmp_path) -> None:
    out = tmp_path / "r2.safetensors"
    reports = lora_tools.resize_file(lora_a, out, rank=2)
    assert all(r.rank == 2 and 0.0 < r.share < 1.0 for r in reports)
    sd = load_file(out)
    assert all(v.shape[0] == 2 for k, v in sd.items() if k.endswith("lora_down.weight"))
    assert read_metadata(out)["ss_network_dim"] == "2"
    full_out = unet_output(_with_lora(tiny_model, lora_a).unet)
    assert (unet_output(_with_lora(tiny_model, out).unet) - full_out).abs().max() > 1e-4
    full = lora_tools.resize_file(lora_a, tmp_path / "all.safetensors", keep_share=1.0)
    assert [r.rank for r in full] == [4] * len(UNET_MODULES)


def test_resize_by_share_gives_ranks_per_module_that_diffusers_loads(
    tiny_model, lora_a, tmp_path
) -> None:
    # one module far from the others' spectrum: its share needs another rank
    sd = load_file(lora_a)
    stem = surgery.stem_of(UNET_MODULES[0])
    sd[f"{stem}.lora_up.weight"][:, 1:] *= 0.01
    uneven = _write(sd, tmp_path / "uneven.safetensors")
    out = tmp_path / "share.safetensors"
    reports = lora_tools.resize_file(uneven, out, keep_share=0.95)
    ranks = {r.stem: r.rank for r in reports}
    assert ranks[stem] == 1 and len(set(ranks.values())) > 1
    assert all(r.share >= 0.95 for r in reports)
    assert read_metadata(out)["ss_network_dim"] == "Dynamic"
    # diffusers reads each module at its own rank and scale: the same UNet as adding the deltas
    manual = _pipe(tiny_model)
    surgery.add_to_weights(lora_tools.unet_stems(manual.unet), load_file(out))
    torch.testing.assert_close(
        unet_output(_with_lora(tiny_model, out).unet),
        unet_output(manual.unet),
        atol=1e-4,
        rtol=1e-4,
    )


def test_parse_weighted() -> None:
    assert lora_tools.parse_weighted("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert lora_tools.parse_weighted("b.safetensors") == (Path("b.safetensors"), 1.0)
    assert lora_tools.parse_weighted("c:/x.safetensors") == (Path("c:/x.safetensors"), 1.0)
    assert lora_tools.parse_weighted("x.safetensors:-0.5") == (Path("x.safetensors"), -0.5)


def _planted(unet: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank-2 deltas for some Linear and Conv2d weights of the UNet."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    planted = {}
    for name in UNET_MODULES[:5]:
        shape = modules[name].weight.shape
        cols = int(torch.tensor(shape[1:]).prod())
        low = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, cols, generator=gen)
        planted[name] = (0.05 * low).reshape(shape)
    return planted


def test_extract_recovers_a_planted_difference(base, tiny_model, tmp_path) -> None:
    tuned = _pipe(tiny_model)
    planted = _planted(tuned.unet)
    modules = dict(tuned.unet.named_modules())
    with torch.no_grad():
        for name, delta in planted.items():
            modules[name].weight += delta
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    reports = lora_tools.extract_file(tiny_model, str(tmp_path / "tuned"), out, rank=3)
    assert sorted(r.stem for r in reports) == sorted(surgery.stem_of(n) for n in planted)
    sd = load_file(out)
    grouped = surgery.group_modules(sd)
    for name, delta in planted.items():
        stem = surgery.stem_of(name)
        got = surgery.module_delta(stem, grouped[stem]).float()
        torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-4)
    meta = read_metadata(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3"
    assert meta["ss_network_module"] == "networks.lora"
    # the extracted LoRA on the base UNet is the tuned UNet
    with_lora = unet_output(_with_lora(tiny_model, out).unet)
    tuned_out = unet_output(tuned.unet)
    assert (tuned_out - unet_output(base.unet)).abs().max() > 1e-2
    torch.testing.assert_close(with_lora, tuned_out, atol=1e-4, rtol=1e-4)


def test_merge_equals_loading_both_with_adapter_weights(base, tiny_model, tmp_path) -> None:
    a = _write(_random_lora(base, UNET_MODULES, 4, 8.0, seed=2), tmp_path / "a.safetensors")
    b_names = (*UNET_MODULES[2:], "up_blocks.1.resnets.0.conv2")  # overlaps a partly
    b = _write(_random_lora(base, b_names, 2, 1.0, seed=3), tmp_path / "b.safetensors")
    both = unet_output(_with_lora(tiny_model, a, b, weights=[0.7, 0.5]).unet)
    assert (both - unet_output(base.unet)).abs().max() > 1e-2

    exact = tmp_path / "merged.safetensors"
    reports = lora_tools.merge_files(exact, [(a, 0.7), (b, 0.5)])
    ranks = {r.stem: r.rank for r in reports}
    assert ranks[surgery.stem_of(UNET_MODULES[0])] == 4
    assert ranks[surgery.stem_of(UNET_MODULES[3])] == 6
    assert ranks[surgery.stem_of("up_blocks.1.resnets.0.conv2")] == 2
    torch.testing.assert_close(
        unet_output(_with_lora(tiny_model, exact).unet), both, atol=1e-4, rtol=1e-4
    )
    assert read_metadata(exact)["ss_network_dim"] == "Dynamic"

    svd = tmp_path / "merged_svd.safetensors"
    svd_reports = lora_tools.merge_files(svd, [(a, 0.7), (b, 0.5)], rank=6)
    assert all(r.share == pytest.approx(1.0) for r in svd_reports)
    torch.testing.assert_close(
        unet_output(_with_lora(tiny_model, svd).unet), both, atol=1e-4, rtol=1e-4
    )


def test_bake_equals_the_loaded_lora(base, tiny_model, tmp_path) -> None:
    sd = _random_lora(base, UNET_MODULES, 4, 8.0, seed=4, te_names=TE_MODULES)
    lora = _write(sd, tmp_path / "lora.safetensors")
    stems = lora_tools.bake(lora, tiny_model, tmp_path / "baked")
    assert len(stems) == len(UNET_MODULES) + len(TE_MODULES)
    baked = _pipe(tmp_path / "baked")
    loaded = _with_lora(tiny_model, lora)
    assert (unet_output(loaded.unet) - unet_output(base.unet)).abs().max() > 1e-2
    torch.testing.assert_close(
        unet_output(baked.unet), unet_output(loaded.unet), atol=1e-4, rtol=1e-4
    )
    assert (_te_out(loaded) - _te_out(base)).abs().max() > 1e-3
    torch.testing.assert_close(_te_out(baked), _te_out(loaded), atol=1e-4, rtol=1e-4)


def test_bake_names_a_key_that_matches_no_module(base, tiny_model, tmp_path) -> None:
    sd = _random_lora(base, UNET_MODULES[:1], 2, 2.0, seed=5)
    sd = {k.replace("to_q", "to_nothing"): v for k, v in sd.items()}
    lora = _write(sd, tmp_path / "bad.safetensors")
    with pytest.raises(surgery.UnsupportedLoraError, match="attn1_to_nothing"):
        lora_tools.bake(lora, tiny_model, tmp_path / "baked")
    assert not (tmp_path / "baked").exists()


def test_cli_runs_each_subcommand(base, tiny_model, lora_a, tmp_path, capsys) -> None:
    b = _write(_random_lora(base, UNET_MODULES[:3], 2, 2.0, seed=6), tmp_path / "b.safetensors")
    resized = tmp_path / "resized.safetensors"
    assert main(["resize", str(lora_a), str(resized), "--keep-share", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert surgery.stem_of(UNET_MODULES[0]) in printed and "4->" in printed
    assert resized.is_file()

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(merged), f"{lora_a}:0.7", f"{b}:0.5", "--rank", "3"]) == 0
    assert merged.is_file() and "wrote" in capsys.readouterr().out
    assert all(
        v.shape[0] == 3 for k, v in load_file(merged).items() if k.endswith("lora_down.weight")
    )

    baked = tmp_path / "baked"
    assert main(["bake", str(lora_a), "--tiny", "--out", str(baked), "--scale", "0.5"]) == 0
    assert (baked / "model_index.json").is_file() and (baked / "unet").is_dir()
    # half the delta went in
    name = UNET_MODULES[4]
    stem = surgery.stem_of(name)
    delta = surgery.module_delta(stem, surgery.group_modules(load_file(lora_a))[stem]).float()
    baked_weight = dict(_pipe(baked).unet.named_modules())[name].weight.detach()
    base_weight = dict(base.unet.named_modules())[name].weight.detach()
    torch.testing.assert_close(baked_weight - base_weight, 0.5 * delta, atol=1e-5, rtol=1e-4)

    extracted = tmp_path / "extracted.safetensors"
    args = ["extract", "--tiny", "--tuned", str(baked), "--out", str(extracted), "--rank", "4"]
    assert main([*args, "--conv-rank", "4"]) == 0
    assert "modules" in capsys.readouterr().out
    assert {k.split(".")[0] for k in load_file(extracted)} == {
        surgery.stem_of(n) for n in UNET_MODULES
    }


def test_cli_rejects_a_loha_file_naming_the_key(tmp_path, capsys) -> None:
    path = tmp_path / "loha.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{stem}.hada_w1_a": torch.zeros(4, 2), f"{stem}.hada_w1_b": torch.zeros(2, 4)}, path
    )
    assert main(["resize", str(path), str(tmp_path / "out.safetensors"), "--rank", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{stem}.hada_w1_a" in err and "LoRA/LoCon" in err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(surgery.UnsupportedLoraError, match="hada_w1_a"):
        lora_tools.merge_files(tmp_path / "m.safetensors", [(path, 1.0)])


def test_each_subcommand_has_help(capsys) -> None:
    for command in ("resize", "merge", "bake", "extract"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert command in capsys.readouterr().out
