"""The package's shape: imports run one way between its parts, and modules stay small.

Layers, lowest first (a part may import only parts of lower layers, and itself):

0. ``version``, ``errors`` (the failure codes and the one fail-or-requeue rule) and ``config``
   (where the Hydra configs are, composing them);
1. ``clients``: HTTP to the backend, S3, backoff, redaction (no Lightning);
2. ``data`` and ``lora`` (neither imports the other);
3. ``training`` (uses ``data`` and ``lora``);
4. ``callbacks``;
5. ``jobs`` and ``demo``;
6. ``worker`` and ``tools`` (the entry points);
7. ``resolvers`` (the configs' ``ll.*`` resolvers build the tiny model and the demo's images);
   the package's ``__init__`` (the public API, lazily; it registers the resolvers).

Every ``import`` and ``from ... import`` of every module is checked, those inside functions too:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lora"
LAYERS = {
    "version": 0,
    "errors": 0,
    "config": 0,
    "clients": 1,
    "data": 2,
    "lora": 2,
    "training": 3,
    "callbacks": 4,
    "jobs": 5,
    "demo": 5,
    "worker": 6,
    "tools": 6,
    "resolvers": 7,
    "__init__": 8,
}


def _part(module: str) -> str:
    """The part of ``lightning_lora.<part>[...]`` a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, root: Path) -> set[str]:
    """The ``lightning_lora`` modules a file under ``root`` imports (relative imports resolved)."""
    here = _module_name(path, root).removesuffix(".__init__")
    if path.name != "__init__.py":
        here = here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_lora"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            if base == "lightning_lora":
                found.update(f"lightning_lora.{a.name}" for a in node.names)
            elif base.startswith("lightning_lora."):
                found.add(base)
    return found


def _module_name(path: Path, root: Path) -> str:
    """``lightning_lora.a.b`` for ``root/a/b.py``; ``lightning_lora.__init__`` for the root's."""
    rel = path.relative_to(root.parent).with_suffix("")
    if rel.parts == ("lightning_lora", "__init__"):
        return "lightning_lora.__init__"
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def upward_imports(root: Path) -> list[str]:
    """Every import of a package module that goes against :data:`LAYERS`."""
    upward = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        mine = _part(module)
        for target in sorted(_imports(path, root)):
            theirs = _part(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} ({mine}, layer {LAYERS[mine]}) imports {target}")
    return upward


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    parts |= {p.stem for p in PACKAGE.glob("*.py")}
    assert parts == set(LAYERS), f"give each part a layer: {sorted(parts ^ set(LAYERS))}"


def test_imports_run_downward() -> None:
    upward = upward_imports(PACKAGE)
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_an_upward_import_is_found_also_when_lazy_or_relative(tmp_path: Path) -> None:
    root = tmp_path / "lightning_lora"
    (root / "clients").mkdir(parents=True)
    (root / "clients" / "__init__.py").write_text("")
    (root / "clients" / "ok.py").write_text("from lightning_lora.errors import DatasetError\n")
    (root / "clients" / "lazy.py").write_text(
        "def f():\n    from lightning_lora.worker.app import TrainingWorker\n"
    )
    (root / "clients" / "relative.py").write_text("from ..jobs import report\n")
    assert upward_imports(root) == [
        "lightning_lora.clients.lazy (clients, layer 1) imports lightning_lora.worker.app",
        "lightning_lora.clients.relative (clients, layer 1) imports lightning_lora.jobs",
    ]


def test_no_package_module_is_over_600_lines() -> None:
    """Files cut by concern: a module over 600 lines holds more than one."""
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not long, long
