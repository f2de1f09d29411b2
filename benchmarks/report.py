"""The benchmark's derived figures and tables: ratios to the baselines, MFU, markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

TABLE_COLUMNS = (
    "case",
    "batch",
    "grad ckpt",
    "compile",
    "precision",
    "s/step",
    "samples/s",
    "peak GiB",
    "compile s",
    "MFU",
    "vs baseline",
    "vs reference",
    "syncs/step",
)


def like_for_like(row: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two rows differ only in their recipe.

    The same batch, gradient checkpointing, precision (as run) and compile mode (the baselines
    never compile).
    """
    keys = ("batch_size", "grad_ckpt", "precision")
    return all(row.get(k) == other.get(k) for k in keys) and (
        row.get("compile_mode") or "none"
    ) == (other.get("compile_mode") or "none")


def _match(rows: Sequence[dict[str, Any]], recipe: str, row: dict[str, Any]) -> dict | None:
    """The measured ``recipe`` row like ``row`` in all but the recipe, if there is one."""
    measured = [r for r in rows if r.get("recipe") == recipe and r.get("samples_per_s")]
    return next((r for r in measured if like_for_like(r, row)), None)


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    """Give our rows their samples/s ratio to each baseline, and the baseline its cross-check.

    For an ``ours`` row, ``ratio_to_baseline = ours.samples_per_s / baseline.samples_per_s`` (the
    project's implementation of diffusers' recipe) and ``ratio_to_reference`` likewise against the
    shared reference file, each only against a row of the same batch size, gradient
    checkpointing, precision and compile mode (:func:`like_for_like`): a ratio between unlike
    cases measures the difference, not the trainer, so it is left blank (``None``). A
    ``baseline`` row gets ``ratio_to_reference``: the two implementations of the same recipe
    should be close to 1.
    """
    for row in rows:
        if not row.get("samples_per_s"):
            continue
        against = {"ours": ("baseline", "reference"), "baseline": ("reference",)}
        for recipe in against.get(row.get("recipe", ""), ()):
            match = _match(rows, recipe, row)
            row[f"{recipe}_case"] = match["case"] if match else None
            row[f"{recipe}_samples_per_s"] = match["samples_per_s"] if match else None
            row[f"ratio_to_{recipe}"] = (
                row["samples_per_s"] / match["samples_per_s"] if match else None
            )


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One case's row from its runs: the run of median s/step, with every run's s/step.

    A single run is returned as it is.
    """
    if len(runs) == 1:
        return runs[0]
    timed = sorted((r for r in runs if r.get("step_s")), key=lambda r: r["step_s"])
    chosen = dict(timed[(len(timed) - 1) // 2] if timed else runs[-1])
    chosen["runs_step_s"] = [r.get("step_s") for r in runs]
    chosen["runs"] = len(runs)
    return chosen


def attach_mfu(rows: list[dict[str, Any]], flops: float | None, peak_tflops: float | None) -> None:
    """Model FLOPs utilisation: ``flops_per_sample * samples_per_s / peak``."""
    for row in rows:
        sps = row.get("samples_per_s")
        row["tflop_per_sample"] = flops / 1e12 if flops else None
        row["achieved_tflops"] = flops * sps / 1e12 if flops and sps else None
        row["mfu"] = (
            row["achieved_tflops"] / peak_tflops if row["achieved_tflops"] and peak_tflops else None
        )


def fmt(value: Any, spec: str) -> str:
    """Format a number, ``-`` for a missing one."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def _ratio(value: float | None) -> str:
    return fmt(value, ".2f") + ("x" if value else "")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the results (skipped and failed cases say why)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        if r.get("error") or r.get("skipped"):
            note = " ".join(str(r.get("skipped") or f"error: {r.get('error')}").split())
            cells = [r["case"], str(r["batch_size"]), *["-"] * (len(TABLE_COLUMNS) - 3), note[:80]]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            r["case"],
            str(r["batch_size"]),
            "on" if r["grad_ckpt"] else "off",
            r.get("compile_mode") or "-",
            r.get("precision") or "-",
            fmt(r.get("step_s"), ".4f"),
            fmt(r.get("samples_per_s"), ".1f"),
            fmt(r.get("peak_gib"), ".2f"),
            fmt(r.get("compile_s"), ".1f"),
            fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""),
            _ratio(r.get("ratio_to_baseline")),
            _ratio(r.get("ratio_to_reference")),
            fmt(r.get("syncs_per_step"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_jobs(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the job rows' phases."""
    jobs = [r for r in rows if r.get("recipe") == "job" and r.get("phases")]
    if not jobs:
        return ""
    keys = list(jobs[0]["phases"])
    head = ["job", "steps", "train_seconds", "samples/s", "graphs compiled", "ckpts", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in jobs:
        cells = [
            r["case"],
            str(r["steps_run"]),
            fmt(r.get("train_seconds"), ".2f"),
            fmt(r.get("samples_per_s"), ".1f"),
            str(r.get("graphs_compiled")),
            str(r.get("checkpoints_saved")),
            *[fmt(r["phases"][k], ".2f") for k in keys],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(row: dict[str, Any]) -> str:
    """One line for the progress log."""
    if "error" in row:
        return row["error"]
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    sps, step = row.get("samples_per_s"), row.get("step_s")
    return f"{fmt(sps, '.2f')} samples/s, {fmt(step, '.4f')} s/step, {row['case_wall_s']:.1f}s"
