"""The demo's shapes world and style distance (``lightning_lora.demo.shapes``)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lora.demo.shapes import STYLE_PALETTE, draw_scene, draw_styled_scene, style_distance
from tests.support.images import demo_scenes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_style_distance_tells_the_style_from_plain_scenes() -> None:
    scenes = demo_scenes(16)
    plain = [draw_scene(s) for s in scenes]
    styled = [draw_styled_scene(s) for s in scenes]
    other_styled = [draw_styled_scene(s) for s in demo_scenes(16, seed=4)]
    assert style_distance(styled, styled) == 0.0
    assert style_distance(other_styled, styled) < 0.35  # same style, other scenes
    assert style_distance(plain, styled) > 0.8  # same scenes, not the style
    # the styled images use the palette's colours (antialiased edges aside)
    palette = np.asarray(STYLE_PALETTE)
    pixels = np.concatenate([np.asarray(img).reshape(-1, 3) for img in styled])
    nearest = np.abs(pixels[:, None, :].astype(int) - palette[None]).sum(-1).min(1)
    assert (nearest <= 12).mean() > 0.9
