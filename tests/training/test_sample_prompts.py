"""Sample prompts (``lightning_lora.training.sample_prompts``): strings, mappings and kohya's
prompt file syntax; the validation grid draws each prompt with its own settings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_lora.training.inference import make_grid
from lightning_lora.training.sample_prompts import (
    SamplePrompt,
    parse_prompt_line,
    read_prompts_file,
    resolve_sample_prompts,
)


def test_a_kohya_line_with_every_option() -> None:
    line = "a cat, {token} style --n blurry, lowres --w 512 --h 768 --d 42 --l 6.5 --s 28"
    assert parse_prompt_line(line) == SamplePrompt(
        prompt="a cat, {token} style",
        negative_prompt="blurry, lowres",
        seed=42,
        width=512,
        height=768,
        steps=28,
        guidance_scale=6.5,
    )
    # kohya's rounding and clamps; options in any order; upper case letters
    assert parse_prompt_line("x --S 5000 --H 500 --W 20") == SamplePrompt(
        "x", steps=1000, height=496, width=64
    )


def test_a_prompt_file_skips_blank_lines_and_comments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# samples\n\na house --d 1\n   \n  # indented comment\n"
        "a tree --ss euler_a --l 3\n{token} ${oc.env:HOME} {0} --n {token}\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        prompts = read_prompts_file(path)
    assert prompts == [
        SamplePrompt("a house", seed=1),
        SamplePrompt("a tree", guidance_scale=3.0),
        SamplePrompt("{token} ${oc.env:HOME} {0}", negative_prompt="{token}"),
    ]
    assert f"{path}:6" in caplog.text and "--ss euler_a" in caplog.text  # unknown: ignored
    # only {token} is substituted: the rest of the text is data
    assert prompts[2].with_token("ohwx") == SamplePrompt(
        "ohwx ${oc.env:HOME} {0}", negative_prompt="ohwx"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --w wide", "bad value for --w: 'wide'"),
        ("a cat --d -1", "bad value for --d: '-1'"),
        ("a cat --l lots", "bad value for --l: 'lots'"),
        ("a cat --s", "option --s needs a value"),
    ],
)
def test_bad_values_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "p.txt"
    path.write_text(f"# ok\na fine prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        read_prompts_file(path)


def test_strings_mappings_then_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("from the file --d 9\n", encoding="utf-8")
    prompts = resolve_sample_prompts(
        ["plain", {"prompt": "mapped", "width": 128, "steps": 3, "negative_prompt": "ugly"}],
        str(path),
    )
    assert prompts == [
        SamplePrompt("plain"),
        SamplePrompt("mapped", negative_prompt="ugly", width=128, steps=3),
        SamplePrompt("from the file", seed=9),
    ]
    filled = [p.filled(10 + i, 64, 64, 25, 7.5) for i, p in enumerate(prompts)]
    assert filled[0] == SamplePrompt("plain", "", 10, 64, 64, 25, 7.5)
    assert filled[1] == SamplePrompt("mapped", "ugly", 11, 128, 64, 3, 7.5)
    assert filled[2] == SamplePrompt("from the file", "", 9, 64, 64, 25, 7.5)
    with pytest.raises(ValueError, match=r"validation.prompts\[0\]: unknown .* colour"):
        resolve_sample_prompts([{"prompt": "x", "colour": "red"}])
    with pytest.raises(ValueError, match=r"validation.prompts\[1\]: seed must be >= 0"):
        resolve_sample_prompts(["ok", {"prompt": "x", "seed": -3}])
    with pytest.raises(ValueError, match=r"validation.prompts\[0\]: a sample prompt needs"):
        resolve_sample_prompts([{"seed": 1}])


def test_a_grid_of_mixed_sizes_pads_each_image_into_its_cell() -> None:
    small = Image.new("RGB", (64, 64), "red")
    wide = Image.new("RGB", (128, 32), "blue")
    grid = make_grid([small, wide], cols=2)
    assert grid.size == (256, 64)  # cells of the largest width and height
    pixels = np.asarray(grid)
    assert (pixels[:, 32:96] == [255, 0, 0]).all()  # centred, not resized
    assert (pixels[:, :32] == 255).all() and (pixels[:, 96:128] == 255).all()
    assert (pixels[16:48, 128:] == [0, 0, 255]).all()
    assert (pixels[:16, 128:] == 255).all() and (pixels[48:, 128:] == 255).all()
