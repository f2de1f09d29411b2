"""The benchmark (a CPU smoke: fields and arithmetic, no speed claims) and the speed changes.

* ``lightning-lora-bench`` on the tiny model: the table and the JSON carry the right fields, the
  numbers are positive and finite, the ratio is ours / reference of the two measured values.
* The device-side noise tables give bit-identical results to diffusers' ``add_noise``,
  ``get_velocity`` and ``compute_snr``.
* A new LoRA on the same UNet (the warm worker's next job) does not recompile it.
"""

from __future__ import annotations

import json
import math
import types
from importlib.metadata import entry_points
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hydra.utils import instantiate

from lightning_lora import bench
from lightning_lora.models import _SD15_SCHEDULER
from lightning_lora.module import LoRAModule
from lightning_lora.train import train


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_cpu_smoke(tmp_path: Path, ll_cache: Path) -> None:
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    code = bench.main(
        [
            "--tiny",
            "--case",
            "ref:1",
            "--case",
            "ours:1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--peak-tflops",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--model-dir",
            str(ll_cache / "bench-tiny-model"),
            "--json",
            str(out),
            "--table",
            str(table),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["resolution"] == 64
    assert Path(meta["reference"]).name == "sd15_lora_reference.py"
    assert meta["versions"]["torch"] != "unknown"
    assert meta["attention_processors"] == {"AttnProcessor2_0": 32}  # SDPA in every attention

    ref, ours = doc["results"]
    assert ref["recipe"] == "reference" and ours["recipe"] == "ours"
    for row in (ref, ours):
        assert "error" not in row, row.get("error")
        for key in ("step_s", "samples_per_s", "tflop_per_sample", "achieved_tflops", "mfu"):
            assert _positive(row[key]), (row["case"], key, row[key])
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert ours["ratio_to_reference"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])
    assert ours["reference_case"] == ref["case"]
    assert _positive(ours["prepare_s"]) and _positive(ours["run_wall_s"])
    assert ours["steps_run"] == 2  # warm-up + timed (no sync audit on CPU)

    text = table.read_text()
    header = text.splitlines()[0]
    for column in bench.TABLE_COLUMNS:
        assert column in header
    assert ref["case"] in text and ours["case"] in text
    assert f"{ours['ratio_to_reference']:.2f}x" in text


def test_console_script_is_declared() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lightning-lora-bench") == "lightning_lora.bench:main"


def test_reference_is_found_beside_the_repo_or_through_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(bench.REFERENCE_ENV, raising=False)
    default = bench.reference_path()
    assert default.parent.name == "bench" and default.parent.parent.name == "shared"
    copy = tmp_path / "elsewhere" / bench.REFERENCE_FILE
    copy.parent.mkdir()
    copy.write_bytes(default.read_bytes())
    monkeypatch.setenv(bench.REFERENCE_ENV, str(copy.parent))
    assert bench.reference_path() == copy.resolve()
    monkeypatch.setenv(bench.REFERENCE_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LIGHTNING_LORA_REFERENCE"):
        bench.reference_path()


def test_case_specs() -> None:
    assert bench.parse_case("ref:4:gc") == bench.Case("reference", 4, grad_ckpt=True)
    case = bench.parse_case("ours:16:default:16-mixed")
    assert (case.batch_size, case.compile_mode, case.precision) == (16, "default", "16-mixed")
    job = bench.parse_case("job:4:reduce-overhead:images=20:epochs=100:nockpt")
    assert (job.images, job.epochs, job.checkpoints) == (20, 100, False)
    with pytest.raises(ValueError, match="bad option"):
        bench.parse_case("ours:4:fast")


def test_ratio_and_mfu_use_the_measured_values() -> None:
    rows = [
        {"case": "r4", "recipe": "reference", "batch_size": 4, "grad_ckpt": True,
         "samples_per_s": 10.0},
        {"case": "o4", "recipe": "ours", "batch_size": 4, "grad_ckpt": False,
         "samples_per_s": 25.0},
        {"case": "o8", "recipe": "ours", "batch_size": 8, "grad_ckpt": False,
         "samples_per_s": 40.0},
    ]  # fmt: skip
    bench.attach_ratios(rows)
    bench.attach_mfu(rows, flops=2e12, peak_tflops=100.0)
    assert rows[1]["ratio_to_reference"] == pytest.approx(2.5)
    assert rows[1]["reference_case"] == "r4"
    assert rows[2]["ratio_to_reference"] is None  # no reference at batch 8
    assert rows[1]["mfu"] == pytest.approx(25.0 * 2.0 / 100.0)


# --------------------------------------------------------------------------- noise tables
def _table_holder(prediction_type: str) -> types.SimpleNamespace:
    sched = DDPMScheduler(**{**_SD15_SCHEDULER, "prediction_type": prediction_type})
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


# --------------------------------------------------------------------------- compile reuse
def test_a_new_lora_reuses_the_compiled_unet(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm worker's next job (a fresh LoRA, same shapes) must not recompile the UNet.

    Dynamo's guards are what decide a recompile; they are checked here with a counting backend
    (no Inductor code generation, so it runs on a CPU in seconds).
    """
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from lightning_lora import module as module_mod

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, mode=None, **_: real_compile(model, backend=counter)
    )
    monkeypatch.setattr(module_mod, "_COMPILED", {})
    torch._dynamo.reset()
    try:
        cfg = make_cfg("module.compile_mode=default", "lora.dropout=0.0")
        components = instantiate(cfg.model)

        def new_module(seed: int) -> LoRAModule:
            return instantiate(cfg.module, _partial_=True)(
                components=components, lora=instantiate(cfg.lora), lora_seed=seed
            )

        batch = {"latent_params": torch.randn(2, 8, 8, 8), "text_embeds": torch.randn(2, 77, 32)}

        def train_steps(module: LoRAModule, n: int = 2) -> None:
            for _ in range(n):
                module.training_loss(batch).backward()

        first = new_module(0)
        train_steps(first)
        compiled = counter.frame_count
        assert compiled >= 1
        second = new_module(1)
        assert second.unet is first.unet
        train_steps(second)
        assert counter.frame_count == compiled, "a new LoRA recompiled the UNet"
    finally:
        torch._dynamo.reset()


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
