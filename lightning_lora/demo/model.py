"""The demo's pretrained tiny model: a diffusers folder shipped inside the package.

``make pretrain-tiny`` (:mod:`lightning_lora.demo.pretrain`) rebuilds it; ``model=demo`` loads it
with ``from_pretrained`` through :func:`lightning_lora.training.models.load_components`, exactly
as SD1.5 is loaded.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL_DIR", "demo_model_path"]


#: The demo's pretrained tiny model, shipped in the package (`make pretrain-tiny` rebuilds it).
DEMO_MODEL_DIR = Path(__file__).parent / "pretrained" / "tiny-sd15-shapes"


def demo_model_path() -> str:
    """Return the folder of the demo's pretrained tiny model (shipped, never built at run time).

    Returns:
        The path as a string (what ``pretrained_model_name_or_path`` takes).

    Raises:
        FileNotFoundError: If the folder is missing (a checkout without it: run
            ``make pretrain-tiny``).
    """
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing at {DEMO_MODEL_DIR}; `make pretrain-tiny` rebuilds it"
        )
    return str(DEMO_MODEL_DIR)
