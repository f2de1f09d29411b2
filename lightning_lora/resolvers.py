"""OmegaConf resolvers used by the configs (``${ll.tiny_model:...}``, ``${ll.demo_images:...}``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _tiny_model(cache_dir: str | None = None) -> str:
    from lightning_lora.models import tiny_model_path

    return tiny_model_path(cache_dir or None)


def _demo_images(cache_dir: str | None = None) -> str:
    from lightning_lora.demo import DEMO_VERSION, make_demo_images
    from lightning_lora.models import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return str(make_demo_images(root / f"demo-style-{DEMO_VERSION}"))


def register_resolvers() -> None:
    """Register the ``ll.*`` resolvers once (safe to call repeatedly)."""
    for name, fn in (("ll.tiny_model", _tiny_model), ("ll.demo_images", _demo_images)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
