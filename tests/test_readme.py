r"""The command lines the docs show are run or composed, so that none of them goes stale.

Where the lines come from: every line of README.md's ``bash``/``sh``/``shell`` code blocks, the
``$ `` lines of its ``console`` blocks (a trailing ``\`` joins the next line), and the comment
lines of ``.env.example`` and ``lightning_lora/configs/worker.yaml`` that start with a command
(``#   lightning-lora-worker ...``). A line is split as the shell does (:mod:`shlex`): ``#``
starts a comment, ``&&``, ``||``, ``;``, ``|`` and ``&`` separate commands, and leading
``NAME=value`` words are the command's environment.

How each kind of command is checked, and why:

* ``lightning-lora-worker ...``: run through the installed entry point
  (``Path(sys.executable).parent / "lightning-lora-worker"``), one subprocess per distinct
  argument list, with ``--print-config`` appended. The worker composes the very config it would
  serve with, prints it and exits 0 without contacting the broker, S3 or a backend (also for a
  ``--check`` line: the CLI handles ``--print-config`` first). The test asserts exit 0, that
  every ``key=value`` override shows up in the printed config, and that the printed ``worker:``
  section plus the line's environment (on top of the two required variables) passes the
  worker's settings check (``load_settings``, ``BrokerSettings.from_env``). Lines that differ
  only in their environment (``CUDA_VISIBLE_DEVICES=0`` / ``=1``) run once: composing reads no
  environment. This is what fails on a removed form such as ``'train_overrides=[...]'``:
  ``test_an_outdated_worker_line_fails`` adds that line to a scratch copy of the README's text,
  extracts it like the others and runs it through the CLI's ``main`` (in this process, the same
  function the script calls, to spare ~10 s), and the worker check must reject the result.
* ``lightning-lora-train ...`` (and ``python -m lightning_lora.tools.train ...``): composed in this
  process with Hydra's compose API, the ``hydra`` node included (``return_hydra_config``, so
  ``hydra.sweeper.*`` and ``hydra/launcher=...`` are checked too). That is the composition
  ``--cfg job`` performs, without paying ~10 s of imports in a new process per line; composing
  loads no model and trains nothing. To keep the two paths equal, the first single-run line also
  goes through the real entry point with ``--cfg job`` appended, and the config it prints must
  equal the one composed here. Multirun lines (``-m``): Hydra refuses ``--cfg`` together with
  ``--multirun``, so ``-m`` is dropped and the command-line sweep is expanded as Hydra's basic
  sweeper does (the product of the comma lists); every combination is composed. A search whose
  space is in a config (``hparams_search=...``) composes as one run, and each key of its
  ``hydra.sweeper.params`` must exist in the composed config.
* ``lightning-lora-enqueue ...``: arguments parsed, and the job assembled and validated by the
  CLI's own functions (``build_parser``, ``job_from_args``, ``parse_job``); the publishing step is
  left out because it needs a broker and changes its queues. ``--file job.json`` reads the
  README's JSON message (which must itself be a valid job).
* ``lightning-lora-generate ...``, ``lightning-lora-tools ...`` and ``python -m benchmarks ...``:
  arguments parsed by the CLI's own parser (bench ``--case`` specs by ``parse_case`` too). Running
  them would load SD1.5, read LoRA files the README only names, or time training steps for
  minutes.
* Every ``lightning-lora-*`` entry point named anywhere in those files (also those shown only in
  the text, such as ``lightning-lora-sweep-report``): its console script must be installed next
  to the interpreter, and ``--help`` must exit 0 and print something. ``--help`` is called in
  this process through the installed entry-point object (the script does only
  ``sys.exit(main())``), because generate and bench import torch before parsing (~10 s each).
* ``make TARGET ...``: ``make -n`` (prints the recipe, runs nothing); each ``lightning-lora-*``
  command the recipe would run is then checked as above (``make demo`` composes
  ``experiment=demo``).
* Not run, each for the reason given in ``NOT_RUN``: shell set-up (``cp``, ``$EDITOR``, ``set``,
  ``.``), broker administration (``rabbitmqctl``: it would change the shared broker), installs,
  and the GPU benchmark script. A command of any other kind fails the test: a new kind of line
  must be given a check here.

Besides the command lines: the backend-side receiver snippet must accept a webhook signed by
the real client and refuse a tampered one, ``.env.example`` must be a valid worker environment
whose every variable the README documents, and the "Repository layout" block must name every
subpackage and top-level module of the package (and nothing that does not exist).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"
WORKER_YAML = ROOT / "lightning_lora" / "configs" / "worker.yaml"
SHELL_LANGS = frozenset({"bash", "sh", "shell", "console"})
OPERATORS = frozenset({"&&", "||", ";", "|", "&"})
SUBPROCESS_TIMEOUT_S = 300
# the two settings the worker refuses to start without (values as in .env.example)
REQUIRED_ENV = {"INTERNAL_API_TOKEN": "change-me", "WEBHOOK_ALLOWLIST": "backend:8000"}

ENTRY_POINTS = (
    "lightning-lora-train",
    "lightning-lora-worker",
    "lightning-lora-enqueue",
    "lightning-lora-generate",
    "lightning-lora-sweep-report",
    "lightning-lora-tools",
)
MODULES = {
    "lightning_lora.tools.train": "lightning-lora-train",
    "lightning_lora.worker.cli": "lightning-lora-worker",
    "lightning_lora.worker.enqueue": "lightning-lora-enqueue",
    "lightning_lora.tools.generate": "lightning-lora-generate",
    "lightning_lora.tools.sweep_report": "lightning-lora-sweep-report",
    "lightning_lora.tools.lora_tools": "lightning-lora-tools",
}
# ``python -m`` modules of the repository that no console script runs (not installed)
REPO_MODULES = {"benchmarks": "bench", "benchmarks.bench": "bench"}
HYDRA_APPS = frozenset({"lightning-lora-train"})
NOT_RUN = {
    "cp": "shell set-up: writes a local .env",
    "$EDITOR": "shell set-up: interactive",
    "set": "shell set-up: exports the .env",
    ".": "shell set-up: sources the .env",
    "source": "shell set-up: sources the .env",
    "rabbitmqctl": "broker administration: would change the shared broker's settings",
    "pip": "installs packages",
    "benchmarks/gpu_run.sh": "the GPU benchmark run (minutes on an H200)",
}
OUTDATED_WORKER_LINE = (
    ".venv/bin/lightning-lora-worker "
    "'train_overrides=[callbacks=production,trainer.precision=bf16-mixed]'"
)

_FENCE_RE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
_COMMENT_COMMAND_RE = re.compile(
    r"^\s*#\s+((?:\S*/)?(?:lightning-lora-[a-z-]+|python3? -m lightning_lora\S*)(?:\s.*)?)$"
)
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_ENTRY_NAME_RE = re.compile(r"(?<![\w-])lightning-lora-[a-z]+(?:-[a-z]+)*")


# ------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class DocLine:
    """A command line as the docs show it."""

    where: str
    text: str


@dataclass(frozen=True)
class Command:
    """One simple command of a doc line: its environment prefix and its words."""

    where: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def entry_point(self) -> str | None:
        """The ``lightning-lora-*`` entry point this command runs, if any."""
        name = Path(self.argv[0]).name
        if name in ENTRY_POINTS:
            return name
        if re.fullmatch(r"python3?(\.\d+)?", name) and self.argv[1:2] == ("-m",):
            return MODULES.get(self.argv[2]) if len(self.argv) > 2 else None
        return None

    @property
    def args(self) -> tuple[str, ...]:
        """The arguments after the program (after ``-m module`` for ``python -m``)."""
        name = Path(self.argv[0]).name
        return self.argv[3:] if name.startswith("python") else self.argv[1:]

    @property
    def kind(self) -> str:
        """``train``, ``worker``, ... , ``make``, ``not-run`` or ``unknown``."""
        entry = self.entry_point
        if entry is not None:
            return entry.removeprefix("lightning-lora-")
        name = Path(self.argv[0]).name
        python_m = re.fullmatch(r"python3?(\.\d+)?", name) and self.argv[1:2] == ("-m",)
        if python_m and len(self.argv) > 2 and self.argv[2] in REPO_MODULES:
            return REPO_MODULES[self.argv[2]]
        if name == "make":
            return "make"
        if self.argv[0] in NOT_RUN:
            return "not-run"
        return "unknown"

    def __str__(self) -> str:
        words = [f"{k}={v}" for k, v in self.env] + list(self.argv)
        return f"{self.where}: {shlex.join(words)}"


def shell_lines_of_markdown(text: str, name: str) -> list[DocLine]:
    """The command lines of a markdown text's shell code blocks (continuations joined)."""
    lines: list[DocLine] = []
    lang: str | None = None
    pending, pending_at = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        fence = _FENCE_RE.match(raw)
        if fence and lang is None:
            lang = fence.group(1).lower()
            continue
        if fence and not fence.group(1):
            lang = None
            continue
        if lang not in SHELL_LANGS:
            continue
        line = raw.strip()
        if not pending:
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            pending_at = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(DocLine(f"{name}:{pending_at}", pending + line))
        pending = ""
    return lines


