"""Summarise a Hydra multirun: one table of runs (CSV and markdown) and a plot of the objective.

Every run folder of a multirun holds ``.hydra/overrides.yaml`` (what the sweep set) and, once
training finished, ``summary.json`` (final metrics, LoRA path). :func:`write_report` joins them into
``sweep_report.csv`` / ``sweep_report.md`` and plots the objective against each swept parameter in
``sweep_report.png``. It runs automatically at the end of every multirun
(:class:`SweepReportCallback`, configured in ``configs/hydra/default.yaml``) and by hand with
``lightning-lora-sweep-report <multirun dir>``.

This module imports neither torch nor Lightning (the Hydra callback is loaded for every run).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

log = logging.getLogger(__name__)

REPORT_STEM = "sweep_report"
#: Metric columns of the table (besides the objective): (column, key in ``summary.json`` metrics).
METRIC_COLUMNS = (("train_seconds", "train_seconds"), ("samples_per_s", "samples_per_s"))


@dataclass
class RunRow:
    """One run of a multirun.

    Attributes:
        run: The run folder's name relative to the multirun folder (``0``, ``1``, ...).
        path: The run folder.
        overrides: The run's Hydra overrides, ``key -> value`` as written on the command line.
        objective: The final objective (``None`` when the run did not finish or did not log it).
        metrics: The final metrics from ``summary.json`` (empty when it is missing).
        lora: The exported LoRA file (``None`` when missing).
        status: ``ok``, or ``missing summary`` for runs that failed or are still running.
    """

    run: str
    path: Path
    overrides: dict[str, str]
    objective: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    lora: str | None = None
    status: str = "ok"


@dataclass
class SweepReport:
    """What :func:`write_report` produced.

    Attributes:
        multirun_dir: The multirun folder.
        objective: The objective's metric name (``val/loss``).
        direction: ``minimize`` or ``maximize``.
        rows: The runs, in job order.
        swept: The override keys whose value differs between runs.
        csv_path: The table as CSV.
        markdown_path: The table as markdown.
        plot_path: The objective plotted against each swept parameter (``None`` without runs
            that logged the objective).
    """

    multirun_dir: Path
    objective: str
    direction: str
    rows: list[RunRow]
    swept: list[str]
    csv_path: Path
    markdown_path: Path
    plot_path: Path | None

    @property
    def best(self) -> RunRow | None:
        """The run with the best objective (``None`` if no run logged it)."""
        return _best(self.rows, self.direction)


def _best(rows: Sequence[RunRow], direction: str) -> RunRow | None:
    done = [
        (r.objective, r) for r in rows if r.objective is not None and math.isfinite(r.objective)
    ]
    if not done:
        return None
    pick = min if direction == "minimize" else max
    return pick(done, key=lambda scored: scored[0])[1]


# --------------------------------------------------------------------------------- collecting
def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """Turn Hydra override strings into ``key -> value`` (``+``/``++``/``~`` prefixes dropped).

    Args:
        lines: Overrides as in ``.hydra/overrides.yaml`` (``lora.rank=4``, ``+foo=1``, ``~bar``).

    Returns:
        The overrides in order; a deletion (``~key``) maps to ``<deleted>``.
    """
    out: dict[str, str] = {}
    for line in lines:
        text = str(line)
        key, sep, value = text.partition("=")
        key = key.lstrip("+~")
        out[key] = value if sep else "<deleted>"
    return out


def find_run_dirs(multirun_dir: str | Path) -> list[Path]:
    """Return the run folders of a multirun (those holding ``.hydra/overrides.yaml``).

    Args:
        multirun_dir: The multirun folder (``hydra.sweep.dir``).

    Returns:
        The run folders in natural job order (``2`` before ``10``).
    """
    root = Path(multirun_dir)
    runs = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    runs.discard(root)
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def collect_runs(multirun_dir: str | Path, objective: str = "val/loss") -> list[RunRow]:
    """Read every run's overrides and ``summary.json``.

    Args:
        multirun_dir: The multirun folder.
        objective: The metric name to report as the objective.

    Returns:
        One row per run folder, in job order.
    """
    root = Path(multirun_dir)
    rows = []
    for run_dir in find_run_dirs(root):
        raw = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text("utf-8")) or []
        row = RunRow(
            run=run_dir.relative_to(root).as_posix(),
            path=run_dir,
            overrides=parse_overrides(raw),
            objective=None,
            status="missing summary",
        )
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text("utf-8"))
            row.metrics = {k: float(v) for k, v in summary.get("metrics", {}).items()}
            row.objective = row.metrics.get(objective)
            row.lora = summary.get("lora")
            row.status = "ok" if row.objective is not None else f"no {objective}"
        rows.append(row)
    return rows


def swept_keys(rows: Sequence[RunRow]) -> list[str]:
    """Override keys whose value differs between runs (or is missing in some), in order."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.overrides if k not in keys)
    return [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1]


