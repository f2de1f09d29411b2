"""What a run records about itself: its resolved config, package versions and git commit."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["package_versions", "write_run_info"]


def package_versions() -> dict[str, str]:
    """Python, CUDA and the versions of the packages a run depends on (for provenance)."""
    names = [
        "lightning_lora",
        "torch",
        "diffusers",
        "peft",
        "transformers",
        "lightning",
        "hydra-core",
    ]
    found = {"python": platform.python_version(), "cuda": str(torch.version.cuda)}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_run_info(
    cfg: DictConfig, output_dir: Path, precision: dict[str, str] | None = None
) -> None:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (versions, commit, precision).

    Args:
        cfg: The run's config.
        output_dir: The run's folder (created if missing).
        precision: The run's precision facts (:func:`.precision.precision_info`).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    info = {"versions": package_versions(), "git_commit": _git_commit(), **(precision or {})}
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
