"""OmegaConf resolvers of the configs: ``ll.tiny_model``, ``ll.demo_model``, ``ll.demo_images``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _tiny_model(cache_dir: str | None = None) -> str:
    from lightning_lora.models import tiny_model_path

    return tiny_model_path(cache_dir or None)


def _demo_model() -> str:
    from lightning_lora.models import demo_model_path

    return demo_model_path()


def _demo_images(
    cache_dir: str | None = None, count: int = 8, size: int = 96, caption_every: int = 2
) -> str:
    from lightning_lora.demo import DEMO_VERSION, make_demo_images
    from lightning_lora.models import default_cache_dir

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
