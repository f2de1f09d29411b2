"""The Hydra configs: where they are, how they are composed, and their plain-data form.

The configs ship inside the package (``lightning_lora/configs``), so a wheel install composes
them exactly as a checkout does. The CLI (:mod:`lightning_lora.tools.train`), notebooks
(:func:`compose_config`) and the worker (``config_name="worker"``) all start here. The ``ll.*``
resolvers the configs use are :mod:`lightning_lora.resolvers`' (registered when the package is
imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["CONFIG_DIR", "compose_config", "partial_at", "plain_dict"]

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


def partial_at(cfg: DictConfig | None, key: str, default: Any) -> Any:
    """The ``_partial_`` target at ``key`` of ``cfg``, instantiated, or ``default`` without one.

    The ``reporting`` group's entries are such targets (the job supplies the rest at run time).

    Args:
        cfg: The composed config, or ``None``.
        key: Dotted key, e.g. ``reporting.client``.
        default: What to return when ``cfg`` is ``None`` or has no node at ``key``.
    """
    from hydra.utils import instantiate

    node = None if cfg is None else OmegaConf.select(cfg, key, default=None)
    return default if node is None else instantiate(node)
