"""``lightning-lora-generate`` (``lightning_lora.tools.generate``): LoRA scales, kohya files,
mixed adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_lora.tools import generate
from tests.support.trained_runs import BIN

# trains: make test, not make test-fast
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["a house, in the style of lldemo", "a tree"]


def _tiles(path: Path, size: int) -> list[list[np.ndarray]]:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    rows, cols = pixels.shape[0] // size, pixels.shape[1] // size
    return [
        [pixels[r * size : (r + 1) * size, c * size : (c + 1) * size] for c in range(cols)]
        for r in range(rows)
    ]


def test_generate_cli_lora_scale_zero_is_the_base_model(
    same_config_twice, tmp_path: Path, tiny_model: str
) -> None:
    lora = same_config_twice[0].lora
    assert (BIN / "lightning-lora-generate").is_file()
    common = ["--tiny", "--steps", "4", "--resolution", "64", "--seed", "3"]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]

    assert generate.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert (
        generate.main(
            [
                *common,
                "--lora",
                str(lora.folder),
                "--lora-scale",
                "0",
                "1",
                "--out",
                str(tmp_path / "grid.png"),
            ]
        )
        == 0
    )
    base = _tiles(tmp_path / "base.png", 64)
    grid = _tiles(tmp_path / "grid.png", 64)
    assert len(base) == 1 and len(grid) == 2 and len(grid[0]) == len(PROMPTS)
    for col in range(len(PROMPTS)):
        assert np.array_equal(grid[0][col], base[0][col]), "LoRA scale 0 must be the base model"
        diff = np.abs(grid[1][col].astype(int) - base[0][col].astype(int))
        assert diff.max() > 10, f"LoRA scale 1 barely changed prompt {col} (max diff {diff.max()})"
    with Image.open(tmp_path / "grid.png") as img:
        assert json.loads(img.info["parameters"])["rows_lora_scale"] == [0.0, 1.0]

    # kohya file, and two adapters mixed with set_adapters weights (the second at weight 0)
    assert (
        generate.main([*common, "--lora", str(lora.kohya), "--out", str(tmp_path / "kohya.png")])
        == 0
    )
    assert (
        generate.main(
            [
                *common,
                "--lora",
                str(lora.diffusers),
                "--lora",
                str(lora.kohya),
                "--lora-weight",
                "1",
                "--lora-weight",
                "0",
                "--out",
                str(tmp_path / "mix.png"),
            ]
        )
        == 0
    )
    kohya, mix = _tiles(tmp_path / "kohya.png", 64), _tiles(tmp_path / "mix.png", 64)
    for col in range(len(PROMPTS)):
        assert np.array_equal(mix[0][col], grid[1][col])
        diff = np.abs(kohya[0][col].astype(int) - grid[1][col].astype(int))
        assert diff.max() <= 2, f"kohya and diffusers files differ by {diff.max()}"


def test_generate_cli_rejects_mismatched_weights(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        generate.main(
            ["--tiny", "--prompt", "x", "--lora", "a", "--lora-weight", "1", "--lora-weight", "2"]
        )
    assert exc.value.code == 2
    assert "--lora-weight" in capsys.readouterr().err
