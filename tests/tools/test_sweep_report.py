"""Research workflow: multiruns and their report, presets, Optuna, generation, reproducibility."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lightning_lora.config import CONFIG_DIR, compose_config
from lightning_lora.tools import generate, sweep_report
from lightning_lora.training.run import train
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

BIN = Path(sys.executable).parent
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
#: Presets meant for a GPU: run on CPU at full precision without compiling.
GPU_PRESETS = {"sd15_fast", "sd15_quality"}
PROMPTS = ["a house, in the style of lldemo", "a tree"]

_MULTIRUN: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, far faster than oversubscribed threads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(ll_cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIGHTNING_LORA_CACHE": str(ll_cache),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def tiny_multirun(
    tmp_path_factory: pytest.TempPathFactory, ll_cache: Path, tiny_model: str
) -> Path:
    """``lightning-lora-train -m experiment=tiny lora.rank=2,4`` in a subprocess (run once).

    Shared with ``tests/test_notebooks.py`` (which imports this fixture) through ``_MULTIRUN``.
    """
    if "dir" not in _MULTIRUN:
        sweep_dir = tmp_path_factory.mktemp("multirun") / "sweep"
        overrides = ["experiment=tiny", "lora.rank=2,4", "trainer.enable_progress_bar=false"]
        assert (BIN / "lightning-lora-train").is_file()
        try:  # runs BIN/lightning-lora-train -m <overrides> hydra.sweep.dir=<sweep_dir>
            sweep_report.run_example_sweep(
                sweep_dir, overrides, env=subprocess_env(ll_cache), timeout=500
            )
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"multirun failed:\n{exc.stdout[-3000:]}\n{exc.stderr[-5000:]}")
        _MULTIRUN["dir"] = sweep_dir
    return _MULTIRUN["dir"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text("utf-8"))


# ------------------------------------------------------------------------------ multirun + report
def test_multirun_trains_two_loras_and_writes_the_sweep_report(tiny_multirun: Path) -> None:
    runs = sweep_report.find_run_dirs(tiny_multirun)
    assert [r.name for r in runs] == ["0", "1"]
    for run, rank in zip(runs, ("2", "4"), strict=True):
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text("utf-8"))
        assert f"lora.rank={rank}" in overrides
        summary = _summary(run)
        assert Path(summary["lora"]).is_file()
        assert (run / "lora" / "lora_kohya.safetensors").is_file()
        assert summary["metadata"]["network_dim"] == int(rank)
        assert np.isfinite(summary["metrics"]["val/loss"])

    # written by the Hydra callback at the end of the multirun
    with open(tiny_multirun / "sweep_report.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [row["lora.rank"] for row in table] == ["2", "4"]
    for row, run in zip(table, runs, strict=True):
        metrics = _summary(run)["metrics"]
        assert float(row["val/loss"]) == metrics["val/loss"]
        assert float(row["train_seconds"]) == metrics["train_seconds"]
        assert float(row["samples_per_s"]) == metrics["samples_per_s"]
        assert row["lora"] == _summary(run)["lora"]
        assert row["status"] == "ok"
        assert "experiment=tiny" in row["overrides"]
    markdown = (tiny_multirun / "sweep_report.md").read_text("utf-8")
    assert markdown.count("| 0 | 2 |") == 1 and markdown.count("| 1 | 4 |") == 1
    with Image.open(tiny_multirun / "sweep_report.png") as plot:
        assert plot.width > 200 and plot.height > 200


def test_sweep_report_cli_rewrites_the_report(tiny_multirun: Path, tmp_path: Path, capsys) -> None:
    assert (BIN / "lightning-lora-sweep-report").is_file()
    assert sweep_report.main([str(tiny_multirun), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Best: run" in out and "| lora.rank |" in out
    assert (tmp_path / "sweep_report.csv").read_text("utf-8") == (
        tiny_multirun / "sweep_report.csv"
    ).read_text("utf-8")
    assert (tmp_path / "sweep_report.png").stat().st_size > 0


def _fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), "utf-8")
    if metrics is not None:
        summary = {"metrics": metrics, "metadata": {}, "lora": f"{run}/lora/x.safetensors"}
        (run / "summary.json").write_text(json.dumps(summary), "utf-8")


def test_sweep_report_handles_failed_runs_and_mixed_parameters(tmp_path: Path) -> None:
    metrics = {"val/loss": 0.5, "train_seconds": 10.0, "samples_per_s": 2.0}
    _fake_run(tmp_path, "0", ["module.optimizer.lr=1e-5", "module/scheduler=cosine"], metrics)
    _fake_run(tmp_path, "2", ["module.optimizer.lr=1e-3", "module/scheduler=constant"], None)
    _fake_run(
        tmp_path, "10", ["module.optimizer.lr=1e-3", "+extra=1"], {**metrics, "val/loss": 0.25}
    )
    report = sweep_report.write_report(tmp_path, direction="minimize")
    assert [r.run for r in report.rows] == ["0", "2", "10"]  # natural job order
    assert report.swept == ["module.optimizer.lr", "module/scheduler", "extra"]
    assert [r.status for r in report.rows] == ["ok", "missing summary", "ok"]
    assert report.best is not None and report.best.run == "10"
    assert report.plot_path is not None and report.plot_path.stat().st_size > 0
    assert "Best: run `10`" in report.markdown_path.read_text("utf-8")
    assert sweep_report.write_report(tmp_path, direction="maximize").best.run == "0"


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={name}"], output_dir=tmp_path)
    assert cfg.lora.rank >= 1 and cfg.trainer.max_epochs >= 1
    if name == "sd15_fast":
        assert cfg.trainer.precision == "bf16-mixed"
        assert cfg.data.cache_latents and cfg.data.batch_size == 8
        assert not cfg.module.gradient_checkpointing
        assert cfg.module.optimizer.fused is True
        assert cfg.module.compile_mode == "default" and cfg.module.channels_last
    if name == "sd15_quality":
        assert cfg.module.gradient_checkpointing
        assert cfg.module.scheduler._target_.endswith("get_cosine_schedule_with_warmup")
        assert cfg.module.snr_gamma == 5 and cfg.data.random_flip
        base = compose_config([], output_dir=tmp_path)
        assert cfg.module.optimizer.lr < base.module.optimizer.lr
        assert cfg.trainer.max_epochs > compose_config(["experiment=sd15_fast"]).trainer.max_epochs
    if name == "tiny":
        assert cfg.trainer.accelerator == "cpu" and cfg.data.resolution == 64
        assert cfg.trainer.max_epochs <= 2


def test_the_expected_presets_exist() -> None:
    assert {"tiny", "demo", "sd15_fast", "sd15_quality"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_runs_tiny(name: str, make_cfg, tmp_path: Path) -> None:
    overrides = [
        f"experiment={name}",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=1",
        "module.compile_mode=none",
        "validation.num_inference_steps=2",
    ]
    if name in GPU_PRESETS:
        overrides.append("trainer.precision=32-true")
    result = train(make_cfg(*overrides, output_dir=tmp_path / name))
    assert result.metrics["steps"] == 1
    assert np.isfinite(result.metrics["val/loss"])
    assert result.lora is not None and result.lora.diffusers.is_file()


# ------------------------------------------------------------------------------ Optuna, launchers
@contextmanager
def _restored_logging() -> Iterator[None]:
    """Undo Hydra's job logging setup after an in-process Hydra app."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def _run_hydra_app(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``lightning-lora-train <argv>`` in this process (saves a subprocess' start-up)."""
    from hydra.core.global_hydra import GlobalHydra

    from lightning_lora.tools.train import main

    monkeypatch.setattr(sys, "argv", ["lightning-lora-train", *argv])
    try:
        with _restored_logging():
            main()
    finally:
        GlobalHydra.instance().clear()


def test_optuna_search_runs_two_tiny_trials(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_dir = tmp_path / "optuna"
    _run_hydra_app(
        [
            "-m",
            "hparams_search=sd15_optuna",
            "experiment=tiny",
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=1",
            "validation.prompts=[]",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        monkeypatch,
    )
    runs = sweep_report.find_run_dirs(sweep_dir)
    assert len(runs) == 2
    losses = []
    for run in runs:
        overrides = dict(
            o.split("=", 1)
            for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text("utf-8"))
        )
        assert int(overrides["lora.rank"]) in (4, 8, 16, 32)
        assert int(overrides["lora.alpha"]) in (4, 8, 16, 32)
        assert 1e-5 <= float(overrides["module.optimizer.lr"]) <= 1e-3
        assert overrides["trainer.max_epochs"] == "1"  # pinned on the command line
        summary = _summary(run)
        assert summary["metadata"]["network_dim"] == int(overrides["lora.rank"])
        losses.append(summary["metrics"]["val/loss"])
    # the Hydra app returned val/loss to the sweeper, which minimised it
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text("utf-8"))
    assert results["best_value"] == pytest.approx(min(losses))
    with open(sweep_dir / "sweep_report.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_launcher_and_sweeper_configs_compose() -> None:
    cfg = _compose_with_hydra(["hydra/launcher=local_parallel", "experiment=tiny"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 2
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "hparams_search=sd15_optuna"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {
        "lora.rank",
        "lora.alpha",
        "module.optimizer.lr",
        "trainer.max_epochs",
    }
    assert cfg.optimized_metric == "val/loss"
    callback = cfg.hydra.callbacks.sweep_report._target_
    assert callback == "lightning_lora.tools.sweep_report.SweepReportCallback"


def test_optional_loggers_compose(tmp_path: Path) -> None:
    cfg = compose_config(["logger=[csv,tensorboard,wandb,mlflow]"], output_dir=tmp_path)
    targets = {name: node._target_ for name, node in cfg.logger.items()}
    assert targets == {
        "csv": "lightning.pytorch.loggers.CSVLogger",
        "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
        "wandb": "lightning.pytorch.loggers.WandbLogger",
        "mlflow": "lightning.pytorch.loggers.MLFlowLogger",
    }


# ------------------------------------------------------------------------------ reproducibility
@pytest.fixture(scope="module")
def same_config_twice(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: str, demo_images: Path
) -> tuple:
    """Two runs of one config and seed; the high lr makes the LoRA visibly change images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("repro")
    overrides = [
        *TINY_OVERRIDES,
        f"data.image_dir={demo_images}",
        "module.optimizer.lr=2e-2",
        "validation.prompts=[]",
        "seed=7",
    ]
    try:
        return tuple(
            train(compose_config(overrides, output_dir=root / name)) for name in ("a", "b")
        )
    finally:
        torch.set_num_threads(threads)


