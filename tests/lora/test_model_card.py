"""The model card (``lightning_lora.lora.model_card``) beside every exported LoRA.

Its facts against a real tiny run's metadata (the values written into the LoRA files), the
sample grid it links, the loading instructions, and hostile text kept as data (no front-matter
key, HTML, link, heading or code-block escape can come from a style token or a prompt).
"""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest
import yaml

from lightning_lora.config import compose_config
from lightning_lora.lora.export import read_metadata
from lightning_lora.lora.model_card import (
    MODEL_CARD_NAME,
    SAMPLES_NAME,
    markdown_text,
    metadata_from_file,
    render_model_card,
)
from lightning_lora.training.run import TrainResult, train
from tests.conftest import TINY_OVERRIDES

PROMPT = "a red circle on a blue background, in the style of {token}"


@pytest.fixture(scope="module")
def card_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, demo_images) -> TrainResult:
    """A tiny run (rank 4, alpha 8, 2 epochs) with one validation prompt holding ``{token}``."""
    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            f"data.image_dir={demo_images}",
            "data.token=lldemo",
            "lora.rank=4",
            "lora.alpha=8",
            f"validation.prompts=['{PROMPT}']",
            "validation.num_inference_steps=2",
            "validation.every_n_epochs=100",
            "data.val_max_images=2",
            "~logger",
            "~callbacks.lr_monitor",
        ],
        output_dir=tmp_path_factory.mktemp("card-run"),
    )
    return train(cfg)


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """The front matter (parsed as YAML) and the Markdown body of a card."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:300]
    return yaml.safe_load(match.group(1)), match.group(2)


def outside_code(text: str) -> str:
    """The card without its fenced code blocks (code is shown as text, never as HTML)."""
    return re.sub(r"^```\w*\n.*?^```$", "", text, flags=re.S | re.M)


def code_blocks(body: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", body, re.S | re.M)


@pytest.mark.slow
def test_the_card_states_the_runs_real_metadata_and_links_its_samples(
    card_run: TrainResult,
) -> None:
    lora = card_run.lora
    assert lora is not None and lora.kohya is not None
    assert lora.card == lora.folder / MODEL_CARD_NAME
    text = lora.card.read_text(encoding="utf-8")
    front, body = split_card(text)
    file_meta = metadata_from_file(read_metadata(lora.diffusers))
    # the front matter: diffusers' layout (a local base model is no Hub id: left out)
    assert front["library_name"] == "diffusers"
    assert {"text-to-image", "stable-diffusion", "lora"} <= set(front["tags"])
    assert front["instance_prompt"] == "lldemo" == file_meta["lightning_lora_trigger"]
    assert "base_model" not in front and "license" not in front
    # every fact is the one written into the LoRA files
    assert (file_meta["network_dim"], file_meta["network_alpha"]) == (4, 8)
    assert (file_meta["num_epochs"], file_meta["steps"]) == (2, card_run.metrics["steps"])
    assert file_meta["num_train_images"] == 8
    facts = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", body, re.M))
    assert facts["rank"] == "4" and facts["alpha"] == "8"
    assert facts["epochs"] == "2" and facts["steps"] == str(file_meta["steps"])
    assert facts["dataset size"] == "8 images"
    assert facts["dataset hash (SHA-256)"] == file_meta["dataset_hash"]
    assert len(file_meta["dataset_hash"]) == 64
    assert facts["resolution"] == "64"
    assert facts["base model"] == markdown_text(file_meta["base_model"])
    assert facts["trigger (style token)"] == "lldemo"
    assert facts["LoRA type"] == markdown_text("LoRA (PEFT) of the UNet")
    # the final grid is beside the card, and the card shows it with its prompt (token put in)
    assert lora.samples == lora.folder / SAMPLES_NAME
    assert card_run.sample_grid is not None
    assert lora.samples.read_bytes() == card_run.sample_grid.read_bytes()
    assert f"]({SAMPLES_NAME})" in body
    drawn = PROMPT.replace("{token}", "lldemo")
    assert card_run.sample_prompts == [drawn]
    assert f"1. {markdown_text(drawn)}" in body
    # how to load it: diffusers (the right weight name), ComfyUI, AUTOMATIC1111
    (python,) = code_blocks(body, "python")
    assert 'weight_name="pytorch_lora_weights.safetensors"' in python
    assert "pipe.load_lora_weights(" in python
    ast.parse(python)
    assert "ComfyUI/models/loras/" in body and "LoraLoader" in body
    assert "stable-diffusion-webui/models/Lora/" in body
    (a1111,) = code_blocks(body, "text")
    assert a1111.startswith("<lora:lora_kohya:1> ")
    # the card is rendered from the file's own metadata: the very same text
    again = render_model_card(
        file_meta,
        trigger=file_meta["lightning_lora_trigger"],
        prompts=card_run.sample_prompts,
        samples=SAMPLES_NAME,
        diffusers_weight_name=lora.diffusers.name,
        kohya_weight_name=lora.kohya.name,
    )
    assert again == text


HOSTILE = (
    'evil"\n---\nlicense: mit\nbase_model: x\n<script>alert(1)</script> '
    "![p](http://x/p.png) [l](javascript:alert(1)) ${oc.env:HOME} {token}\n```\n# Heading\u2028|"
    "\U000e0001\ud800 &amp; \\"
)
METADATA: dict[str, Any] = {
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "network_dim": 16,
    "network_alpha": 32,
    "target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
    "num_epochs": 3,
    "steps": 30,
    "resolution": 512,
    "num_train_images": 10,
    "dataset_hash": "ab" * 32,
    "learning_rate": 0.0001,
    "seed": 42,
    "optimizer": "torch.optim.AdamW",
    "train_text_encoder": False,
    "lightning_lora_use_dora": False,
    "lightning_lora_use_rslora": False,
    "lightning_lora_version": "0.1.0",
}


def test_hostile_token_and_prompts_stay_data_in_yaml_and_markdown() -> None:
    prompt = f"a cat, in the style of {HOSTILE}"
    text = render_model_card(
        {**METADATA, "lightning_lora_trigger": HOSTILE},
        trigger=HOSTILE,
        prompts=[prompt],
        samples=SAMPLES_NAME,
    )
    front, body = split_card(text)
    # the front matter holds exactly our keys, the token as one value, read back exactly
    assert set(front) == {"base_model", "license", "instance_prompt", "library_name", "tags"}
    assert front["instance_prompt"] == HOSTILE
    assert front["license"] == "creativeml-openrail-m"
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Markdown: no HTML, image or link from the value, no new line, heading or table cell
    outside = outside_code(text)
    assert "<script" not in outside and "</script" not in outside
    assert "<" not in outside.split("\n---\n", 1)[0]  # the front matter: no raw "<" either
    assert "](http" not in outside and "](javascript" not in outside
    assert re.findall(r"!\[[^\]]*\]\(([^)]*)\)", outside) == [SAMPLES_NAME]  # the one image
    headings = re.findall(r"^#+ .*$", body, re.M)
    assert [h.split(" ", 1)[0] for h in headings] == ["#", "##", "##", "###", "###", "###"]
    assert "Heading" not in "".join(h for h in headings[1:])
    assert "\u2028" not in body
    # code blocks: the prompt is one string literal that reads back exactly; fences balance
    (python,) = code_blocks(body, "python")
    call = next(
        node
        for node in ast.walk(ast.parse(python))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "pipe"
    )
    assert isinstance(call.args[0], ast.Constant) and call.args[0].value == prompt
    (a1111,) = code_blocks(body, "text")
    assert a1111.count("\n") == 1  # one line: the value cannot end the block
    assert sum(line.startswith("```") for line in body.splitlines()) == 4


def test_a_dora_card_has_no_kohya_instructions_and_no_samples_without_a_grid() -> None:
    text = render_model_card(
        {**METADATA, "lightning_lora_use_dora": True, "base_model": "/models/local-sd15"},
        trigger=None,
        kohya_weight_name=None,
        diffusers_weight_name="lora_weights.safetensors",
    )
    front, body = split_card(text)
    assert "base_model" not in front and "instance_prompt" not in front  # a path, no trigger
    assert "DoRA" in body and "<lora:" not in body and "cannot carry" in body
    assert 'weight_name="lora_weights.safetensors"' in body
    assert "![" not in body and SAMPLES_NAME not in body


def test_markdown_text_escapes_every_active_character() -> None:
    assert markdown_text("a_b*c") == "a\\_b\\*c"
    assert markdown_text("<a href='x'>&") == "&lt;a href\\=&#x27;x&#x27;&gt;&amp;"
    assert markdown_text("line\nbreak") == "line\\\\u000abreak"
    assert markdown_text("plain words 123") == "plain words 123"