# --------------------------------------------------------------------------------- writing
def _table(
    rows: Sequence[RunRow], swept: Sequence[str], objective: str
) -> tuple[list[str], list[list[Any]]]:
    header = ["run", *swept, objective, *(c for c, _ in METRIC_COLUMNS), "lora", "status"]
    header.append("overrides")
    body = []
    for row in rows:
        body.append(
            [
                row.run,
                *(row.overrides.get(k, "") for k in swept),
                row.objective,
                *(row.metrics.get(key) for _, key in METRIC_COLUMNS),
                row.lora or "",
                row.status,
                " ".join(f"{k}={v}" for k, v in row.overrides.items()),
            ]
        )
    return header, body


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    number = _as_number(text) if len(text) > 8 else None
    if number is not None and not text.isdigit():
        return f"{number:.4g}"  # e.g. an lr sampled by Optuna
    return text.replace("|", "\\|")


def to_markdown(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """Render a table as GitHub markdown (floats with 4 significant digits).

    Args:
        header: Column names.
        body: Rows of cells (``None`` renders empty).

    Returns:
        The markdown table, newline-terminated.
    """
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_fmt(c) for c in cells) + " |" for cells in body)
    return "\n".join(lines) + "\n"


def _as_number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def plot_objective(
    rows: Sequence[RunRow], swept: Sequence[str], objective: str, path: str | Path
) -> Path:
    """Plot the objective against each swept parameter (one panel per parameter) as a PNG.

    Numeric parameters get a numeric axis (logarithmic when they span two decades or more),
    others a categorical one; each point is labelled with its run. Without swept parameters the
    objective is plotted against the run. Uses matplotlib's Agg canvas (no display, no pyplot).

    Args:
        rows: The runs (those without an objective are skipped).
        swept: The parameters to plot against.
        objective: The objective's name (y label).
        path: The PNG to write.

    Returns:
        The PNG's path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [(r, r.objective) for r in rows if r.objective is not None]
    done = [r for r, _ in scored]
    params = list(swept) or ["run"]
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, param in enumerate(params):
        ax = fig.add_subplot(nrows, cols, i + 1)
        raw = [r.run if param == "run" else r.overrides.get(param) for r in done]
        ys = [y for _, y in scored]
        numbers = [_as_number(v) for v in raw]
        if param != "run" and raw and all(n is not None for n in numbers):
            xs: list[Any] = numbers
            positive = [n for n in numbers if n is not None and n > 0]
            if len(positive) == len(numbers) and max(positive) / min(positive) >= 100:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in raw}, key=_natural_key)
            xs = [labels.index(str(v)) for v in raw]
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
        ax.scatter(xs, ys, color="tab:blue", zorder=3)
        for x, y, row in zip(xs, ys, done, strict=True):
            ax.annotate(row.run, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(param)
        ax.set_ylabel(objective)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{objective} per run ({len(done)} of {len(rows)} finished)")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def write_report(
    multirun_dir: str | Path,
    objective: str = "val/loss",
    direction: str = "minimize",
    out_dir: str | Path | None = None,
) -> SweepReport:
    """Write ``sweep_report.csv``, ``sweep_report.md`` and ``sweep_report.png`` for a multirun.

    Args:
        multirun_dir: The multirun folder (``hydra.sweep.dir``).
        objective: The metric to report and plot.
        direction: ``minimize`` or ``maximize`` (which run the markdown marks as best).
        out_dir: Where the files go; defaults to the multirun folder.

    Returns:
        The report (rows, swept parameters, paths).

    Raises:
        FileNotFoundError: If the folder does not exist.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun folder {root} does not exist")
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(root, objective)
    swept = swept_keys(rows)
    header, body = _table(rows, swept, objective)

    csv_path = out / f"{REPORT_STEM}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if c is None else c for c in cells] for cells in body])

    best = _best(rows, direction)
    finished = sum(r.objective is not None for r in rows)
    text = [f"# Sweep report: {root}", ""]
    text.append(f"{len(rows)} runs, {finished} with `{objective}` ({direction}).")
    if best is not None:
        text.append(f"Best: run `{best.run}` with {objective} = {best.objective:.6g}.")
    text += ["", to_markdown(header, body)]
    markdown_path = out / f"{REPORT_STEM}.md"
    markdown_path.write_text("\n".join(text), encoding="utf-8")
    plot_path = None
    if finished:
        try:
            plot_path = plot_objective(rows, swept, objective, out / f"{REPORT_STEM}.png")
        except ImportError:
            log.warning("matplotlib is not installed: no sweep plot (pip install matplotlib)")
    report = SweepReport(
        root, objective, direction, rows, swept, csv_path, markdown_path, plot_path
    )
    log.info("sweep report (%d runs) written to %s", len(rows), report.markdown_path)
    return report