def _train_losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_same_config_and_seed_give_the_same_loss_curve_and_lora(same_config_twice) -> None:
    a, b = same_config_twice
    curve = _train_losses(a.output_dir)
    assert len(curve) == 4  # 8 images, batch 4, 2 epochs
    assert curve == _train_losses(b.output_dir)  # exactly, as logged
    for name in ("diffusers", "kohya"):
        ta, tb = load_file(getattr(a.lora, name)), load_file(getattr(b.lora, name))
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key


# ------------------------------------------------------------------------------ generation CLI
def _tiles(path: Path, size: int) -> list[list[np.ndarray]]:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    rows, cols = pixels.shape[0] // size, pixels.shape[1] // size
    return [
        [pixels[r * size : (r + 1) * size, c * size : (c + 1) * size] for c in range(cols)]
        for r in range(rows)
    ]


def test_generate_cli_lora_scale_zero_is_the_base_model(
    same_config_twice, tmp_path: Path, tiny_model: str
) -> None:
    lora = same_config_twice[0].lora
    assert (BIN / "lightning-lora-generate").is_file()
    common = ["--tiny", "--steps", "4", "--resolution", "64", "--seed", "3"]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]

    assert generate.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert (
        generate.main(
            [
                *common,
                "--lora",
                str(lora.folder),
                "--lora-scale",
                "0",
                "1",
                "--out",
                str(tmp_path / "grid.png"),
            ]
        )
        == 0
    )
    base = _tiles(tmp_path / "base.png", 64)
    grid = _tiles(tmp_path / "grid.png", 64)
    assert len(base) == 1 and len(grid) == 2 and len(grid[0]) == len(PROMPTS)
    for col in range(len(PROMPTS)):
        assert np.array_equal(grid[0][col], base[0][col]), "LoRA scale 0 must be the base model"
        diff = np.abs(grid[1][col].astype(int) - base[0][col].astype(int))
        assert diff.max() > 10, f"LoRA scale 1 barely changed prompt {col} (max diff {diff.max()})"
    with Image.open(tmp_path / "grid.png") as img:
        assert json.loads(img.info["parameters"])["rows_lora_scale"] == [0.0, 1.0]

    # kohya file, and two adapters mixed with set_adapters weights (the second at weight 0)
    assert (
        generate.main([*common, "--lora", str(lora.kohya), "--out", str(tmp_path / "kohya.png")])
        == 0
    )
    assert (
        generate.main(
            [
                *common,
                "--lora",
                str(lora.diffusers),
                "--lora",
                str(lora.kohya),
                "--lora-weight",
                "1",
                "--lora-weight",
                "0",
                "--out",
                str(tmp_path / "mix.png"),
            ]
        )
        == 0
    )
    kohya, mix = _tiles(tmp_path / "kohya.png", 64), _tiles(tmp_path / "mix.png", 64)
    for col in range(len(PROMPTS)):
        assert np.array_equal(mix[0][col], grid[1][col])
        diff = np.abs(kohya[0][col].astype(int) - grid[1][col].astype(int))
        assert diff.max() <= 2, f"kohya and diffusers files differ by {diff.max()}"


def test_generate_cli_rejects_mismatched_weights(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        generate.main(
            ["--tiny", "--prompt", "x", "--lora", "a", "--lora-weight", "1", "--lora-weight", "2"]
        )
    assert exc.value.code == 2
    assert "--lora-weight" in capsys.readouterr().err
