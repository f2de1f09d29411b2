"""How long a second process compiles, against the first: the compile cache across processes.

Run by hand (minutes on a CPU; the GPU figures come from ``gpu_run.sh``'s compiled rows)::

    .venv/bin/python benchmarks/compile_cache.py --mode regional --mode default --json cc.json

For each compile mode, three fresh processes run the same ``ours`` case of ``python -m benchmarks``
(``--tiny`` on a CPU; SD1.5 shapes on a GPU) with ``module.compile_cache_dir``:

1. **cold**: an empty cache folder (what every process paid before);
2. **restart**: the same folder again (a restarted worker on the same machine: Inductor's on-disk
   caches);
3. **fleet**: a new empty folder holding only the first process's portable artifacts
   (``<dir>/artifacts``, ``torch.compiler.save_cache_artifacts``): another machine that was handed
   the artifacts, e.g. through a shared folder or object storage.

Each prints ``compile_s`` (the warm-up beyond the steady steps: compilation) and ``step_s``; the
table shows them side by side with the ratio to the cold process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_case(
    case: str, cache_dir: Path, workdir: Path, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """Run one bench case in a fresh interpreter and return its result row."""
    out = workdir / f"{tag}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--case",
        case,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--no-flops",
        "--compile-cache-dir",
        str(cache_dir),
        "--workdir",
        str(workdir / tag),
        "--json",
        str(out),
        *(["--tiny", "--cpu"] if args.cpu else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"[compile-cache] {tag}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    row = json.loads(out.read_text())["results"][0]
    keep = ("compile_s", "step_s", "warmup_s", "graphs_compiled", "error")
    return {k: row.get(k) for k in keep if k in row}


def measure(mode: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """The cold, restart and fleet processes of one compile mode."""
    case = f"ours:{args.batch_size}:{mode}"
    first = workdir / f"{mode}-cache"
    fleet = workdir / f"{mode}-fleet-cache"
    shutil.rmtree(first, ignore_errors=True)
    shutil.rmtree(fleet, ignore_errors=True)
    rows = [{"mode": mode, "process": "cold", **run_case(case, first, workdir, args, f"{mode}-1")}]
    rows.append(
        {"mode": mode, "process": "restart", **run_case(case, first, workdir, args, f"{mode}-2")}
    )
    artifacts = sorted((first / "artifacts").glob("*.bin"))
    if artifacts:
        shutil.copytree(first / "artifacts", fleet / "artifacts")
    rows.append(
        {
            "mode": mode,
            "process": "fleet (artifacts only)",
            "artifacts": [p.name for p in artifacts],
            "artifact_bytes": sum(p.stat().st_size for p in artifacts),
            **run_case(case, fleet, workdir, args, f"{mode}-3"),
        }
    )
    cold = rows[0].get("compile_s")
    for row in rows:
        value = row.get("compile_s")
        row["compile_vs_cold"] = value / cold if cold and value is not None else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the processes."""
    lines = [
        "| mode | process | compile s | vs cold | s/step | graphs compiled |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['mode']} | {r['process']} | error | | | |")
            continue

        def cell(key: str, spec: str, row: dict[str, Any] = r) -> str:
            value = row.get(key)
            return "-" if value is None else format(value, spec)

        lines.append(
            f"| {r['mode']} | {r['process']} | {cell('compile_s', '.1f')} | "
            f"{cell('compile_vs_cold', '.2f')} | {cell('step_s', '.4f')} | "
            f"{r.get('graphs_compiled', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mode", action="append", help="compile modes (default: regional, default)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu", dest="cpu", action="store_false", help="SD1.5 shapes on the GPU")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ll-compile-cache-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for mode in args.mode or ["regional", "default"]:
        rows += measure(mode, args, workdir)
        print(format_table(rows), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(format_table(rows))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
