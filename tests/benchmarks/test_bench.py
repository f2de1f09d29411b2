"""The benchmark (a CPU smoke: fields and arithmetic, no speed claims) and the speed features.

* ``python -m benchmarks`` on the tiny model in a clone without the shared reference: the table
  and the JSON carry the right fields, the ratio is ours / baseline of the two measured values,
  the reference row says why it was skipped.
* The baseline (diffusers' recipe step) trains the LoRA only, and agrees with the shared
  reference step for step when that file is present (CI has ``../shared``).
* The device-side noise tables give bit-identical results to diffusers' ``add_noise``,
  ``get_velocity`` and ``compute_snr``.
* Compilation: a new LoRA on the same UNet (the warm worker's next job) does not recompile it,
  whole or regional; regional compiles the repeated blocks only; the compile cache's portable
  artifacts let a fresh cache folder skip Inductor's compile, and the module wires them in.
* Precision: run_info.json and the start log say the effective precision and the frozen weights'
  dtype; a bf16-capable GPU running 16-mixed is told the override.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import tomllib
import types
from importlib.metadata import entry_points
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hydra.utils import instantiate

from benchmarks import baseline, bench, models, report
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training import compilation
from lightning_lora.training.models import SD15_SCHEDULER, load_components
from lightning_lora.training.module import LoRAModule
from lightning_lora.training.precision import BF16_OVERRIDE, precision_info
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast

REPO = Path(__file__).resolve().parents[1]


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
    assert math.isfinite(base["final_loss"]) and base["precision"] == "bf16-mixed"
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
        {"case": "o4", "recipe": "ours", "batch_size": 4, "grad_ckpt": False,
         "samples_per_s": 25.0},
        {"case": "o8", "recipe": "ours", "batch_size": 8, "grad_ckpt": False,
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


# --------------------------------------------------------------------------- noise tables
def _table_holder(prediction_type: str) -> types.SimpleNamespace:
    sched = DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})
    holder = types.SimpleNamespace(noise_scheduler=sched, _noise_tables={})
    holder.noise_tables = types.MethodType(LoRAModule.noise_tables, holder)
    holder._coefficients = types.MethodType(LoRAModule._coefficients, holder)
    return holder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_noise_tables_match_diffusers_exactly(dtype: torch.dtype, autocast: bool) -> None:
    holder = _table_holder("v_prediction")
    sched = holder.noise_scheduler
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        latents = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        noise = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        timesteps = torch.randint(0, 1000, (8,), generator=gen)
        timesteps[:2] = torch.tensor([0, 999])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = (
                LoRAModule.add_noise(holder, latents, noise, timesteps),
                LoRAModule.velocity(holder, latents, noise, timesteps),
                LoRAModule.snr(holder, timesteps),
            )
            theirs = (
                sched.add_noise(latents, noise, timesteps),
                sched.get_velocity(latents, noise, timesteps),
                compute_snr(sched, timesteps),
            )
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
    # built once per dtype and reused (the SNR table is read from the float32 entry)
    assert len(holder._noise_tables) == (1 if dtype == torch.float32 else 2)


def test_noise_tables_follow_the_autocast_state() -> None:
    holder = _table_holder("epsilon")
    x = torch.randn(2, 4, 8, 8).bfloat16()
    t = torch.tensor([10, 500])
    LoRAModule.add_noise(holder, x, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LoRAModule.add_noise(holder, x, x, t)
    assert len(holder._noise_tables) == 2


# --------------------------------------------------------------------------- compilation
@pytest.fixture
def counting_compile(monkeypatch: pytest.MonkeyPatch):
    """``torch.compile`` with a counting backend (dynamo's guards and graphs, no Inductor)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, mode=None, **_: real_compile(model, backend=counter)
    )
    monkeypatch.setattr(compilation, "_COMPILED", {})
    torch._dynamo.reset()
    try:
        yield counter
    finally:
        torch._dynamo.reset()


_BATCH = {"latent_params": torch.randn(2, 8, 8, 8), "text_embeds": torch.randn(2, 77, 32)}


def _modules(cfg):
    components = instantiate(cfg.model)

    def new_module(seed: int) -> LoRAModule:
        return instantiate(cfg.module, _partial_=True)(
            components=components, lora=build_lora_configs(cfg.lora)[0], lora_seed=seed
        )

    return new_module


def _train_steps(module: LoRAModule, n: int = 2) -> None:
    for _ in range(n):
        module.training_loss(_BATCH).backward()