def comment_commands(text: str, name: str) -> list[DocLine]:
    """Example command lines in ``#`` comments (``#   lightning-lora-worker ...``)."""
    found: list[DocLine] = []
    pending, pending_at = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if pending:  # a continuation: the next comment line, whatever it starts with
            line = raw.strip().removeprefix("#").strip()
        else:
            match = _COMMENT_COMMAND_RE.match(raw)
            if not match:
                continue
            line, pending_at = match.group(1).strip(), number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        found.append(DocLine(f"{name}:{pending_at}", pending + line))
        pending = ""
    return found


def split_commands(line: DocLine) -> list[Command]:
    """Split a doc line into its simple commands, as the shell would."""
    commands: list[Command] = []
    words = shlex.split(line.text, comments=True)
    for is_operator, group in itertools.groupby(words, lambda word: word in OPERATORS):
        if is_operator:
            continue
        tokens = list(group)
        env: list[tuple[str, str]] = []
        while tokens and _ASSIGNMENT_RE.match(tokens[0]):
            key, value = tokens.pop(0).split("=", 1)
            env.append((key, value))
        if tokens:
            commands.append(Command(line.where, tuple(tokens), tuple(env)))
    return commands


def commands_of(readme: str, env_example: str, worker_yaml: str) -> list[Command]:
    """Every command the three files show, in order."""
    lines = [
        *shell_lines_of_markdown(readme, "README.md"),
        *comment_commands(env_example, ".env.example"),
        *comment_commands(worker_yaml, "lightning_lora/configs/worker.yaml"),
    ]
    return [command for line in lines for command in split_commands(line)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


DOC_TEXTS = (_read(README), _read(ENV_EXAMPLE), _read(WORKER_YAML))
COMMANDS = commands_of(*DOC_TEXTS)


def _of_kind(kind: str, commands: Iterable[Command] = COMMANDS) -> list[Command]:
    return [c for c in commands if c.kind == kind]


def _ids(commands: Sequence[Command]) -> list[str]:
    return [f"{c.where}:{' '.join(c.args)[:50]}" for c in commands]


def _unique_by_args(commands: Iterable[Command]) -> list[Command]:
    seen: dict[tuple[str, ...], Command] = {}
    for command in commands:
        seen.setdefault(command.args, command)
    return list(seen.values())


def _readme_block(lang: str, containing: str) -> str:
    """The first README code block in ``lang`` whose text contains ``containing``."""
    pattern = re.compile(rf"^```{lang}\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(DOC_TEXTS[0]):
        if containing in match.group(1):
            return match.group(1)
    raise AssertionError(f"README.md has no ```{lang} block containing {containing!r}")


# ------------------------------------------------------------------------------ checks


def _config_dir() -> Path:
    from lightning_lora.config import CONFIG_DIR

    return Path(CONFIG_DIR)


def compose_train(*runs: Sequence[str]) -> list[DictConfig]:
    """Compose ``configs/train.yaml`` with the ``hydra`` node, as ``--cfg`` does, once per run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3"):
            return [
                compose(config_name="train", overrides=list(run), return_hydra_config=True)
                for run in runs
            ]
    finally:
        GlobalHydra.instance().clear()


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The runs of a command-line sweep: the product of its comma lists (the basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([str(override.input_line)])
    return [list(run) for run in itertools.product(*choices)]


def assert_overrides_applied(overrides: Sequence[str], cfg: DictConfig, where: str) -> None:
    """Every ``key=value`` override (not a group choice) holds its value in ``cfg``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config_dir = _config_dir()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        group = "/" in key or (config_dir / key).is_dir()
        if group or override.is_delete() or override.is_sweep_override() or override.package:
            continue
        if key.startswith("hydra.") and "hydra" not in cfg:
            continue
        got = OmegaConf.select(cfg, key, default="<missing>")
        if isinstance(got, DictConfig | ListConfig):
            got = OmegaConf.to_container(got)
        assert got == override.value(), f"{where}: {override.input_line} gave {key}={got!r}"


def check_train_line(command: Command) -> int:
    """Compose every run of a ``lightning-lora-train`` line; return how many runs."""
    args = list(command.args)
    multirun = bool({"-m", "--multirun"} & set(args))
    args = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in args if a.startswith("-")]
    assert not flags, f"{command}: no check for the Hydra flags {flags}"
    runs = expand_sweep(args) if multirun else [args]
    for run, cfg in zip(runs, compose_train(*runs), strict=True):
        assert_overrides_applied(run, cfg, command.where)
        for key in OmegaConf.select(cfg, "hydra.sweeper.params") or {}:
            # the key must exist (a default of null, e.g. module.snr_gamma, is fine)
            found = OmegaConf.select(cfg, str(key), default="<missing>")
            assert found != "<missing>", f"{command}: searches {key}"
    return len(runs)


def check_enqueue_line(command: Command) -> dict[str, Any]:
    """Build and validate the job (or cancel) an enqueue line would publish, without publishing."""
    from lightning_lora.clients.contract import check_style_id
    from lightning_lora.worker.enqueue import build_parser, job_from_args
    from lightning_lora.worker.messages import parse_job

    args = build_parser().parse_args(list(command.args))
    if args.cancel is not None:
        return {"cancel": check_style_id(args.cancel)}
    job = job_from_args(args)
    parse_job(json.dumps(job).encode("utf-8"), max_images=args.max_images)
    return job


def _entry_point_module(name: str) -> Any:
    """The module an installed console script runs (``pyproject.toml``'s ``[project.scripts]``)."""
    (entry,) = entry_points(group="console_scripts", name=name)
    return importlib.import_module(entry.module)


def check_generate_line(command: Command) -> None:
    """Parse a generate line with the CLI's parser (its own checks included)."""
    _entry_point_module("lightning-lora-generate")._parse_args(list(command.args))


def check_tools_line(command: Command) -> None:
    """Parse a LoRA-tools line with the CLI's parser (its subcommands and their options)."""
    _entry_point_module("lightning-lora-tools")._parser().parse_args(list(command.args))


def check_bench_line(command: Command) -> None:
    """Parse a bench line and each of its ``--case`` specs."""
    from benchmarks import bench

    args = bench.build_parser().parse_args(list(command.args))
    for spec in args.case:
        bench.parse_case(spec)


CHECKS: dict[str, Callable[[Command], Any]] = {
    "train": check_train_line,
    "enqueue": check_enqueue_line,
    "generate": check_generate_line,
    "tools": check_tools_line,
    "bench": check_bench_line,
}


def worker_run_argv(command: Command) -> tuple[str, ...]:
    """What the test runs for a worker line: the installed script with ``--print-config``."""
    return (str(BIN / "lightning-lora-worker"), *command.args, "--print-config")


def check_worker_run(command: Command, proc: subprocess.CompletedProcess[str]) -> None:
    """The worker composed the line's config, and the line's settings pass the start check."""
    from lightning_lora.worker.app import split_config
    from lightning_lora.worker.broker import BrokerSettings
    from lightning_lora.worker.settings import load_settings

    assert proc.returncode == 0, (
        f"{command} --print-config exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
    cfg = OmegaConf.create(proc.stdout)
    assert isinstance(cfg, DictConfig) and "worker" in cfg, f"{command}: no worker section"
    assert_overrides_applied(worker_overrides(command.args), cfg, command.where)
    env = {**REQUIRED_ENV, **dict(command.env)}
    _, section = split_config(cfg)
    load_settings(section, env=env)
    BrokerSettings.from_env(env)


def worker_overrides(args: Sequence[str]) -> list[str]:
    """The Hydra overrides of a worker line: its words minus the flags (and ``--log-level L``)."""
    overrides, skip = [], False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg == "--log-level"
            continue
        overrides.append(arg)
    return overrides


def _run(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", **env},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def _outdated_command() -> Command:
    """The one new command of a scratch README holding the removed ``train_overrides`` form."""
    readme = DOC_TEXTS[0]
    block = _readme_block("bash", "lightning-lora-worker")
    scratch = readme.replace(block, block + OUTDATED_WORKER_LINE + "\n", 1)
    before = {c.argv for c in commands_of(*DOC_TEXTS)}
    added = [c for c in commands_of(scratch, *DOC_TEXTS[1:]) if c.argv not in before]
    assert added, f"the docs already show the removed form: {OUTDATED_WORKER_LINE}"
    assert len(added) == 1 and added[0].kind == "worker", added
    return added[0]


def _first_single_train_line() -> Command:
    for command in _of_kind("train"):
        if not {"-m", "--multirun"} & set(command.args):
            return command
    raise AssertionError("the docs show no single-run lightning-lora-train line")


Runs = dict[tuple[str, ...], "concurrent.futures.Future[subprocess.CompletedProcess[str]]"]


@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Start every subprocess of this module, two at a time (this machine has two cores)."""
    cwd = tmp_path_factory.mktemp("entry_points")
    jobs: dict[tuple[str, ...], dict[str, str]] = {}
    train = _first_single_train_line()
    jobs[(str(BIN / "lightning-lora-train"), *train.args, "--cfg", "job")] = {}
    for command in _unique_by_args(_of_kind("worker")):
        jobs.setdefault(worker_run_argv(command), dict(command.env))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="doc-cmd")
    try:
        yield {argv: pool.submit(_run, argv, cwd, env) for argv, env in jobs.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module", autouse=True)
def _start_entry_point_runs(request: pytest.FixtureRequest) -> None:
    """Start the subprocesses before the in-process checks, so that the two overlap."""
    if any("entry_point_runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("entry_point_runs")


# ------------------------------------------------------------------------------ the tests


def test_every_doc_command_has_a_check() -> None:
    kinds = {c.kind for c in COMMANDS}
    unknown = [str(c) for c in COMMANDS if c.kind == "unknown"]
    assert not unknown, "no check for these doc commands (add one, or to NOT_RUN):\n" + "\n".join(
        unknown
    )
    assert {"train", "worker", "enqueue", "generate", "tools", "bench", "make"} <= kinds, kinds
    sources = {c.where.split(":")[0] for c in _of_kind("worker")}
    assert sources == {"README.md", ".env.example", "lightning_lora/configs/worker.yaml"}, sources


@pytest.mark.parametrize("command", _of_kind("train"), ids=_ids(_of_kind("train")))
def test_train_line_composes(command: Command) -> None:
    assert check_train_line(command) >= 1


def test_train_entry_point_prints_the_config_composed_here(
    entry_point_runs: Runs,
) -> None:
    command = _first_single_train_line()
    argv = (str(BIN / "lightning-lora-train"), *command.args, "--cfg", "job")
    proc = entry_point_runs[argv].result()
    assert proc.returncode == 0, f"{command} --cfg job:\n{proc.stderr[-3000:]}"
    printed = OmegaConf.to_container(OmegaConf.create(proc.stdout))
    (here,) = compose_train(command.args)
    with open_dict(here):
        del here["hydra"]
    assert printed == OmegaConf.to_container(here)


@pytest.mark.parametrize(
    "command", _unique_by_args(_of_kind("worker")), ids=_ids(_unique_by_args(_of_kind("worker")))
)
def test_worker_line_runs_through_the_entry_point(
    command: Command,
    entry_point_runs: Runs,
) -> None:
    proc = entry_point_runs[worker_run_argv(command)].result()
    check_worker_run(command, proc)
    for same in _of_kind("worker"):  # the same arguments with another environment
        if same.args == command.args and same.env:
            check_worker_run(same, proc)


def test_an_outdated_worker_line_fails(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_lora.worker.cli import main

    command = _outdated_command()
    argv = worker_run_argv(command)
    code = main(list(argv[1:]))  # what the script runs, in this process to save ~10 s
    out, err = capsys.readouterr()
    proc = subprocess.CompletedProcess(list(argv), code, out, err)
    assert code == 2 and "invalid arguments" in err, err[-2000:]
    with pytest.raises(AssertionError, match="exited 2"):
        check_worker_run(command, proc)


@pytest.mark.parametrize("command", _of_kind("enqueue"), ids=_ids(_of_kind("enqueue")))
def test_enqueue_line_builds_a_valid_job(
    command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "job.json").write_text(_readme_block("json", '"style_id"'), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    job = check_enqueue_line(command)
    assert job.get("cancel") or (job["style_id"] and job["image_urls"] and job["webhook_url"])


def test_readme_message_is_a_valid_job() -> None:
    from lightning_lora.worker.messages import job_settings, parse_job

    job = parse_job(_readme_block("json", '"style_id"').encode("utf-8"))
    assert job_settings(job)["trainer.max_epochs"] == job.num_epochs


@pytest.mark.parametrize(
    "command",
    _of_kind("generate") + _of_kind("tools") + _of_kind("bench"),
    ids=_ids(_of_kind("generate") + _of_kind("tools") + _of_kind("bench")),
)
def test_generate_and_bench_lines_parse(command: Command) -> None:
    CHECKS[command.kind](command)


@pytest.mark.parametrize("command", _of_kind("make"), ids=_ids(_of_kind("make")))
def test_make_line_dry_runs(command: Command) -> None:
    make = shutil.which("make")
    assert make, "make is not installed"
    proc = _run([make, "-n", *command.args], ROOT, dict(command.env))
    assert proc.returncode == 0, f"{command}: make -n:\n{proc.stderr[-2000:]}"
    recipe = [
        c
        for line in proc.stdout.splitlines()
        if "lightning-lora-" in line
        for c in split_commands(DocLine(f"{command.where} (make -n)", line))
    ]
    for inner in recipe:
        if inner.kind in CHECKS:
            CHECKS[inner.kind](inner)
    if command.args[:1] == ("demo",):
        assert [c.kind for c in recipe] == ["train"], proc.stdout


def _named_entry_points() -> list[str]:
    return sorted({m for text in DOC_TEXTS for m in _ENTRY_NAME_RE.findall(text)})


@pytest.mark.parametrize("name", _named_entry_points())
def test_named_entry_point_is_installed_and_answers_help(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    declared = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert name in declared, f"the docs name {name}, which pyproject.toml does not declare"
    assert (BIN / name).is_file(), f"{name} is not installed in {BIN}"
    main = declared[name].load()
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with pytest.raises(SystemExit) as exited:
            main() if name in HYDRA_APPS else main(["--help"])
    finally:  # Hydra's app installs a handler on this test's captured stdout: take it back
        root.handlers[:] = handlers
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out.strip()


def test_receiver_snippet_accepts_the_client_and_refuses_a_forgery() -> None:
    from lightning_lora.clients.webhook_client import WebhookClient, verify_webhook
    from tests.support.receiver import WebhookReceiver

    namespace: dict[str, Any] = {}
    exec(compile(_readme_block("python", "def signature_ok"), "README.md", "exec"), namespace)
    handle = namespace["handle"]
    for secret in ("a plain shared secret", "whsec_c2VjcmV0IGtleSBieXRlcw=="):
        with WebhookReceiver() as receiver:  # what really goes over the wire
            client = WebhookClient(receiver.base_url, token="tok", signing_secret=secret)
            meta = {"training_epochs": 1, "lora_rank": 4, "lora_alpha": 4}
            for _ in range(2):  # a retry of the same event
                assert client.send_complete(7, "s3://bucket/models/x", meta, event_id="evt_7")
            sent = [(r.headers, r.body) for r in receiver.requests]
        assert len(sent) == 2
        seen: set[str] = set()
        for headers, body in sent:
            assert verify_webhook(secret, headers, body)
            assert handle(secret, headers, body, seen) == 200
        assert seen == {"evt_7"}
        headers, body = sent[0]
        assert handle(secret, headers, body.replace(b"models/x", b"models/y"), set()) == 401
        assert handle("whsec_d3Jvbmcga2V5", headers, body, set()) == 401  # another key


def _env_example_names() -> list[str]:
    pattern = re.compile(r"^#?\s*([A-Z][A-Z0-9_]+)=", re.MULTILINE)
    return pattern.findall(DOC_TEXTS[1])


def test_env_example_is_a_valid_worker_environment(tmp_path: Path) -> None:
    from lightning_lora.worker.broker import BrokerSettings
    from lightning_lora.worker.logs import LOG_FORMATS
    from lightning_lora.worker.settings import load_settings

    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    bash = shutil.which("bash")
    assert bash
    proc = subprocess.run(
        [bash, "-c", "set -a && . ./.env && set +a && env -0"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    env = dict(item.split("=", 1) for item in proc.stdout.split("\0") if "=" in item)
    settings = load_settings({}, env=env)
    assert settings.webhook_allowlist and settings.log_format in LOG_FORMATS
    BrokerSettings.from_env(env)
    undocumented = [name for name in _env_example_names() if f"`{name}`" not in DOC_TEXTS[0]]
    assert not undocumented, f".env.example sets variables the README omits: {undocumented}"


def _layout_block() -> str:
    """The "Repository layout" code block of the README."""
    return DOC_TEXTS[0].split("## Repository layout", 1)[1].split("```", 2)[1]


def test_layout_section_matches_the_tree() -> None:
    """The layout block names every subpackage and top-level module, and nothing that is not."""
    block = _layout_block()
    assert len(block.strip().splitlines()) <= 30, "the layout block is a map, not a listing"
    package = ROOT / "lightning_lora"
    folder = ROOT
    for line in block.splitlines():
        head = re.match(r"^(\s*)([\w.-]+)/(?=\s)", line)
        rest = line
        if head:  # a line that starts with a folder: the names after it live in it
            name = head.group(2)
            folder = package / name if head.group(1) else ROOT / name
            assert folder.is_dir(), f"the layout names {name}/, which does not exist"
            rest = line[head.end() :]
        pattern = r"(?<![\w/.-])([\w.-]+\.(?:py|yaml|sh|md)|[\w-]+/)(?=[\s,)]|$)"
        for name in re.findall(pattern, rest):
            assert (folder / name).exists(), f"the layout names {folder.name}/{name}: not there"
    parts = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in package.iterdir()
        if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py")
    )
    missing = [name for name in parts if name != "__init__.py" and name not in block]
    assert not missing, f"the layout block omits {missing}"
