"""The benchmark (``python -m benchmarks``; a CPU smoke: fields and arithmetic, no speed claims).

* ``python -m benchmarks`` on the tiny model in a clone without the shared reference: the table
  and the JSON carry the right fields, the ratio is ours / baseline of the two measured values,
  the reference row says why it was skipped.
* The baseline (diffusers' recipe step) trains the LoRA only, and agrees with the shared
  reference step for step when that file is present (CI has ``../shared``).

The speed features the benchmark measures are tested where they live:
``tests/training/test_module.py`` (noise tables, fused AdamW with clipping),
``tests/training/test_compilation.py`` and ``tests/training/test_precision.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tomllib
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from benchmarks import baseline, bench, models, report, runner
from benchmarks.cases import Case, effective_precision, grid_cases
from lightning_lora.config import compose_config
from lightning_lora.training.models import load_components

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast

REPO = Path(__file__).resolve().parents[2]


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="session")
def bench_model(ll_cache: Path) -> Path:
    """The bench's tiny random-weight model folder (SD1.5 layout, two layers per block)."""
    dest = ll_cache / f"bench-tiny-{models.MODEL_FOLDER_VERSION}"
    return models.build_model_folder(dest, tiny=True, dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------- the bench
def test_bench_runs_in_a_clone_without_the_shared_reference(
    tmp_path: Path, bench_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(baseline.REFERENCE_ENV, str(tmp_path / "no" / baseline.REFERENCE_FILE))
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    code = bench.main(
        [
            "--tiny",
            *("--case", "base:1", "--case", "ref:1", "--case", "ours:1"),
            *("--steps", "1", "--warmup", "1", "--peak-tflops", "1"),
            *("--workdir", str(tmp_path / "work"), "--model-dir", str(bench_model)),
            *("--json", str(out), "--table", str(table)),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["resolution"] == 64
    assert meta["reference"] is None and "DiffusersLoRAStep" in meta["baseline"]
    assert meta["versions"]["torch"] != "unknown"
    assert meta["attention_processors"] == {"AttnProcessor2_0": 32}  # SDPA in every attention
    assert _positive(meta["flops_per_sample"])

    base, ref, ours = doc["results"]
    assert (base["recipe"], ref["recipe"], ours["recipe"]) == ("baseline", "reference", "ours")
    assert baseline.REFERENCE_FILE in ref["skipped"] and "error" not in ref
    for row in (base, ours):
        assert "error" not in row, row.get("error")
        for key in ("step_s", "samples_per_s", "tflop_per_sample", "achieved_tflops", "mfu"):
            assert _positive(row[key]), (row["case"], key, row[key])
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert math.isfinite(base["final_loss"])
    assert base["precision"] == ours["precision"] == "32-true"  # the CPU default, on both sides
    assert ours["ratio_to_baseline"] == pytest.approx(ours["samples_per_s"] / base["samples_per_s"])
    assert ours["baseline_case"] == base["case"] and ours["ratio_to_reference"] is None
    assert _positive(ours["prepare_s"]) and _positive(ours["run_wall_s"])
    assert ours["compile_s"] >= 0 and ours["steps_run"] == 2  # warm-up + timed (no CPU audit)

    text = table.read_text()
    header = text.splitlines()[0]
    for column in report.TABLE_COLUMNS:
        assert column in header
    assert base["case"] in text and ours["case"] in text and "skipped" not in header
    assert f"{ours['ratio_to_baseline']:.2f}x" in text
    assert "no sd15_lora_reference.py" in text


def test_a_ratio_is_only_between_cases_that_differ_in_the_recipe_alone() -> None:
    """Precision, batch, checkpointing and compilation must match, else the ratio is blank."""

    def row(recipe: str, sps: float, **changes: object) -> dict:
        base = {"batch_size": 4, "grad_ckpt": True, "precision": "bf16-mixed"}
        compile_mode = None if recipe in ("baseline", "reference") else "none"
        return {
            "recipe": recipe,
            "case": f"{recipe}{changes}",
            "samples_per_s": sps,
            "compile_mode": compile_mode,
            **base,
            **changes,
        }

    unlike = [
        {"precision": "32-true"},
        {"batch_size": 2},
        {"grad_ckpt": False},
        {"compile_mode": "regional"},
    ]
    for change in unlike:
        rows = [row("baseline", 10.0), row("ours", 20.0, **change)]
        report.attach_ratios(rows)
        assert rows[1]["ratio_to_baseline"] is None, change
        assert rows[1]["baseline_case"] is None
    rows = [row("baseline", 10.0, precision="32-true"), row("baseline", 8.0), row("ours", 20.0)]
    report.attach_ratios(rows)
    assert rows[2]["ratio_to_baseline"] == 2.5 and rows[2]["baseline_case"] == rows[1]["case"]
    assert "| 2.50x |" in report.format_table(rows)
    # the grid gives every uncompiled ours row its like baseline
    cases = grid_cases([2, 4], [False, True], ["none", "regional"], ["32-true", "bf16-mixed"])
    ours = [c for c in cases if c.recipe == "ours" and c.compile_mode == "none"]
    labels = {c.label for c in cases if c.recipe == "baseline"}
    for case in ours:
        twin = dataclasses.replace(case, recipe="baseline")
        assert twin.label in labels, case.label
    assert effective_precision("16-mixed", "cpu") == "bf16-mixed"
    assert effective_precision("16-mixed", "cuda") == "16-mixed"
    assert baseline.recipe_precision("32-true", "cpu") == "no"
    assert baseline.recipe_precision("16-mixed", "cuda") == "fp16"


def test_the_bench_runs_from_the_repository_and_is_not_installed() -> None:
    """``python -m benchmarks`` from a checkout; a wheel holds no top-level ``benchmarks``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lightning_lora*"]
    scripts = {e.name for e in entry_points(group="console_scripts")}
    assert not any("bench" in name for name in scripts), scripts
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "--case" in proc.stdout, proc.stderr[-2000:]


def test_reference_is_looked_for_beside_the_repo_or_through_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(baseline, "REPO_ROOT", tmp_path / "clone")
    monkeypatch.delenv(baseline.REFERENCE_ENV, raising=False)
    assert baseline.reference_path() is None  # a user's clone: no ../shared
    with pytest.raises(FileNotFoundError, match=baseline.REFERENCE_ENV):
        baseline.load_reference()
    beside = tmp_path / "shared" / "bench" / baseline.REFERENCE_FILE
    beside.parent.mkdir(parents=True)
    beside.write_text("# stand-in\n")
    assert baseline.reference_path() == beside.resolve()
    elsewhere = tmp_path / "elsewhere" / baseline.REFERENCE_FILE
    elsewhere.parent.mkdir()
    elsewhere.write_text("# stand-in\n")
    monkeypatch.setenv(baseline.REFERENCE_ENV, str(elsewhere.parent))  # a folder
    assert baseline.reference_path() == elsewhere.resolve()
    monkeypatch.setenv(baseline.REFERENCE_ENV, str(elsewhere))  # the file
    assert baseline.reference_path() == elsewhere.resolve()
    monkeypatch.setenv(baseline.REFERENCE_ENV, str(tmp_path / "missing"))
    assert baseline.reference_path() is None  # the env alone decides, no fallback


def test_case_specs() -> None:
    assert bench.parse_case("base:4:gc") == bench.Case("baseline", 4, grad_ckpt=True)
    assert bench.parse_case("ref:4:gc") == bench.Case("reference", 4, grad_ckpt=True)
    case = bench.parse_case("ours:16:default:16-mixed")
    assert (case.batch_size, case.compile_mode, case.precision) == (16, "default", "16-mixed")
    regional = bench.parse_case("ours:16:regional:blocks=ResnetBlock2D")
    assert regional.compile_mode == "regional" and regional.extra_blocks == ("ResnetBlock2D",)
    assert "regional+ResnetBlock2D" in regional.label
    job = bench.parse_case("job:4:reduce-overhead:images=20:epochs=100:nockpt")
    assert (job.images, job.epochs, job.checkpoints) == (20, 100, False)
    with pytest.raises(ValueError, match="bad option"):
        bench.parse_case("ours:4:fast")
    with pytest.raises(ValueError, match="bad case"):
        bench.parse_case("theirs:4")


def test_ratios_and_mfu_use_the_measured_values() -> None:
    rows = [
        {"case": "b4", "recipe": "baseline", "batch_size": 4, "grad_ckpt": True,
         "samples_per_s": 10.0},
        {"case": "r4", "recipe": "reference", "batch_size": 4, "grad_ckpt": True,
         "samples_per_s": 8.0},
        {"case": "o4", "recipe": "ours", "batch_size": 4, "grad_ckpt": True,
         "samples_per_s": 25.0},
        {"case": "o8", "recipe": "ours", "batch_size": 8, "grad_ckpt": True,
         "samples_per_s": 40.0},
    ]  # fmt: skip
    report.attach_ratios(rows)
    report.attach_mfu(rows, flops=2e12, peak_tflops=100.0)
    base, ref, o4, o8 = rows
    assert o4["ratio_to_baseline"] == pytest.approx(2.5) and o4["baseline_case"] == "b4"
    assert o4["ratio_to_reference"] == pytest.approx(25.0 / 8.0)
    assert base["ratio_to_reference"] == pytest.approx(10.0 / 8.0)  # the cross-check
    assert "ratio_to_baseline" not in ref
    assert o8["ratio_to_baseline"] is None and o8["ratio_to_reference"] is None  # no b8 rows
    assert o4["mfu"] == pytest.approx(25.0 * 2.0 / 100.0)


def test_a_case_row_is_its_median_run_with_every_run_beside_it() -> None:
    runs = [
        {"case": "o2", "step_s": 0.30, "samples_per_s": 2 / 0.30},
        {"case": "o2", "step_s": 0.10, "samples_per_s": 2 / 0.10},
        {"case": "o2", "step_s": 0.20, "samples_per_s": 2 / 0.20},
    ]
    row = report.median_run(runs)
    assert row["step_s"] == 0.20 and row["samples_per_s"] == pytest.approx(10.0)
    assert row["runs_step_s"] == [0.30, 0.10, 0.20] and row["runs"] == 3
    assert "runs_step_s" not in runs[2]  # the runs themselves are left as they were
    even = report.median_run(runs[:2])  # of two, the faster (the lower median)
    assert even["step_s"] == 0.10 and even["runs"] == 2
    skipped = [{"case": "o2", "skipped": "time budget"}] * 2
    assert report.median_run(skipped)["skipped"] == "time budget"
    assert report.median_run(runs[:1]) is runs[0]


def test_our_cases_train_the_recipes_lora(tmp_path: Path) -> None:
    """A pair differs in the trainer alone: our runs take the recipe's rank, alpha and targets."""
    run = runner.Bench("cpu", True, 64, 1, 1, 0, 1, tmp_path, model_dir=tmp_path / "model")
    overrides = run.overrides(Case(recipe="ours", batch_size=2), tmp_path / "images")
    cfg = compose_config(overrides)
    settings = baseline.RecipeSettings()
    assert (cfg.lora.rank, cfg.lora.alpha) == (settings.rank, settings.alpha)
    assert cfg.lora.dropout == 0  # the recipe's LoraConfig has no dropout
    assert sorted(cfg.lora.target_modules) == sorted(baseline.LORA_TARGETS)
    assert cfg.lora.init_lora_weights == "gaussian"
    assert compose_config([]).lora.dropout > 0  # the project's own default is left alone


# --------------------------------------------------------------------------- the baselines
def _recipe(model_dir: Path, **settings) -> baseline.DiffusersLoRAStep:
    parts = load_components(str(model_dir), torch_dtype=torch.bfloat16, reuse=False)
    torch.manual_seed(0)
    return baseline.DiffusersLoRAStep(
        parts.unet,
        parts.vae,
        parts.text_encoder,
        settings.pop("scheduler", parts.noise_scheduler),
        "cpu",
        baseline.RecipeSettings(**settings),
    )


def test_baseline_trains_only_the_lora_of_the_attention_projections(bench_model: Path) -> None:
    recipe = _recipe(bench_model)
    unet = recipe.unet
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert {id(p) for p in recipe.lora_parameters} == {
        id(p) for g in recipe.optimizer.param_groups for p in g["params"]
    }
    assert all(p.dtype == torch.float32 for p in recipe.lora_parameters)
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert not recipe.scaler.is_enabled()  # bf16 on a CPU: no GradScaler
    losses = [recipe.step(*recipe.synthetic_batch(1, 64)) for _ in range(2)]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    after = dict(unet.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in lora.items())


def test_baseline_agrees_with_the_shared_reference(
    bench_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same weights, same batch: the two implementations take the same steps."""
    if baseline.reference_path() is None:
        pytest.skip("no shared sd15_lora_reference.py beside this clone (CI has ../shared)")
    ref = baseline.load_reference()
    theirs = load_components(str(bench_model), torch_dtype=torch.bfloat16, reuse=False)
    recorded: list[float] = []

    def mse_loss(*args, **kwargs):
        loss = torch.nn.functional.mse_loss(*args, **kwargs)
        recorded.append(loss.item())
        return loss

    # the reference builds its own random model; give it a copy of ours, and read its losses
    monkeypatch.setattr(
        ref, "build", lambda tiny, device: (theirs.unet, theirs.vae, theirs.text_encoder)
    )
    monkeypatch.setattr(ref, "F", types.SimpleNamespace(mse_loss=mse_loss))
    ref.reference_samples_per_s(
        batch_size=2, resolution=64, grad_ckpt=False, steps=3, warmup=0, tiny=True, device="cpu"
    )
    # the reference's schedule is DDPMScheduler's default (linear betas)
    # ... and it never clips (the diffusers recipe clips at --max_grad_norm 1.0): compare the
    # steps with clipping off, or a step whose gradient norm passes 1 tells them apart
    ours = _recipe(
        bench_model, scheduler=DDPMScheduler(num_train_timesteps=1000), max_grad_norm=None
    )
    batch = ours.synthetic_batch(2, 64)
    losses = [ours.step(*batch) for _ in range(3)]
    assert losses == pytest.approx(recorded, rel=1e-4)
    mine = {n: p for n, p in ours.unet.named_parameters() if "lora_" in n}
    other = {n: p for n, p in theirs.unet.named_parameters() if "lora_" in n}
    assert mine.keys() == other.keys()
    for name, param in mine.items():
        torch.testing.assert_close(param, other[name], rtol=1e-4, atol=1e-6, msg=name)
