"""The docs name tests that exist, so that a moved or renamed test cannot leave them stale.

Checked in ``README.md`` and ``docs/*.md``:

* every ``tests/<path>.py::test_name`` (optionally ``[param id]``) names a test function of that
  file (and the id appears in the file's source);
* every short reference ``X::test_name`` resolves through the document's legend (a line such as
  ```E::` means `tests/worker/test_app.py::```, or ```E::` `tests/...py::``` in a list) to such a
  test; ``X::*`` names the whole file, which must exist; a prefix without a legend entry fails;
* every backticked bare test name (```test_name```) is defined somewhere under ``tests/``.

And in those docs, the Makefile and every module of ``lightning_lora``, ``benchmarks`` and
``tests``: every path ``tests/<path>.py`` exists.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

_PATH = r"tests/(?:[\w-]+/)*[\w-]+\.py"
_LEGEND_RE = re.compile(r"`([A-Z]+)::`(?:\s+means)?\s+`(" + _PATH + r")::`")
_FULL_REF_RE = re.compile(r"`(" + _PATH + r")::(test_\w+)(?:\[([^\]`]*)\])?`")
_SHORT_REF_RE = re.compile(r"`([A-Z]+)::(test_\w+|\*)(?:\[([^\]`]*)\])?`")
_BARE_RE = re.compile(r"`(test_\w+)`")
_ANY_PATH_RE = re.compile(r"(?<![\w/.-])(" + _PATH + r")")


@functools.cache
def defined_tests(path: Path) -> frozenset[str]:
    """The names of the test functions defined at the top level of a test module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


@functools.cache
def all_test_names(root: Path = TESTS) -> frozenset[str]:
    """Every test function name defined in a ``test_*.py`` module under ``root``."""
    return frozenset(name for path in root.rglob("test_*.py") for name in defined_tests(path))


def legend_of(text: str) -> dict[str, str]:
    """The document's short prefixes: ``{"E": "tests/worker/test_app.py"}``."""
    return {prefix: path for prefix, path in _LEGEND_RE.findall(text)}


def _check_test(root: Path, path: str, name: str, param: str | None, where: str) -> list[str]:
    file = root / path
    if not file.is_file():
        return [f"{where}: {path} does not exist"]
    if name == "*":
        return []
    if name not in defined_tests(file):
        return [f"{where}: {path} defines no {name}"]
    if param and "<" not in param and param not in file.read_text(encoding="utf-8"):
        return [f"{where}: {path}::{name} has no parameter {param!r}"]
    return []


def stale_references(text: str, name: str, root: Path = ROOT) -> list[str]:
    """What in ``text`` (a document called ``name``) names a test or a test file that is gone."""
    problems: list[str] = []
    legend = legend_of(text)
    for path, test, param in _FULL_REF_RE.findall(text):
        problems += _check_test(root, path, test, param or None, name)
    for prefix, test, param in _SHORT_REF_RE.findall(text):
        if prefix not in legend:
            problems.append(f"{name}: `{prefix}::` is not in the legend")
            continue
        problems += _check_test(root, legend[prefix], test, param or None, f"{name} ({prefix}::)")
    known = all_test_names(root / "tests")
    problems += [f"{name}: no test is called {t}" for t in _BARE_RE.findall(text) if t not in known]
    problems += missing_paths(text, name, root)
    return problems


def missing_paths(text: str, name: str, root: Path = ROOT) -> list[str]:
    """The ``tests/<path>.py`` paths ``text`` names that do not exist."""
    return [
        f"{name}: {p} does not exist"
        for p in _ANY_PATH_RE.findall(text)
        if not (root / p).is_file()
    ]


def test_every_test_the_docs_name_exists() -> None:
    problems = [p for doc in DOCS for p in stale_references(doc.read_text("utf-8"), doc.name)]
    assert not problems, "stale test references:\n" + "\n".join(problems)


def test_the_reliability_legend_is_used() -> None:
    """Every short prefix of docs/RELIABILITY.md's legend maps to an existing test module."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text("utf-8")
    legend = legend_of(text)
    assert legend, "docs/RELIABILITY.md lost its legend"
    for prefix, path in legend.items():
        assert (ROOT / path).is_file(), f"{prefix}:: maps to {path}, which does not exist"
        assert f"`{prefix}::test_" in text or f"`{prefix}::*`" in text, f"{prefix}:: is unused"


def test_every_test_path_in_code_and_make_exists() -> None:
    sources = [ROOT / "Makefile"]
    for folder in ("lightning_lora", "benchmarks", "tests"):
        sources += [p for p in (ROOT / folder).rglob("*.py") if p != Path(__file__).resolve()]
    problems = [
        p
        for src in sources
        for p in missing_paths(src.read_text("utf-8"), str(src.relative_to(ROOT)))
    ]
    assert not problems, "\n".join(problems)


def test_a_stale_reference_is_found(tmp_path: Path) -> None:
    """The check itself: moved files, renamed tests, unknown prefixes and parameters are caught."""
    (tmp_path / "tests" / "worker").mkdir(parents=True)
    (tmp_path / "tests" / "worker" / "test_app.py").write_text(
        '@pytest.mark.parametrize("x", ["up", "down"])\ndef test_here(x):\n    pass\n'
    )
    legend = "`A::` means `tests/worker/test_app.py::`, `B::` `tests/test_gone.py::`."
    good = (
        legend + " `A::test_here[up]`, `A::*`, `tests/worker/test_app.py::test_here`, `test_here`"
    )
    assert (
        stale_references(good.replace(", `B::` `tests/test_gone.py::`", ""), "ok", tmp_path) == []
    )
    bad = (
        legend + " `A::test_gone` `A::test_here[sideways]` `B::test_here` `Z::test_here`"
        " `tests/test_worker.py::test_here` `test_nowhere` see tests/test_research.py"
    )
    assert stale_references(bad, "doc", tmp_path) == [
        "doc: tests/test_worker.py does not exist",
        "doc (A::): tests/worker/test_app.py defines no test_gone",
        "doc (A::): tests/worker/test_app.py::test_here has no parameter 'sideways'",
        "doc (B::): tests/test_gone.py does not exist",
        "doc: `Z::` is not in the legend",
        "doc: no test is called test_nowhere",
        "doc: tests/test_gone.py does not exist",
        "doc: tests/test_worker.py does not exist",
        "doc: tests/test_research.py does not exist",
    ]
