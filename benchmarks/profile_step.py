"""Where a training step's time goes: our Lightning step against the plain recipe loop.

Run from the repository root (CPU, the tiny model)::

    python benchmarks/profile_step.py --batch 2 --steps 20 --warmup 5 --json profile.json

Both steps run on the same tiny SD1.5-shaped model, batch, resolution, precision and gradient
checkpointing, one after the other in this process. ``torch.profiler`` records ``--steps`` steps of
each after ``--warmup``; the parts are ranges this script wraps around the methods that do them
(``record_function``: nothing in the package is changed for it), and each part's time is its
range's total, averaged per step:

* ours: ``unet`` (the UNet's forward), ``training_step`` (the loss, around the UNet), ``backward``,
  ``optimizer`` (AdamW's own update, without the closure it runs first), ``clip``, ``zero_grad``,
  ``callbacks`` (every callback's batch hooks), ``logging`` (``LightningModule.log``), and
  ``lightning`` = the step's wall time less all of those (the fit loop, the closure, hooks,
  fetching the batch);
* the recipe (``benchmarks.baseline.DiffusersLoRAStep``): ``vae`` and ``text_encoder`` (it encodes
  every step; ours reads cached latents and embeddings), ``unet``, ``backward``, ``clip``,
  ``optimizer``, ``zero_grad``, and ``loop`` = the rest (noise, timesteps, the loss).

Host reads (on a GPU, each is a sync that waits for the device): the calls per step that read a
tensor's value on the host (``item``, ``tolist``, ``cpu``, ``float()``, ``bool()``...) outside the
models' forward and backward (whose own reads are the same on both sides: shape checks in
diffusers and torch), counted with a ``TorchFunctionMode`` in a second, untimed pass: the mode
sees every torch call and would slow the timed one. Not a timed test: the figures go to
``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks import baseline  # noqa: E402
from benchmarks.models import build_model_folder  # noqa: E402
from benchmarks.runner import NO_CHECKPOINTS, RECIPE_LORA  # noqa: E402

#: Tensor methods that copy a value to the host (a device sync on a GPU).
HOST_READS = frozenset(
    {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
)


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host, by the package that made them.

    Args:
        sites: Also count them by ``file:line`` of the caller (``--sites``), to find each one.
    """

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] | None = Counter() if sites else None
        self.on = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if self.on and name in HOST_READS:
            frame = _caller_frame()
            self.counts[f"{_package(frame)}:{name}"] += 1
            if self.sites is not None and frame is not None:
                site = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}:{name}"
                self.sites[site] += 1
        return func(*args, **(kwargs or {}))


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    return path.split("site-packages/", 1)[-1] if "site-packages/" in path else path


