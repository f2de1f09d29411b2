"""LoRA surgery on kohya-format state dicts: resize, merge and extract by SVD.

A kohya LoRA (what :mod:`lightning_lora.lora.kohya` writes, and what A1111, ComfyUI and kohya's
sd-scripts read) keeps, per module stem (``lora_unet_<diffusers name with _>`` or
``lora_te_<text encoder name with _>``)::

    <stem>.lora_down.weight   (r, in) for a Linear, (r, in, kh, kw) for a Conv2d
    <stem>.lora_up.weight     (out, r) or (out, r, 1, 1)
    <stem>.alpha              scalar (absent: alpha = r)

and the module's weight changes by ``(up.flatten(1) @ down.flatten(1)).reshape(weight.shape) *
alpha / r``. Every operation here goes through that full delta (:func:`module_delta`, the one
place it is computed) and factors it again with a truncated SVD (:func:`low_rank`), or, for the
exact merge, stacks the factors. A written file has one alpha for all modules, the largest rank
(:func:`kohya_state`, for diffusers' loader); ranks may differ per module. Everything runs on
CPU; the SVD in float64, the results in float32. No model loading and no files: the
``lightning-lora-tools`` CLI (:mod:`lightning_lora.tools.lora_tools`) does that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_lora.lora.lycoris import is_lycoris_key, lycoris_delta
from lightning_lora.version import __version__

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
#: The key suffixes of a kohya LoRA/LoCon module.
SUFFIXES = (DOWN, UP, ALPHA)
#: Key fragments of formats these tools do not factor (LyCORIS LoHa/LoKr, LoCon's Tucker mid).
UNSUPPORTED = ("hada_", "lokr_", "lora_mid", "dora_scale", ".diff", ".diff_b", ".on_input")
#: ``ss_network_dim`` / ``ss_network_alpha`` when the modules' ranks differ (as kohya writes).
DYNAMIC = "Dynamic"
#: The metadata entry that records what the tools did.
TOOL_KEY = "lightning_lora_tool"
#: diffusers builds the adapter from this metadata entry when present: stale after surgery.
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"


class UnsupportedLoraError(ValueError):
    """A file holds keys these tools cannot work on (LoHa, LoKr, Tucker, non-kohya names)."""


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module.

    Attributes:
        stem: The kohya module stem.
        rank: The module's rank in the output.
        share: The kept share of the delta's spectrum (Frobenius energy, 1.0 = exact).
        old_rank: The module's rank before (``None`` when it had none: extract, merge).
        note: Anything worth saying (a rank above the current one, a module in some inputs only).
    """

    stem: str
    rank: int
    share: float
    old_rank: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Factors:
    """A low-rank factoring of a delta in kohya shapes (alpha = rank, so scale 1).

    Attributes:
        down: ``(r, in)`` or ``(r, in, kh, kw)``.
        up: ``(out, r)`` or ``(out, r, 1, 1)``.
        share: The kept share of the delta's squared singular values.
    """

    down: torch.Tensor
    up: torch.Tensor
    share: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def state(self, stem: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
        """The module's three kohya tensors, the same delta at any ``alpha``.

        Args:
            stem: The module stem.
            alpha: The ``.alpha`` to write (default the rank: scale 1); the factors are scaled
                by ``sqrt(rank / alpha)`` each so that ``up @ down * alpha / rank`` is unchanged.
        """
        alpha = float(self.rank) if alpha is None else float(alpha)
        factor = math.sqrt(self.rank / alpha)
        return {
            stem + DOWN: (self.down * factor).contiguous(),
            stem + UP: (self.up * factor).contiguous(),
            stem + ALPHA: torch.tensor(alpha),
        }


def kohya_state(modules: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
    """The kohya tensors of factored modules, all with one alpha: the largest rank.

    One alpha per file, not alpha = rank per module: diffusers' kohya loader
    (``get_peft_kwargs``) builds a PEFT ``alpha_pattern`` from alphas that differ between modules
    with keys that match no module, so every module whose alpha is not the most common one would
    load at the wrong scale. With a single alpha each module's factors carry its
    ``sqrt(rank / alpha)`` instead, which every kohya loader reads the same way.

    Args:
        modules: Stem -> its factors (scale 1).

    Returns:
        ``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors.
    """
    alpha = max((f.rank for f in modules.values()), default=1)
    out: dict[str, torch.Tensor] = {}
    for stem, factors in modules.items():
        out.update(factors.state(stem, alpha))
    return out


def check_supported(state: Mapping[str, torch.Tensor], lycoris: bool = False) -> None:
    """Raise on keys that are not kohya LoRA/LoCon (``lora_down``/``lora_up``/``alpha``).

    Args:
        state: The file's tensors.
        lycoris: Let LoHa/LoKr keys through (``bake`` applies them).

    Raises:
        UnsupportedLoraError: Naming the first offending key.
    """
    for key in sorted(state):
        if lycoris and is_lycoris_key(key):
            continue  # bake applies LoHa/LoKr modules (lycoris.lycoris_delta)
        if any(fragment in key for fragment in UNSUPPORTED):
            raise UnsupportedLoraError(
                f"{key!r}: a LyCORIS (LoHa/LoKr/Tucker/DoRA) key; these tools take kohya LoRA/LoCon"
                " files (lora_down/lora_up/alpha). To resize or merge a LoHa/LoKr, bake it into"
                " the base model with its own tool and extract a LoRA from the result"
                " (lightning-lora-tools extract)"
            )
        if not key.endswith(SUFFIXES):
            raise UnsupportedLoraError(
                f"{key!r}: not a kohya LoRA key (<stem>.lora_down.weight, .lora_up.weight,"
                " .alpha); diffusers/PEFT-format files are not supported by these tools"
            )


def group_modules(
    state: Mapping[str, torch.Tensor], lycoris: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module stem.

    Args:
        state: kohya LoRA tensors.
        lycoris: Take LoHa/LoKr modules too (their tensors under ``.<name>``; bake only).

    Returns:
        ``{stem: {".lora_down.weight": t, ".lora_up.weight": t, ".alpha": t?}}``, sorted by stem.

    Raises:
        UnsupportedLoraError: Unsupported keys, or a module without its down or up matrix.
    """
    check_supported(state, lycoris=lycoris)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        stem, name = key.split(".", 1)
        suffix = next((s for s in SUFFIXES if key.endswith(s)), f".{name}")
        modules.setdefault(stem, {})[suffix] = state[key]
    for stem, parts in modules.items():
        if any(is_lycoris_key(k) for k in parts):
            continue
        missing = [s for s in (DOWN, UP) if s not in parts]
        if missing:
            raise UnsupportedLoraError(f"module {stem!r} has no {stem}{missing[0]}")
    return modules


def module_rank(parts: Mapping[str, torch.Tensor]) -> int:
    """The rank of one module (rows of its down matrix)."""
    return int(parts[DOWN].shape[0])


def module_scale(parts: Mapping[str, torch.Tensor]) -> float:
    """``alpha / rank`` of one module (alpha absent: 1)."""
    rank = module_rank(parts)
    alpha = float(parts[ALPHA]) if ALPHA in parts else float(rank)
    return alpha / rank


def module_delta(
    stem: str, parts: Mapping[str, torch.Tensor], shape: Sequence[int] | None = None
) -> torch.Tensor:
    """The change one module makes to its weight (alpha/rank included), in float64.

    The one place a module's delta is computed: resize, SVD merge and bake all use it.

    Args:
        stem: The module stem (for error messages).
        parts: Its tensors, as :func:`group_modules` returns them.
        shape: The weight's shape (needed for LoHa/LoKr modules, which bake applies).

    Returns:
        ``(out, in)`` for a Linear, ``(out, in, kh, kw)`` for a Conv2d.

    Raises:
        UnsupportedLoraError: Shapes that do not fit together.
    """
    if any(is_lycoris_key(k) for k in parts):  # LoHa/LoKr: bake only (needs the weight shape)
        if shape is None:
            raise UnsupportedLoraError(f"{stem}: a LoHa/LoKr module needs its weight's shape")
        try:
            return lycoris_delta({k.removeprefix("."): v for k, v in parts.items()}, shape)
        except ValueError as e:
            raise UnsupportedLoraError(f"module {stem!r}: {e}") from e
    down, up = parts[DOWN].double(), parts[UP].double()
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise UnsupportedLoraError(f"{stem}{UP}: a {tuple(up.shape)} up matrix is not 1x1")
    if up.shape[1] != down.shape[0] or down.dim() not in (2, 4) or up.dim() != down.dim():
        raise UnsupportedLoraError(
            f"module {stem!r}: up {tuple(up.shape)} and down {tuple(down.shape)} do not fit"
        )
    delta = (up.flatten(1) @ down.flatten(1)) * module_scale(parts)
    return delta.reshape(up.shape[0], *down.shape[1:])


def low_rank(
    delta: torch.Tensor, rank: int | None = None, keep_share: float | None = None
) -> Factors:
    """Factor a delta by truncated SVD, at a rank or at a kept share of its spectrum.

    Keeps the top ``rank`` singular values, or the fewest that keep ``keep_share`` of the
    spectrum's energy (the sum of squared singular values). ``sqrt(S)`` goes to each side, so
    ``up @ down`` is the truncated delta with alpha = rank.

    Args:
        delta: ``(out, in)`` or ``(out, in, kh, kw)``.
        rank: The rank to keep (capped at the matrix's size).
        keep_share: In ``(0, 1]``: keep the smallest rank whose kept share reaches it.

    Returns:
        The factors (at least rank 1, zero for a zero delta, whose share counts as 1).
    """
    if (rank is None) == (keep_share is None):
        raise ValueError("give exactly one of rank and keep_share")
    matrix = delta.double().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.square()
    total = float(energy.sum())
    cumulative = energy.cumsum(0) / total if total > 0 else torch.ones_like(energy)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        keep = min(rank, s.numel())
    else:
        assert keep_share is not None
        if not 0.0 < keep_share <= 1.0:
            raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
        # the tolerance: a share of exactly 1.0 must not need the round-off singular values
        reached = (cumulative >= keep_share - 1e-9).nonzero()
        keep = int(reached[0]) + 1 if reached.numel() else s.numel()
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    share = float(cumulative[keep - 1])
    if delta.dim() == 4:
        up = up.reshape(*up.shape, 1, 1)
        down = down.reshape(keep, *delta.shape[1:])
    return Factors(down.float(), up.float(), min(share, 1.0))


def resize(
    state: Mapping[str, torch.Tensor], rank: int | None = None, keep_share: float | None = None
) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """Resize every module of a kohya LoRA by SVD of its delta.

    Args:
        state: kohya LoRA tensors.
        rank: The new rank; a module of a lower rank keeps its own (and the report says so).
        keep_share: Or the least rank per module that keeps this share of its spectrum.

    Returns:
        The new tensors (one alpha, :func:`kohya_state`) and one report per module.
    """
    out: dict[str, Factors] = {}
    reports = []
    for stem, parts in group_modules(state).items():
        current = module_rank(parts)
        note = ""
        wanted = rank
        if rank is not None and rank > current:
            wanted = current
            note = f"rank {rank} asked, kept the current rank {current}"
        factors = low_rank(module_delta(stem, parts), wanted, keep_share)
        if factors.rank > current:  # keep_share on round-off: the delta has rank <= current
            factors = low_rank(module_delta(stem, parts), current)
        out[stem] = factors
        reports.append(ModuleReport(stem, factors.rank, factors.share, current, note))
    return kohya_state(out), reports


def merge(
    inputs: Sequence[tuple[Mapping[str, torch.Tensor], float]], rank: int | None = None
) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """Merge weighted LoRAs into one: exactly (ranks concatenated) or by SVD to ``rank``.

    Exact: the down matrices stacked, the up matrices side by side with each part's
    ``weight * alpha / rank`` folded in (the module's scale 1 at alpha = its total rank; the file
    gets one alpha, :func:`kohya_state`). Modules found in only some inputs
    are merged from those.

    Args:
        inputs: ``(kohya tensors, weight)`` per LoRA.
        rank: ``None`` for the exact merge, else the rank of the SVD of the weighted delta sum.

    Returns:
        The merged tensors and one report per module.

    Raises:
        UnsupportedLoraError: A module whose delta shape differs between inputs.
    """
    if not inputs:
        raise ValueError("nothing to merge")
    grouped = [(group_modules(state), weight) for state, weight in inputs]
    stems = sorted({stem for modules, _ in grouped for stem in modules})
    out: dict[str, Factors] = {}
    reports = []
    for stem in stems:
        present = [(m[stem], w) for m, w in grouped if stem in m]
        shapes = {tuple(module_delta(stem, p).shape) for p, _ in present}
        if len(shapes) > 1:
            raise UnsupportedLoraError(f"module {stem!r} has different shapes: {sorted(shapes)}")
        note = f"in {len(present)} of {len(grouped)} inputs" if len(present) < len(grouped) else ""
        if rank is None:
            down = torch.cat([p[DOWN].float() for p, _ in present])
            up = torch.cat([p[UP].float() * (w * module_scale(p)) for p, w in present], dim=1)
            out[stem] = Factors(down, up, 1.0)
            reports.append(ModuleReport(stem, int(down.shape[0]), 1.0, None, note))
            continue
        total = sum(w * module_delta(stem, p) for p, w in present)
        assert isinstance(total, torch.Tensor)
        factors = low_rank(total, rank)
        out[stem] = factors
        reports.append(ModuleReport(stem, factors.rank, factors.share, None, note))
    return kohya_state(out), reports


def stem_of(name: str, prefix: str = "lora_unet_") -> str:
    """The kohya stem of a module: ``prefix + name`` with dots as underscores."""
    return prefix + name.replace(".", "_")


def extract(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 1e-6,
    prefix: str = "lora_unet_",
) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """A LoRA from the difference of two models' module weights, by truncated SVD.

    Args:
        base: Module name -> weight (Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``).
        tuned: The same for the tuned model (modules missing in either are skipped).
        rank: The rank of Linear and 1x1 Conv2d modules.
        conv_rank: The rank of larger-kernel Conv2d modules (default ``rank``).
        min_diff: Modules whose weights differ by at most this (max abs) are left out.
        prefix: The stem prefix (``lora_unet_``, ``lora_te_``).

    Returns:
        The LoRA's tensors (one alpha, :func:`kohya_state`) and one report per module.

    Raises:
        UnsupportedLoraError: A module whose weight shapes differ between the models.
    """
    out: dict[str, Factors] = {}
    reports = []
    for name in sorted(set(base) & set(tuned)):
        a, b = base[name], tuned[name]
        if a.shape != b.shape:
            raise UnsupportedLoraError(f"{name}: {tuple(a.shape)} in base, {tuple(b.shape)} tuned")
        diff = b.double() - a.double()
        if diff.numel() == 0 or float(diff.abs().max()) <= min_diff:
            continue
        big_kernel = diff.dim() == 4 and diff.shape[2:] != (1, 1)
        factors = low_rank(diff, (conv_rank or rank) if big_kernel else rank)
        stem = stem_of(name, prefix)
        out[stem] = factors
        reports.append(ModuleReport(stem, factors.rank, factors.share))
    return kohya_state(out), reports


def network_dim(reports: Sequence[ModuleReport]) -> str:
    """``ss_network_dim`` of a result: the modules' rank, or ``Dynamic`` when they differ."""
    ranks = {r.rank for r in reports}
    return str(ranks.pop()) if len(ranks) == 1 else DYNAMIC


def network_alpha(reports: Sequence[ModuleReport]) -> str:
    """``ss_network_alpha`` of a result: the one alpha :func:`kohya_state` writes."""
    return str(max((r.rank for r in reports), default=1))


def updated_metadata(
    metadata: Mapping[str, str], reports: Sequence[ModuleReport], action: dict[str, object]
) -> dict[str, str]:
    """The input's metadata with the new dim/alpha and a record of what the tool did.

    Args:
        metadata: The (first) input file's string metadata.
        reports: The result's module reports.
        action: What was done (``{"tool": "resize", "rank": 8, ...}``), stored as JSON under
            :data:`TOOL_KEY` and summarized in ``ss_training_comment``.

    Returns:
        The new metadata (diffusers' adapter config entry dropped: its ranks no longer hold).
    """
    meta = {k: v for k, v in metadata.items() if k != DIFFUSERS_ADAPTER_METADATA}
    meta["ss_network_dim"] = network_dim(reports)
    meta["ss_network_alpha"] = network_alpha(reports)
    meta.setdefault("ss_network_module", "networks.lora")
    record = {**action, "version": __version__}
    meta[TOOL_KEY] = json.dumps(record, sort_keys=True)
    summary = "lightning-lora-tools " + " ".join(
        f"{k}={v}" for k, v in record.items() if k != "version"
    )
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {summary}" if comment else summary
    return meta


def format_report(reports: Sequence[ModuleReport]) -> str:
    """A text table: module, rank (old -> new), kept share, notes; then a summary line."""
    if not reports:
        return "no modules"
    width = max(len("module"), *(len(r.stem) for r in reports))
    lines = [f"{'module':<{width}}  {'rank':>9}  {'kept':>8}  note"]
    for r in reports:
        ranks = f"{r.old_rank}->{r.rank}" if r.old_rank is not None else str(r.rank)
        lines.append(f"{r.stem:<{width}}  {ranks:>9}  {r.share:>8.2%}  {r.note}".rstrip())
    shares = [r.share for r in reports]
    lines.append(
        f"{len(reports)} modules, ranks {min(r.rank for r in reports)}-"
        f"{max(r.rank for r in reports)}, kept share min {min(shares):.2%}, "
        f"mean {math.fsum(shares) / len(shares):.2%}"
    )
    return "\n".join(lines)


def add_to_weights(
    modules: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor], scale: float = 1.0
) -> list[str]:
    """Add ``scale *`` each module's delta to the weight of the module its stem names.

    Args:
        modules: Stem -> the model's module (a Linear or Conv2d), see :func:`stem_of`.
        state: kohya LoRA tensors; every stem must be in ``modules``.
        scale: The LoRA's strength.

    Returns:
        The stems applied, sorted.

    Raises:
        UnsupportedLoraError: A stem that names no module, or a delta of another shape.
    """
    grouped = group_modules(state, lycoris=True)
    weights: dict[str, torch.Tensor] = {}
    for stem, parts in grouped.items():  # check all before changing any weight
        if stem not in modules:
            raise UnsupportedLoraError(f"{stem!r} matches no module of the model")
        weight = modules[stem].weight
        if not isinstance(weight, torch.Tensor):
            raise UnsupportedLoraError(f"{stem!r} names a module without a weight")
        weights[stem] = weight
        shape = tuple(module_delta(stem, parts, tuple(weight.shape)).shape)
        if shape != tuple(weight.shape):
            raise UnsupportedLoraError(
                f"{stem!r}: the LoRA's delta is {shape}, the module's weight {tuple(weight.shape)}"
            )
    with torch.no_grad():
        for stem, parts in grouped.items():
            weight = weights[stem]
            delta = module_delta(stem, parts, tuple(weight.shape)) * scale
            weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    return sorted(grouped)
