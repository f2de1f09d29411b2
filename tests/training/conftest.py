"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from lightning_lora.lora.text_encoder import build_lora_configs


@pytest.fixture(scope="module")
def tiny_module_factory(tiny_model):
    from tests.conftest import TINY_OVERRIDES, composed

    def make(*overrides: str):
        cfg = composed(*TINY_OVERRIDES, "lora.dropout=0.0", *overrides)
        components = instantiate(cfg.model)
        return instantiate(cfg.module, _partial_=True)(
            components=components, lora=build_lora_configs(cfg.lora)[0], lora_seed=0
        )

    return make