# --------------------------------------------------------------------------------- Hydra callback
class SweepReportCallback(Callback):
    """Hydra callback: writes the sweep report into the sweep folder at the end of a multirun.

    Configured in ``configs/hydra/default.yaml`` under ``hydra.callbacks``. A failure to write the
    report is logged, never raised (the runs' results are already on disk).
    """

    def __init__(self, enabled: bool = True) -> None:
        """Configure the callback.

        Args:
            enabled: Set ``hydra.callbacks.sweep_report.enabled=false`` to skip the report.
        """
        self.enabled = enabled
        self._sweep_dir: str | None = None

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = str(config.hydra.sweep.dir)

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = self._sweep_dir or str(config.hydra.sweep.dir)
        objective = str(config.get("optimized_metric") or "val/loss")
        direction = str(config.hydra.sweeper.get("direction", "minimize") or "minimize")
        if direction not in ("minimize", "maximize"):
            direction = "minimize"  # multi-objective sweeps: report the first objective as is
        try:
            report = write_report(sweep_dir, objective=objective, direction=direction)
        except Exception:
            log.exception("could not write the sweep report for %s", sweep_dir)
            return
        print(f"sweep report:     {report.markdown_path}")


# --------------------------------------------------------------------------------- examples
def run_example_sweep(
    sweep_dir: str | Path,
    overrides: Sequence[str] = ("experiment=tiny", "lora.rank=2,4"),
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> Path:
    """Run ``lightning-lora-train -m <overrides> hydra.sweep.dir=<sweep_dir>`` in a subprocess.

    The default is a two-run tiny sweep over the LoRA rank (what the sweep-analysis notebook
    runs when it is given no multirun folder).

    Args:
        sweep_dir: The multirun folder to create.
        overrides: Sweep overrides.
        env: The subprocess environment (defaults to this process's).
        timeout: Seconds before the subprocess is killed.

    Returns:
        The multirun folder.

    Raises:
        subprocess.CalledProcessError: If the sweep fails (its output is in the exception).
    """
    script = Path(sys.executable).with_name("lightning-lora-train")
    found = str(script) if script.exists() else shutil.which("lightning-lora-train")
    cmd = [found] if found else [sys.executable, "-m", "lightning_lora.tools.train"]
    cmd += ["-m", *overrides, f"hydra.sweep.dir={Path(sweep_dir).resolve()}"]
    subprocess.run(
        cmd,
        env=dict(env) if env is not None else os.environ.copy(),
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Path(sweep_dir)


# --------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-sweep-report <multirun dir>``: write and print the sweep report."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora-sweep-report",
        description="Summarise a lightning-lora-train multirun: table (CSV, markdown) and plot.",
    )
    parser.add_argument("multirun_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    parser.add_argument("--objective", default=None, help="metric (default: the sweep's)")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default=None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep)")
    args = parser.parse_args(argv)

    objective, direction = args.objective, args.direction
    multirun_yaml = args.multirun_dir / "multirun.yaml"
    if multirun_yaml.is_file() and (objective is None or direction is None):
        saved = yaml.safe_load(multirun_yaml.read_text("utf-8")) or {}
        objective = objective or saved.get("optimized_metric")
        sweeper = (saved.get("hydra") or {}).get("sweeper") or {}
        if direction is None and sweeper.get("direction") in ("minimize", "maximize"):
            direction = sweeper["direction"]
    try:
        report = write_report(
            args.multirun_dir,
            objective=objective or "val/loss",
            direction=direction or "minimize",
            out_dir=args.out,
        )
    except FileNotFoundError as exc:
        parser.error(str(exc))
    print(report.markdown_path.read_text("utf-8"))
    print(f"csv:      {report.csv_path}")
    print(f"markdown: {report.markdown_path}")
    print(f"plot:     {report.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
