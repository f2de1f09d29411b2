"""The configs' OmegaConf resolvers, registered when :mod:`lightning_lora` is imported.

* ``${ll.tiny_model:}``: the tiny random-weight SD1.5-shaped model, built once into the cache;
* ``${ll.demo_model:}``: the demo's pretrained tiny model, shipped in the package;
* ``${ll.demo_images:...}``: the demo style's images, drawn once into the cache.

They import what they need when called, so composing a config loads no model code. They sit at
the top of the package, beside its ``__init__``: they reach into the demo and the model loading.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["register_resolvers"]


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
