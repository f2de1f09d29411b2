"""The Hydra configs: where they are, how they are composed, and the ``ll.*`` resolvers.

The configs ship inside the package (``lightning_lora/configs``), so a wheel install composes
them exactly as a checkout does. The CLI (:mod:`lightning_lora.tools.train`), notebooks
(:func:`compose_config`) and the worker (``config_name="worker"``) all start here.

Resolvers, registered when :mod:`lightning_lora` is imported:

* ``${ll.tiny_model:}``: the tiny random-weight SD1.5-shaped model, built once into the cache;
* ``${ll.demo_model:}``: the demo's pretrained tiny model, shipped in the package;
* ``${ll.demo_images:...}``: the demo style's images, drawn once into the cache.

They import what they need when called, so composing a config loads no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["CONFIG_DIR", "compose_config", "plain_dict", "register_resolvers"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The package's Hydra config folder (``train.yaml``, ``worker.yaml`` and the groups)."""


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose the training config as the CLI would, for notebooks, tests and the worker.

    Args:
        overrides: Hydra overrides, e.g. ``["model=tiny", "trainer=cpu", "lora.rank=8"]``.
        output_dir: The run's output folder (the CLI gets one from Hydra).
        config_name: The primary config (``train`` or ``worker``).

    Returns:
        The config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def plain_dict(node: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """``OmegaConf.to_container`` of a mapping node: a plain ``dict``.

    ``to_container`` is typed for any node (a list, a string); a ``DictConfig`` gives a ``dict``,
    and the configs' keys are strings.

    Args:
        node: The config mapping.
        resolve: Resolve interpolations first.

    Returns:
        The mapping as nested plain containers.
    """
    container = OmegaConf.to_container(node, resolve=resolve)
    assert isinstance(container, dict), f"not a config mapping: {type(node).__name__}"
    return cast(dict[str, Any], container)


def _tiny_model(cache_dir: str | None = None) -> str:
    from lightning_lora.training.models import tiny_model_path

    return tiny_model_path(cache_dir or None)


def _demo_model() -> str:
    from lightning_lora.demo.model import demo_model_path

    return demo_model_path()


def _demo_images(
    cache_dir: str | None = None, count: int = 8, size: int = 96, caption_every: int = 2
) -> str:
    from lightning_lora.demo.images import DEMO_VERSION, make_demo_images
    from lightning_lora.training.models import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"demo-style-{DEMO_VERSION}"
    if (count, size, caption_every) != (8, 96, 2):
        name += f"-{count}x{size}px-c{caption_every}"
    return str(make_demo_images(root / name, count, size, caption_every))


def register_resolvers() -> None:
    """Register the ``ll.*`` resolvers once (safe to call repeatedly)."""
    for name, fn in (
        ("ll.tiny_model", _tiny_model),
        ("ll.demo_model", _demo_model),
        ("ll.demo_images", _demo_images),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