def _caller_frame() -> Any:
    """The first frame outside torch's dispatch."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not any(part in path for part in ("torch/overrides", "torch/_tensor", "torch/utils/")):
            break
        frame = frame.f_back
    return frame


def _package(frame: Any) -> str:
    """The package of a frame (``torch.optim``, ``lightning``, ``lightning_lora``...)."""
    if frame is None:
        return "?"
    path = frame.f_code.co_filename.replace("\\", "/")
    if "/lightning_lora/" in path:
        return "lightning_lora"
    if "site-packages/" in path:
        parts = path.split("site-packages/", 1)[1].split("/")
        return ".".join(parts[:2]) if parts[0] == "torch" else parts[0]
    return Path(path).stem


@contextlib.contextmanager
def _wrapped(obj: Any, attr: str, label: str, quiet: HostReads | None = None) -> Iterator[None]:
    """Run ``obj.attr`` inside ``record_function(label)`` for the duration.

    With ``quiet``, host reads inside it are not counted (the models' own).
    """
    original = getattr(obj, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        was = quiet.on if quiet is not None else False
        if quiet is not None:
            quiet.on = False
        try:
            with record_function(label):
                return original(*args, **kwargs)
        finally:
            if quiet is not None:
                quiet.on = was

    setattr(obj, attr, timed)
    try:
        yield
    finally:
        setattr(obj, attr, original)


def _parts(prof: Any, labels: list[str], steps: int) -> dict[str, float]:
    """Each label's total time per step (ms) from a profile."""
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    return {label: totals.get(label, 0.0) / 1000.0 / steps for label in labels}


class _Window(L.Callback):
    """Profiles ``steps`` training steps after ``warmup``, or counts their host reads."""

    def __init__(self, warmup: int, steps: int, reads: HostReads | None = None) -> None:
        self.warmup, self.steps, self.reads = warmup, steps, reads
        self.prof: Any = None
        self.wall = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.warmup:
            return
        if self.reads is not None:
            self.reads.on = True
            return
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.warmup + self.steps:
            return
        if self.reads is not None:
            self.reads.on = False
        elif self.prof is not None:
            self.wall = time.perf_counter() - self._start
            self.prof.__exit__(None, None, None)


def profile_ours(
    model: Path,
    images: Path,
    batch: int,
    grad_ckpt: bool,
    precision: str,
    warmup: int,
    steps: int,
    sites: bool = False,
) -> dict[str, Any]:
    """Profile our real ``train(cfg)`` step (the bench's overrides, no checkpoints)."""
    from lightning_lora.config import compose_config
    from lightning_lora.training.module import LoRAModule
    from lightning_lora.training.run import train

    overrides = [
        "trainer=cpu",
        f"model.pretrained_model_name_or_path={model}",
        f"data.image_dir={images}",
        "data.resolution=64",
        f"data.batch_size={batch}",
        f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false",
        f"module.gradient_checkpointing={str(grad_ckpt).lower()}",
        f"++trainer.max_steps={warmup + steps}",
        "trainer.max_epochs=100000",
        "validation.every_n_epochs=100000",
        *NO_CHECKPOINTS,
        *RECIPE_LORA,
        "seed=0",
    ]

    def run(window: _Window, reads: HostReads | None) -> None:
        cfg = compose_config(overrides, output_dir=REPO / ".profile" / f"ours-b{batch}")
        with contextlib.ExitStack() as stack:
            stack.enter_context(_wrapped(LoRAModule, "training_step", "training_step"))
            stack.enter_context(_wrapped(LoRAModule, "backward", "backward", reads))
            stack.enter_context(_wrapped(LoRAModule, "log", "logging"))
            stack.enter_context(_wrapped(LoRAModule, "clip_gradients", "clip"))
            stack.enter_context(_wrapped(torch.optim.AdamW, "zero_grad", "zero_grad"))
            stack.enter_context(_unet_range(LoRAModule, reads))
            stack.enter_context(_callback_ranges())
            if reads is not None:
                stack.enter_context(reads)
            train(cfg, callbacks=[window])

    timed = _Window(warmup, steps)
    run(timed, None)
    reads = HostReads(sites)
    run(_Window(warmup, steps, reads), reads)
    labels = ["training_step", "unet", "backward", "clip", "zero_grad", "callbacks", "logging"]
    parts = _parts(timed.prof, [*labels, "Optimizer.step#AdamW.step"], steps)
    step_ms = 1000.0 * timed.wall / steps
    # AdamW.step runs Lightning's closure (training_step, backward, zero_grad) before updating
    closure = parts["training_step"] + parts["backward"] + parts["zero_grad"]
    parts["optimizer"] = max(0.0, parts.pop("Optimizer.step#AdamW.step") - closure)
    inside = parts["training_step"] + parts["backward"] + parts["clip"] + parts["zero_grad"]
    parts["lightning"] = step_ms - inside - parts["optimizer"] - parts["callbacks"]
    return {"step_ms": step_ms, "parts_ms": parts, **_per_step(reads, steps)}


@contextlib.contextmanager
def _unet_range(module_cls: Any, reads: HostReads | None) -> Iterator[None]:
    """A ``unet`` range around every UNet forward of the module's step."""
    original = module_cls.diffusion_loss

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _wrapped(self.unet, "forward", "unet", reads):
            return original(self, *args, **kwargs)

    module_cls.diffusion_loss = timed
    try:
        yield
    finally:
        module_cls.diffusion_loss = original


@contextlib.contextmanager
def _callback_ranges() -> Iterator[None]:
    """A ``callbacks`` range around every callback's batch hooks."""
    from lightning.pytorch.trainer import call

    original = call._call_callback_hooks

    def timed(trainer: Any, hook_name: str, *args: Any, **kwargs: Any) -> Any:
        if hook_name in ("on_train_batch_start", "on_train_batch_end"):
            with record_function("callbacks"):
                return original(trainer, hook_name, *args, **kwargs)
        return original(trainer, hook_name, *args, **kwargs)

    call._call_callback_hooks = timed
    try:
        yield
    finally:
        call._call_callback_hooks = original


def _per_step(reads: HostReads, steps: int) -> dict[str, Any]:
    """``host_reads_per_step`` (by package), and ``host_read_sites`` (by line) with ``--sites``."""
    out: dict[str, Any] = {
        "host_reads_per_step": {name: n / steps for name, n in sorted(reads.counts.items())}
    }
    if reads.sites is not None:
        out["host_read_sites"] = {site: n / steps for site, n in reads.sites.most_common()}
    return out


def profile_recipe(
    model: Path,
    batch: int,
    grad_ckpt: bool,
    precision: str,
    warmup: int,
    steps: int,
    sites: bool = False,
) -> dict[str, Any]:
    """Profile the recipe's step (``DiffusersLoRAStep``) on the same model and batch."""
    from lightning_lora.training.models import load_components

    settings = baseline.RecipeSettings(
        gradient_checkpointing=grad_ckpt,
        mixed_precision=baseline.recipe_precision(precision, "cpu"),
    )
    components = load_components(
        str(model), torch_dtype=settings.weight_dtype(torch.device("cpu")), reuse=False
    )
    torch.manual_seed(0)
    step = baseline.DiffusersLoRAStep(
        components.unet,
        components.vae,
        components.text_encoder,
        components.noise_scheduler,
        "cpu",
        settings,
    )
    pixels, ids = step.synthetic_batch(batch, 64, components.tokenizer.model_max_length)
    for _ in range(warmup):
        step.step(pixels, ids)

    def run(reads: HostReads | None) -> Any:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_wrapped(step.vae, "encode", "vae", reads))
            stack.enter_context(_wrapped(step.text_encoder, "forward", "text_encoder", reads))
            stack.enter_context(_wrapped(step.unet, "forward", "unet", reads))
            stack.enter_context(_wrapped(torch.Tensor, "backward", "backward", reads))
            stack.enter_context(_wrapped(torch.nn.utils, "clip_grad_norm_", "clip"))
            stack.enter_context(_wrapped(step.optimizer, "zero_grad", "zero_grad"))
            if reads is not None:
                stack.enter_context(reads)
                reads.on = True
                for _ in range(steps):
                    step.step(pixels, ids)
                reads.on = False
                return None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    step.step(pixels, ids)
                return prof, time.perf_counter() - start

    prof, wall = run(None)
    reads = HostReads(sites)
    run(reads)
    labels = ["vae", "text_encoder", "unet", "backward", "clip", "zero_grad"]
    parts = _parts(prof, [*labels, "Optimizer.step#AdamW.step"], steps)
    parts["optimizer"] = parts.pop("Optimizer.step#AdamW.step")
    step_ms = 1000.0 * wall / steps
    parts["loop"] = step_ms - sum(parts.values())
    return {"step_ms": step_ms, "parts_ms": parts, **_per_step(reads, steps)}


def main(argv: list[str] | None = None) -> int:
    """Profile both steps; print a table; ``--json`` writes the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sites", action="store_true", help="also count host reads by line")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    work = REPO / ".profile"
    work.mkdir(exist_ok=True)
    model = build_model_folder(work / "tiny-model", tiny=True, dtype=torch.float32, device="cpu")
    from lightning_lora.demo.images import make_demo_images

    images = make_demo_images(work / "images", count=args.batch * 5, size=64)
    common = (args.batch, args.gc, args.precision, args.warmup, args.steps, args.sites)
    recipe = profile_recipe(model, *common)
    ours = profile_ours(model, images, *common)
    doc = {
        "batch": args.batch,
        "grad_ckpt": args.gc,
        "precision": args.precision,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "ours": ours,
        "recipe": recipe,
    }
    for name, side in (("ours", ours), ("recipe", recipe)):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in side["parts_ms"].items())
        print(
            f"{name}: {side['step_ms']:.1f} ms/step ({parts}); host reads "
            f"{side['host_reads_per_step']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
