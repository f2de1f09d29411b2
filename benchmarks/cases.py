"""Benchmark cases: what one row of the table runs, and the ``recipe:batch[:option...]`` specs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from lightning_lora.training.compilation import COMPILE_MODES

#: Recipes: the project's own implementation of diffusers' recipe (``baseline``, the default
#: column), the shared reference file (``reference``, a cross-check when present), our training
#: step (``ours``) and a whole warm-worker job (``job``).
RECIPES = ("baseline", "reference", "ours", "job")
ALIASES = {"base": "baseline", "ref": "reference"}
#: The recipes that run diffusers' step rather than ours.
BASELINES = ("baseline", "reference")
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "32", "bf16-true")
#: The precision the shared reference always runs at (it takes no precision argument).
REFERENCE_PRECISION = {"cuda": "16-mixed", "cpu": "bf16-mixed"}


def effective_precision(precision: str, device: str) -> str:
    """What a precision setting runs as on ``device``.

    Lightning runs ``16-mixed`` as bf16 on a CPU (no fp16 autocast there); ``32`` is ``32-true``.
    """
    if precision == "32":
        return "32-true"
    if precision == "16-mixed" and device != "cuda":
        return "bf16-mixed"
    return precision


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        recipe: ``baseline``, ``reference``, ``ours`` (timed steps) or ``job`` (a whole job).
        batch_size: Samples per step.
        grad_ckpt: Gradient checkpointing of the UNet.
        compile_mode: ``module.compile_mode`` of ours and job (``regional`` included).
        precision: Lightning precision of ours and job; the baseline runs the recipe at the
            same precision (``--mixed_precision fp16``/``bf16``/``no``), so a pair differs only
            in the trainer. The shared reference always runs at :data:`REFERENCE_PRECISION`.
        images: Training images of a job.
        epochs: Epochs of a job.
        checkpoints: Whether a job keeps the default per-epoch Lightning checkpoints.
        extra_blocks: ``module.compile_extra_blocks`` of a ``regional`` case (block classes
            compiled besides the ones diffusers declares), e.g. ``("ResnetBlock2D",)``.
    """

    recipe: str
    batch_size: int
    grad_ckpt: bool = False
    compile_mode: str = "none"
    precision: str = "bf16-mixed"
    images: int = 20
    epochs: int = 100
    checkpoints: bool = True
    extra_blocks: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Short spec-like name, e.g. ``ours:b4:gc:reduce-overhead:bf16-mixed``."""
        parts = [self.recipe, f"b{self.batch_size}", "gc" if self.grad_ckpt else "nogc"]
        if self.recipe not in BASELINES:
            parts.append("+".join([self.compile_mode, *self.extra_blocks]))
        if self.recipe != "reference":
            parts.append(self.precision)
        if self.recipe == "job":
            parts += [f"{self.images}img", f"{self.epochs}ep"]
            parts += [] if self.checkpoints else ["nockpt"]
        return ":".join(parts)


def parse_case(spec: str, precision: str = "bf16-mixed") -> Case:
    """Parse ``recipe:batch[:option...]``.

    Options: ``gc``/``nogc``, a compile mode (``none``, ``default``, ``reduce-overhead``,
    ``max-autotune``, ``regional``), ``blocks=A,B`` (more block classes for ``regional``), a
    precision (``bf16-mixed``, ``16-mixed``, ``32-true``), and for jobs ``images=N``, ``epochs=N``
    and ``nockpt``. ``base`` is short for ``baseline``, ``ref`` for ``reference``.

    Args:
        spec: The case, e.g. ``base:4:gc``, ``ours:16:regional``, ``job:4:default:nockpt``.
        precision: Precision when the spec names none.

    Returns:
        The case.

    Raises:
        ValueError: On an unknown recipe or option.
    """
    head, *options = spec.strip().split(":")
    recipe = ALIASES.get(head, head)
    if recipe not in RECIPES or not options:
        raise ValueError(f"bad case {spec!r}: expected {'|'.join(RECIPES)}:BATCH[:options]")
    fields: dict[str, Any] = {"recipe": recipe, "batch_size": int(options[0])}
    fields["precision"] = precision
    for opt in options[1:]:
        if opt in ("gc", "nogc"):
            fields["grad_ckpt"] = opt == "gc"
        elif opt in COMPILE_MODES:
            fields["compile_mode"] = opt
        elif opt in PRECISIONS:
            fields["precision"] = opt
        elif opt == "nockpt":
            fields["checkpoints"] = False
        elif re.fullmatch(r"blocks=\w+(,\w+)*", opt):
            fields["extra_blocks"] = tuple(opt.split("=", 1)[1].split(","))
        elif re.fullmatch(r"(images|epochs)=\d+", opt):
            key, value = opt.split("=")
            fields[key] = int(value)
        else:
            raise ValueError(f"bad option {opt!r} in case {spec!r}")
    return Case(**fields)


def grid_cases(
    batch_sizes: Sequence[int],
    grad_ckpt: Sequence[bool],
    compile_modes: Sequence[str],
    precisions: Sequence[str],
    baselines: Sequence[str] = ("baseline",),
) -> list[Case]:
    """The baseline rows first (one per batch size, grad-ckpt setting and precision), then ours.

    Every ``ours`` row without compilation has its baseline: the same batch, gradient
    checkpointing and precision.

    Args:
        batch_sizes: Batch sizes.
        grad_ckpt: Gradient checkpointing settings.
        compile_modes: Compile modes of ours.
        precisions: Precisions of ours.
        baselines: Which baselines run (``baseline``, ``reference``, both or none).

    Returns:
        The cases in run order.
    """
    cases = [
        Case(r, b, g, precision=p)
        for r in baselines
        for b in batch_sizes
        for g in grad_ckpt
        for p in (precisions if r == "baseline" else precisions[:1])
    ]
    for b in batch_sizes:
        for g in grad_ckpt:
            for mode in compile_modes:
                cases += [Case("ours", b, g, mode, p) for p in precisions]
    return cases