@pytest.mark.parametrize("mode", ["default", "regional"])
def test_a_new_lora_reuses_the_compiled_unet(make_cfg, counting_compile, mode: str) -> None:
    """The warm worker's next job (a fresh LoRA, same shapes) must not recompile the UNet."""
    new_module = _modules(make_cfg(f"module.compile_mode={mode}", "lora.dropout=0.0"))
    first = new_module(0)
    _train_steps(first)
    compiled = counting_compile.frame_count
    assert compiled >= 1
    second = new_module(1)
    assert second.unet is first.unet
    _train_steps(second)
    assert counting_compile.frame_count == compiled, "a new LoRA recompiled the UNet"


def _compiled_blocks(unet: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def test_regional_compile_compiles_the_repeated_blocks_only(make_cfg, counting_compile) -> None:
    cfg = make_cfg(
        "module.compile_mode=regional",
        "module.compile_extra_blocks=[ResnetBlock2D]",
        "lora.dropout=0.0",
    )
    new_module = _modules(cfg)
    module = new_module(0)
    unet = module.unet
    _train_steps(module)
    blocks = {
        name: sum(type(m).__name__ == name for m in unet.modules())
        for name in ("BasicTransformerBlock", "ResnetBlock2D")
    }
    assert all(blocks.values())
    assert _compiled_blocks(unet) == blocks  # every repeated block, nothing else (no whole UNet)
    assert compilation.compiled_unet(unet, "regional") is unet
    frames = counting_compile.frame_count
    assert frames >= 2  # one graph per block class (and shape), not one per block
    assert frames < sum(blocks.values())

    # the validation loss runs the UNet eagerly: no graphs for eval mode and its shapes
    latents, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    with torch.no_grad():
        module.diffusion_loss(
            latents, context, torch.randn_like(latents), torch.tensor([1, 2, 3]), compiled=False
        )
    assert counting_compile.frame_count == frames

    # a later run without regional compilation in the same process gets the eager blocks back
    eager = _modules(make_cfg("module.compile_mode=none", "lora.dropout=0.0"))(1)
    assert eager.unet is unet
    _train_steps(eager, 1)
    assert _compiled_blocks(unet) == {}
    assert counting_compile.frame_count == frames


def _restore_inductor_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    current = os.environ.get(compilation.INDUCTOR_CACHE_ENV)
    if current is None:
        monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, current)


@pytest.mark.skipif(not compilation.has_portable_artifacts(), reason="torch < 2.7")
def test_compile_artifacts_let_a_fresh_cache_folder_skip_the_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine B, handed only machine A's artifacts, finds every Inductor graph in its cache."""
    import os

    import torch._dynamo
    from torch._dynamo.utils import counters

    _restore_inductor_dir(monkeypatch)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def compile_in(cache: compilation.CompileCache) -> dict[str, int]:
        torch._dynamo.reset()
        counters.clear()
        cache.activate()
        torch.compile(model)(x).sum().backward()
        return dict(counters["inductor"])

    try:
        first = compilation.CompileCache(tmp_path / "machine-a")
        key = first.artifact_key("default", model, (x,))
        assert not first.load(key)  # nothing saved yet
        assert compile_in(first).get("fxgraph_cache_miss", 0) > 0
        saved = first.save()
        assert saved == first.artifact_path(key) and saved.stat().st_size > 0
        described = json.loads(saved.with_suffix(".json").read_text())
        assert described["inputs"] == [[[4, 8], "torch.float32", True]]
        assert described["torch"] == torch.__version__ and described["mode"] == "default"

        second = compilation.CompileCache(tmp_path / "machine-b")
        shutil.copytree(first.artifacts_dir, second.artifacts_dir)
        assert second.artifact_key("default", model, (torch.randn(2, 8),)) != key  # shapes
        assert second.artifact_key("default", model, (x,)) == key
        assert second.load(key)
        stats = compile_in(second)
        assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(second.inductor_dir)
        assert stats.get("fxgraph_cache_hit", 0) > 0 and stats.get("fxgraph_cache_miss", 0) == 0

        # the control: a fresh folder without the artifacts compiles again
        third = compilation.CompileCache(tmp_path / "machine-c")
        assert compile_in(third).get("fxgraph_cache_miss", 0) > 0
    finally:
        torch._dynamo.reset()


_KEY_SCRIPT = """
import torch
from peft import LoraConfig
from lightning_lora.training.compilation import CompileCache
model = torch.nn.Linear(4, 4)
targets = ["to_q", "to_k", "to_v", "to_out.0"]
model.peft_config = {"default": LoraConfig(r=4, target_modules=targets)}
print(CompileCache("unused").artifact_key("default", model, (torch.randn(2, 4),)))
"""


