"""What a run records about itself: its resolved config, package versions and git commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["compute_conditions", "package_versions", "write_run_info"]


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


def compute_conditions() -> dict[str, object]:
    """What a byte-identical reproduction needs besides the config, seed, data and versions.

    PyTorch splits a reduction into as many partial sums as it has threads, so another thread
    count adds the same numbers in another order: the same run's LoRA tensors then differ in
    their last bits (and grow apart over the steps). The hardware (CPU features, GPU model) picks
    the kernels too.
    """
    conditions: dict[str, object] = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    if torch.cuda.is_available():
        conditions["cuda_device"] = torch.cuda.get_device_name()
    return conditions


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
    info = {
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "compute": compute_conditions(),
        **(precision or {}),
    }
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
