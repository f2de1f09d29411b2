"""Caption tooling: metadata.jsonl, trigger, tag shuffling / dropout, per-step encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.data.buckets import BatchRequest
from lightning_lora.data.captions import CaptionSettings, caption_variant, split_tags
from lightning_lora.data.datamodule import StyleDataModule, find_style_images
from lightning_lora.errors import DatasetError

TAGS = "lldemo, 1girl, red hair, smile, outdoors, tree, sky, looking at viewer"


def _png(path: Path, size=(64, 64)) -> Path:
    Image.new("RGB", size, (10, 120, 200)).save(path)
    return path


def test_caption_sources_in_order_and_the_trigger(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("from the txt file", encoding="utf-8")
    lines = [
        {"file_name": "a.png", "text": "the sidecar loses to a.txt"},
        {"file_name": "b.png", "text": "  from the sidecar "},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    _png(tmp_path / "c.mask.png")  # c's mask: not a training image
    items = find_style_images(tmp_path, "art by {token}", "zzz", trigger="ohwx")
    assert [(i.path.name, i.caption) for i in items] == [
        ("a.png", "ohwx, from the txt file"),
        ("b.png", "ohwx, from the sidecar"),
        ("c.png", "ohwx, art by zzz"),
    ]
    other_ext = find_style_images(tmp_path, "art by {token}", "zzz", caption_extension=".cap")
    assert other_ext[0].caption == "the sidecar loses to a.txt"  # a.txt is not a caption now


def test_a_bad_sidecar_line_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"x": 1}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 2"):
        find_style_images(tmp_path, "{token}", "t")


def test_variants_keep_the_kept_tags_and_are_seeded_per_epoch() -> None:
    settings = CaptionSettings(trigger="lldemo", shuffle_tags=True, keep_tokens=1, tag_dropout=0.3)
    variants = [caption_variant(TAGS, settings, seed=1, epoch=e, index=3) for e in range(20)]
    original = split_tags(TAGS)
    for variant in variants:
        tags = split_tags(variant)
        assert tags[:2] == ["lldemo", "1girl"]  # the trigger, then keep_tokens=1 tag, in place
        assert set(tags) <= set(original) and len(tags) == len(set(tags))
    assert len(set(variants)) > 10  # they do vary from epoch to epoch
    assert any(len(split_tags(v)) < len(original) for v in variants)  # dropout drops
    assert all(len(split_tags(v)) >= 2 for v in variants)  # never the kept ones
    again = [caption_variant(TAGS, settings, seed=1, epoch=e, index=3) for e in range(20)]
    assert again == variants  # (seed, epoch, image) alone decide
    assert caption_variant(TAGS, settings, 1, 0, 4) != variants[0]  # other image, other draw
    shuffled = CaptionSettings(shuffle_tags=True)
    assert sorted(split_tags(caption_variant(TAGS, shuffled, 0, 0, 0))) == sorted(original)
    assert caption_variant(TAGS, CaptionSettings(), 0, 5, 0) == TAGS  # off: unchanged


def test_varying_captions_are_encoded_per_step_with_cached_latents(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(TAGS, encoding="utf-8")
    dm = StyleDataModule(
        str(tmp_path),
        resolution=64,
        batch_size=2,
        caption={"shuffle_tags": True, "keep_tokens": 1},
        seed=3,
    )
    dm.setup("fit")
    dm.build_cache(
        lambda px: torch.nn.functional.avg_pool2d(px, 8).repeat(1, 3, 1, 1)[:, :8],
        lambda caps: pytest.fail("varying captions must not be pre-encoded"),
        torch.device("cpu"),
    )
    epoch0 = dm.cache[BatchRequest((0, 1), epoch=0)]
    epoch1 = dm.cache[BatchRequest((0, 1), epoch=1)]
    assert "text_embeds" not in epoch0 and epoch0["latent_params"].shape == (2, 8, 8, 8)
    assert epoch0["captions"] == [dm.images.caption(i, 0) for i in (0, 1)]
    assert epoch0["captions"] != epoch1["captions"]
    assert all(c.startswith("lldemo, ") for c in epoch0["captions"] + epoch1["captions"])
    # the uncached path trains with the same variants
    assert dm.images[BatchRequest((0, 1), epoch=1)]["captions"] == epoch1["captions"]


def test_module_encodes_per_step_captions_like_cached_embeddings(make_cfg) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg()
    module = instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model), lora=instantiate(cfg.lora)
    )
    params = torch.randn(2, 8, 8, 8)
    captions = ["lldemo, a cat", "lldemo, a tree"]
    by_caption = module.batch_inputs({"latent_params": params, "captions": captions})
    embeds = module.encode_text(captions)
    by_embeds = module.batch_inputs({"latent_params": params, "text_embeds": embeds})
    torch.testing.assert_close(by_caption[1], by_embeds[1], rtol=0, atol=0)


def test_bad_caption_settings_name_the_key() -> None:
    with pytest.raises(DatasetError, match=r"data\.caption\.tag_dropout"):
        StyleDataModule("unused", caption={"tag_dropout": 1.0})
    with pytest.raises(DatasetError, match=r"data\.caption\.caption_ext"):
        StyleDataModule("unused", caption={"caption_ext": "txt"})