def test_the_artifact_key_is_the_same_in_every_process() -> None:
    """Another process (another string-hash seed: another set order) finds the same file."""
    import os
    import subprocess
    import sys

    keys = {
        subprocess.run(
            [sys.executable, "-c", _KEY_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(keys) == 1 and next(iter(keys)).startswith("default-")


def test_the_module_loads_artifacts_before_compiling_and_saves_them_after(
    make_cfg, counting_compile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _restore_inductor_dir(monkeypatch)
    loads: list[tuple[bytes, int]] = []

    def load(blob: bytes) -> None:
        loads.append((blob, counting_compile.frame_count))

    saves: list[int] = []

    def save() -> tuple[bytes, types.SimpleNamespace]:
        saves.append(counting_compile.frame_count)
        return b"compiled graphs", types.SimpleNamespace()

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    cache_dir = tmp_path / "fleet-cache"
    cfg = make_cfg(
        "module.compile_mode=default", f"module.compile_cache_dir={cache_dir}", "lora.dropout=0.0"
    )
    result = train(cfg)
    assert result.metrics["steps"] > 0
    import os

    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(cache_dir / "inductor")
    (artifact,) = (cache_dir / "artifacts").glob("default-*.bin")
    assert artifact.read_bytes() == b"compiled graphs"
    described = json.loads(artifact.with_suffix(".json").read_text())
    assert described["inputs"][0][0] == [4, 4, 8, 8]  # the noisy latents of a batch of 4
    assert loads == []  # the first process found nothing to load
    # saved once, after the first step had compiled; nothing new to save at the end
    assert len(saves) == 1 and saves[0] >= 1

    # the next process (here: a fresh process state) loads them first
    monkeypatch.setattr(compilation, "_LOADED", set())
    monkeypatch.setattr(compilation, "_COMPILED", {})
    torch._dynamo.reset()
    counting_compile.frame_count = 0
    new_module = _modules(cfg)
    batch = {k: v[:1].repeat(4, *[1] * (v.ndim - 1)) for k, v in _BATCH.items()}
    new_module(1).training_loss(batch)
    assert loads == [(b"compiled graphs", 0)]  # before any graph was compiled
    assert counting_compile.frame_count >= 1
    new_module(2).training_loss(batch)  # the warm worker's next job: loaded already
    assert len(loads) == 1


# --------------------------------------------------------------------------- fused AdamW + clipping
class _GradNorms(L.Callback):
    """Total gradient norm after the step (clipped; zeroed only in the next step's closure)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_fused_adamw_is_clipped_under_bf16(make_cfg) -> None:
    """Lightning refuses to clip for fused optimizers under AMP; without a scaler it is exact."""
    norms = _GradNorms()
    cfg = make_cfg(
        "trainer.precision=bf16-mixed",
        "module.optimizer.fused=true",
        "trainer.gradient_clip_val=0.001",
        "trainer.max_epochs=1",
    )
    result = train(cfg, callbacks=[norms])
    assert result.metrics["steps"] == 2
    assert norms.norms and max(norms.norms) <= 0.001 * (1 + 1e-3)


# --------------------------------------------------------------------------- precision
def test_run_info_records_the_effective_precision(make_cfg, caplog) -> None:
    """16-mixed on a CPU is Lightning's bf16-mixed: that, and bf16 frozen weights, are recorded."""
    cfg = make_cfg("trainer.precision=16-mixed", "trainer.max_epochs=1")
    with caplog.at_level(logging.INFO, logger="lightning_lora.training.run"):
        result = train(cfg)
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["precision"] == "bf16-mixed" and info["requested_precision"] == "16-mixed"
    assert info["frozen_weight_dtype"] == "bfloat16" and info["lora_parameter_dtype"] == "float32"
    assert info["accelerator"] == "cpu" and "precision_hint" not in info
    assert info["versions"]["torch"] != "unknown"
    started = [m for m in caplog.messages if m.startswith("precision ")]
    assert started == [
        "precision bf16-mixed (requested 16-mixed) on cpu: frozen weights bfloat16, "
        "LoRA parameters float32"
    ]


def test_a_bf16_gpu_running_16_mixed_is_told_the_override() -> None:
    hint = precision_info("16-mixed", "cuda", bf16_supported=True)
    assert hint["frozen_weight_dtype"] == "float16"
    assert (
        BF16_OVERRIDE == "trainer.precision=bf16-mixed" and BF16_OVERRIDE in hint["precision_hint"]
    )
    assert "precision_hint" not in precision_info("16-mixed", "cuda", bf16_supported=False)
    assert "precision_hint" not in precision_info("bf16-mixed", "cuda", bf16_supported=True)
    assert "precision_hint" not in precision_info("bf16-mixed", "cpu")
