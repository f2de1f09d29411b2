"""The package installs from a wheel and starts from there, as a container image would use it.

The wheel is built from this checkout (no build isolation: nothing is downloaded), installed with
``--no-deps`` into a fresh folder, and used from a directory outside the repository with that
folder first on ``PYTHONPATH``: the configs are composed from the installed package, the
worker's ``--print-config`` runs through the installed console script, and so does a one-epoch
``lightning-lora-train experiment=tiny``. The repository's ``benchmarks`` are not in the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

_COMPOSE = """
import json, lightning_lora
from lightning_lora.config import CONFIG_DIR, compose_config
train = compose_config(["experiment=tiny"])
worker = compose_config(["model=tiny"], config_name="worker")
print(json.dumps({
    "package": lightning_lora.__file__,
    "configs": str(CONFIG_DIR),
    "train_model": train.model._target_,
    "worker_queue_section": "worker" in worker,
    "callbacks": sorted(worker.callbacks),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The wheel installed into a fresh folder, and an environment that imports it first."""
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            ".",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("lightning_lora-*.whl")
    target = tmp_path_factory.mktemp("site")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HYDRA_FULL_ERROR": "1"}
    yield target, env


def _outside(tmp_path: Path) -> Path:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert REPO not in cwd.parents
    return cwd


def test_the_wheel_holds_the_configs_and_the_demo_model_and_no_benchmarks(
    installed: tuple[Path, dict[str, str]],
) -> None:
    target, _ = installed
    assert (target / "lightning_lora" / "configs" / "train.yaml").is_file()
    assert (target / "lightning_lora" / "configs" / "experiment" / "tiny.yaml").is_file()
    pretrained = target / "lightning_lora" / "demo" / "pretrained" / "tiny-sd15-shapes"
    assert (pretrained / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (target / "benchmarks").exists()
    wheels = list(target.glob("lightning_lora-*.dist-info"))
    assert len(wheels) == 1
    records = (wheels[0] / "RECORD").read_text()
    assert "benchmarks/" not in records and "tests/" not in records


def test_configs_compose_from_the_installed_package(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, env = installed
    proc = subprocess.run(
        [sys.executable, "-c", _COMPOSE],
        cwd=_outside(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target), found  # not the checkout
    assert Path(found["configs"]).is_relative_to(target), found
    assert found["train_model"] == "lightning_lora.training.models.load_components"
    assert found["worker_queue_section"] and "vram" in found["callbacks"]


def test_the_installed_worker_prints_its_config(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, env = installed
    proc = subprocess.run(
        [sys.executable, target / "bin" / "lightning-lora-worker", "model=tiny", "--print-config"],
        cwd=_outside(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker:" in proc.stdout and "webhook_allowlist" in proc.stdout


def test_the_installed_trainer_trains_one_epoch(
    installed: tuple[Path, dict[str, str]], tmp_path: Path, ll_cache: Path
) -> None:
    target, env = installed
    cwd = _outside(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            target / "bin" / "lightning-lora-train",
            "experiment=tiny",
            "trainer.max_epochs=1",
            f"paths.output_dir={cwd / 'run'}",
        ],
        cwd=cwd,
        env={**env, "LIGHTNING_LORA_CACHE": str(ll_cache)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = cwd / "run" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and f"LoRA (diffusers): {lora}" in proc.stdout
    info = json.loads((cwd / "run" / "run_info.json").read_text())
    assert info["versions"]["lightning_lora"] != "unknown"
