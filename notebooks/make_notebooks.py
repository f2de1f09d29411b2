"""Write the example notebooks (outputs stripped): ``python notebooks/make_notebooks.py``.

The notebooks are generated from this script so that they stay reviewable as code and are stored
without outputs. ``tests/test_notebooks.py`` executes them on CPU.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNEL = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(metadata=KERNEL)
    for kind, source in cells:
        source = source.strip("\n")
        if kind == "md":
            nb.cells.append(new_markdown_cell(source))
        else:
            tags = ["parameters"] if source.startswith("# Parameters") else []
            nb.cells.append(new_code_cell(source, metadata={"tags": tags} if tags else {}))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    return nb


QUICKSTART = [
    (
        "md",
        """
# Quickstart: train a style LoRA, look at it, use it

This notebook runs the same training path as `lightning-lora-train`, in-process:

1. compose the Hydra config with overrides (`experiment=demo`: the pretrained tiny SD1.5-shaped
   model, which draws captioned shapes, learns the demo style (scenes in four greens) on the CPU
   at 64 px; for SD1.5 use e.g. `experiment=sd15_fast` on a GPU),
2. train with `train(cfg)`,
3. plot the loss curve from the run's CSV log and show the base-vs-LoRA grid with its measured
   style distances,
4. load the LoRA into a diffusers pipeline and generate at LoRA scales 0, 0.5 and 1.
""",
    ),
    (
        "code",
        """
# Parameters
import os
from pathlib import Path

OVERRIDES = ["experiment=demo", "trainer.enable_progress_bar=false"]
OUTPUT_DIR = Path(os.environ.get("LIGHTNING_LORA_NOTEBOOK_OUTPUT", "../outputs/notebooks"))
OUTPUT_DIR = OUTPUT_DIR.resolve() / "01_quickstart"
PROMPTS = [
    "a red circle on a blue background, in the style of lldemo",
    "a white square on a purple background, in the style of lldemo",
    "a yellow triangle on a black background, in the style of lldemo",
]
""",
    ),
    ("md", "## 1. Compose the config (Hydra compose API)"),
    (
        "code",
        """
from omegaconf import OmegaConf

from lightning_lora import compose_config, train

cfg = compose_config(OVERRIDES, output_dir=OUTPUT_DIR)
print(OmegaConf.to_yaml(cfg.lora))
print("model:", cfg.model.pretrained_model_name_or_path)
print("epochs:", cfg.trainer.max_epochs, "lr:", cfg.module.optimizer.lr)
""",
    ),
    ("md", "## 2. Train"),
    (
        "code",
        """
result = train(cfg)
print("output folder:", result.output_dir)
print("LoRA:", result.lora.diffusers)
{k: round(v, 4) for k, v in result.metrics.items()}
""",
    ),
    ("md", "## 3. Loss curve, and the base model against the LoRA"),
    (
        "code",
        """
import csv

import matplotlib.pyplot as plt

with open(result.output_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
train_loss = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
val_loss = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*train_loss, strict=True), marker=".", label="train/loss")
ax.plot(*zip(*val_loss, strict=True), marker="o", label="val/loss")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
plt.show()
""",
    ),
    (
        "code",
        """
from IPython.display import Image, display

# top row: the base model (LoRA scale 0); bottom row: the LoRA; same prompts and seeds
print("style distance to the style images (0 = same colours, 1 = none shared):")
print("  base", round(result.metrics["style_distance/base"], 3))
print("  LoRA", round(result.metrics["style_distance/lora"], 3))
display(Image(filename=str(result.output_dir / "samples" / "base_vs_lora.png")))
""",
    ),
    ("md", "## 4. Generate with the LoRA at scales 0 (the base model), 0.5 and 1"),
    (
        "code",
        """
from lightning_lora.training.inference import generate, load_pipeline, make_grid

