"""The bucket layout (``lightning_lora.jobs.layout``)."""

from __future__ import annotations

import pytest

from lightning_lora.clients.image_types import local_image_name
from lightning_lora.jobs.layout import checkpoint_prefix, kohya_key, model_key


def test_key_helpers() -> None:
    assert model_key(7) == "models/style_7/lora_weights.safetensors"
    assert kohya_key(7) == "models/style_7/lora_kohya.safetensors"
    assert checkpoint_prefix(7) == "checkpoints/style_7/"
    with pytest.raises(ValueError, match="style_id"):
        model_key(-1)
    with pytest.raises(ValueError, match="run id"):
        checkpoint_prefix(7, "../x")
    assert local_image_name(3, "a/b/../.hidden name$.jpg") == "0003_hidden_name_.jpg"
    assert local_image_name(0, "x/" + "n" * 300 + ".png").endswith("n.png")
    assert len(local_image_name(0, "x/" + "n" * 300 + ".png")) == 105
