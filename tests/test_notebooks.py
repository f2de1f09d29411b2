"""The example notebooks: stored without outputs, and they execute top to bottom on CPU."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, timeout: int = 400) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel from the notebooks folder; a failing cell raises."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode, kind: str) -> list[dict]:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


@pytest.fixture
def kernel_env(
    monkeypatch: pytest.MonkeyPatch, ll_cache: Path, tiny_model: str, tmp_path: Path
) -> Path:
    """Environment of the notebook kernels (they inherit this process's)."""
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(ll_cache))
    monkeypatch.setenv("LIGHTNING_LORA_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return tmp_path


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs stored"


def test_quickstart_notebook_executes(kernel_env: Path) -> None:
    nb = _execute("01_quickstart.ipynb")
    run_dir = kernel_env / "01_quickstart"
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "lora_scales.png").is_file()
    # the loss curve, the sample grid and the LoRA-scale grid are displayed
    assert len(_outputs(nb, "image/png")) >= 3


def test_sweep_analysis_notebook_executes(
    kernel_env: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    multirun: Path = request.getfixturevalue("tiny_multirun")
    monkeypatch.setenv("LIGHTNING_LORA_MULTIRUN_DIR", str(multirun))
    nb = _execute("02_sweep_analysis.ipynb")
    text = "".join(
        "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert f"multirun: {multirun}" in text
    assert "swept: ['lora.rank']" in text
    assert "| lora.rank |" in text
    assert len(_outputs(nb, "image/png")) >= 2  # the report's plot and the loss curves