pipe = load_pipeline(cfg.model.pretrained_model_name_or_path)
pipe.load_lora_weights(
    str(result.lora.folder), weight_name=result.lora.diffusers.name, adapter_name="style"
)
rows = {}
for scale in (0.0, 0.5, 1.0):
    pipe.set_adapters(["style"], [scale])
    rows[scale] = generate(pipe, PROMPTS, resolution=64, steps=20, guidance_scale=5.0, seed=0)
grid = make_grid(rows[0.0] + rows[0.5] + rows[1.0], cols=len(PROMPTS))
grid.save(OUTPUT_DIR / "lora_scales.png")
print("rows: LoRA scale 0 (base model), 0.5, 1")
display(grid.resize((grid.width * 2, grid.height * 2)))
""",
    ),
]

SWEEP_ANALYSIS = [
    (
        "md",
        """
# Sweep analysis

Reads a `lightning-lora-train -m ...` multirun folder and compares its runs with
`lightning_lora.tools.sweep_report` (the same report the multirun writes at its end). Set
`MULTIRUN_DIR` below (or the `LIGHTNING_LORA_MULTIRUN_DIR` environment variable); without one,
the notebook runs a two-run tiny sweep on the demo's pretrained model itself:

```
lightning-lora-train -m experiment=tiny model=demo lora.rank=2,4 hydra.sweep.dir=...
```
""",
    ),
    (
        "code",
        """
# Parameters
import os
from pathlib import Path

MULTIRUN_DIR = os.environ.get("LIGHTNING_LORA_MULTIRUN_DIR", "")
OUTPUT_DIR = Path(os.environ.get("LIGHTNING_LORA_NOTEBOOK_OUTPUT", "../outputs/notebooks"))
EXAMPLE_SWEEP = [
    "experiment=tiny",
    "model=demo",
    "lora.rank=2,4",
    "trainer.enable_progress_bar=false",
]
""",
    ),
    (
        "code",
        """
from lightning_lora.tools import sweep_report

if MULTIRUN_DIR and sweep_report.find_run_dirs(MULTIRUN_DIR):
    multirun_dir = Path(MULTIRUN_DIR)
else:
    multirun_dir = OUTPUT_DIR.resolve() / "02_sweep"
    print("no multirun given: running", " ".join(EXAMPLE_SWEEP), "into", multirun_dir)
    sweep_report.run_example_sweep(multirun_dir, EXAMPLE_SWEEP)
print("multirun:", multirun_dir)
""",
    ),
    ("md", "## The sweep table"),
    (
        "code",
        """
from IPython.display import Image, Markdown, display

report = sweep_report.write_report(multirun_dir)
print("swept:", report.swept, "| best run:", report.best.run if report.best else None)
display(Markdown(report.markdown_path.read_text(encoding="utf-8")))
""",
    ),
    ("md", "## Objective against each swept parameter"),
    (
        "code",
        """
display(Image(filename=str(report.plot_path)))
""",
    ),
    ("md", "## Loss curves of every run"),
    (
        "code",
        """
import csv

import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5))
for row in report.rows:
    metrics_csv = row.path / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        continue
    with open(metrics_csv, encoding="utf-8") as f:
        points = [
            (int(r["step"]), float(r["train/loss"]))
            for r in csv.DictReader(f)
            if r.get("train/loss")
        ]
    label = " ".join(f"{k}={row.overrides[k]}" for k in report.swept) or row.run
    ax.plot(*zip(*points, strict=True), marker=".", label=label)
ax.set_xlabel("step")
ax.set_ylabel("train/loss")
ax.legend(fontsize=8)
plt.show()
""",
    ),
]


def main() -> None:
    """Write ``01_quickstart.ipynb`` and ``02_sweep_analysis.ipynb`` next to this script."""
    for name, cells in (
        ("01_quickstart.ipynb", QUICKSTART),
        ("02_sweep_analysis.ipynb", SWEEP_ANALYSIS),
    ):
        nbformat.write(_notebook(cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
