"""The validation grid draws each sample prompt with its own seed, size and steps
(``validation.prompts`` mappings and ``validation.prompts_file``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from lightning_lora.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a blue background"


def test_each_prompt_is_drawn_with_its_own_settings(make_cfg, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"# the first prompt again\n{PROMPT} --d 5 --s 2\n", encoding="utf-8")
    cfg = make_cfg("trainer.max_epochs=1", "validation.every_n_epochs=1")
    with open_dict(cfg):
        cfg.validation.prompts = OmegaConf.create(
            [
                {"prompt": PROMPT, "seed": 5, "steps": 2},
                {"prompt": PROMPT, "seed": 5, "steps": 2},  # the same: the same image
                {"prompt": PROMPT, "seed": 6, "steps": 2},  # another seed
                {"prompt": PROMPT, "seed": 5, "steps": 3},  # more steps
                {"prompt": PROMPT, "seed": 5, "steps": 2, "width": 128},  # wider
            ]
        )
        cfg.validation.prompts_file = str(prompts_file)
    result = train(cfg)
    assert result.sample_grid is not None
    assert result.sample_prompts == [PROMPT] * 6
    with Image.open(result.sample_grid) as img:
        grid = np.asarray(img.convert("RGB"))
    # 6 prompts: 3 columns, 2 rows of 128 x 64 cells (the widest image's)
    assert grid.shape == (128, 384, 3)

    def cell(i: int) -> np.ndarray:
        row, col = divmod(i, 3)
        return grid[row * 64 : (row + 1) * 64, col * 128 : (col + 1) * 128]

    first = cell(0)[:, 32:96]  # a 64 px image centred in its cell, white beside it
    assert (cell(0)[:, :32] == 255).all() and (cell(0)[:, 96:] == 255).all()
    assert np.array_equal(cell(1)[:, 32:96], first)
    assert not np.array_equal(cell(2)[:, 32:96], first)
    assert not np.array_equal(cell(3)[:, 32:96], first)
    assert not (cell(4)[:, :32] == 255).all()  # 128 px wide: it fills its cell
    assert np.array_equal(cell(5)[:, 32:96], first)  # the file's line: the first prompt's settings
