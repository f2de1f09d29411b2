"""Compilation (``lightning_lora.training.compilation``).

A new LoRA on the same UNet (the warm worker's next job) does not recompile it, whole or
regional; regional compiles the repeated blocks only; the compile cache's portable artifacts let a
fresh cache folder skip Inductor's compile, and the module wires them in.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training import compilation
from lightning_lora.training.module import LoRAModule
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast

REPO = Path(__file__).resolve().parents[2]


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
