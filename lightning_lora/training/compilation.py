"""``torch.compile`` of the UNet: whole-model or regional, and a compile cache shared by a fleet.

Compile modes (``module.compile_mode``):

* ``none``: eager.
* ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``: ``torch.compile(unet, mode)``
  of the whole UNet, wrapped once per process (:func:`compiled_unet`).
* ``regional``: the UNet's repeated blocks are compiled in place and the UNet around them runs
  eagerly. The blocks are the ones diffusers declares for the model (``_repeated_blocks``,
  compiled by ``ModelMixin.compile_repeated_blocks``: the ``BasicTransformerBlock`` of
  ``UNet2DConditionModel``) plus ``module.compile_extra_blocks`` (e.g. ``ResnetBlock2D``). One
  graph serves every block of a class and shape, so the compile is a fraction of the
  whole model's.

The compile cache (``module.compile_cache_dir``): a persistent Inductor cache folder
(``<dir>/inductor``, set as ``TORCHINDUCTOR_CACHE_DIR`` before anything compiles), so a restarted
worker on the same machine finds its kernels on disk, and, where torch has them
(``torch.compiler.save_cache_artifacts``/``load_cache_artifacts``, torch >= 2.7), portable
artifacts in ``<dir>/artifacts/<key>.bin`` keyed by the torch version, the device, the compile
mode, the model and LoRA configs and the UNet's input shapes: a folder shared by a fleet (or
synced to object storage) lets a new machine load the kernels another one compiled.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from weakref import WeakSet

import torch
from diffusers.models.modeling_utils import ModelMixin

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "regional")
WHOLE_MODEL_MODES = ("default", "reduce-overhead", "max-autotune")
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

_COMPILED: dict[tuple[int, str], Callable[..., Any]] = {}
#: Models whose blocks were compiled in place (regional).
_REGIONAL: WeakSet[torch.nn.Module] = WeakSet()
#: Artifact files this process has loaded (or looked for): a warm worker's next job skips them.
_LOADED: set[str] = set()
#: Artifact file -> graphs compiled in this process when it was last saved.
_SAVED_AT: dict[str, int] = {}


def compiled_unet(
    unet: torch.nn.Module, mode: str | None, extra_blocks: Sequence[str] = ()
) -> Callable[..., Any]:
    """Return the UNet to call for a compile mode (compiled once per process).

    Args:
        unet: The UNet with its LoRA adapter.
        mode: One of :data:`COMPILE_MODES` (``None`` is ``none``).
        extra_blocks: Block class names compiled besides the model's ``_repeated_blocks``
            (``regional`` only).

    Returns:
        A callable with the UNet's signature: the UNet itself (``none``, ``regional``) or its
        ``torch.compile`` wrapper.

    Raises:
        ValueError: On an unknown mode.
    """
    if mode not in (None, False, *COMPILE_MODES):
        raise ValueError(f"unknown compile_mode {mode!r}; expected one of {COMPILE_MODES}")
    if mode != "regional" and unet in _REGIONAL:
        uncompile_regions(unet)  # a run without regional compile in the same process
    if mode in (None, "none", False):
        return unet
    key = (id(unet), mode)
    if key not in _COMPILED:
        if mode == "regional":
            compile_regions(unet, extra_blocks)
            _COMPILED[key] = unet
        else:
            _COMPILED[key] = torch.compile(unet, mode=mode)
    return _COMPILED[key]


def compile_regions(unet: torch.nn.Module, extra_blocks: Sequence[str] = ()) -> dict[str, int]:
    """Compile the UNet's repeated blocks in place (regional compilation).

    Args:
        unet: A diffusers model (``ModelMixin.compile_repeated_blocks``).
        extra_blocks: More block class names to compile (``nn.Module.compile`` each instance).

    Returns:
        How many blocks of each class were compiled.
    """
    declared = list(getattr(unet, "_repeated_blocks", None) or [])
    if declared:
        assert isinstance(unet, ModelMixin), "_repeated_blocks is declared by diffusers models"
        unet.compile_repeated_blocks()
    extra = [name for name in extra_blocks if name not in declared]
    counts: dict[str, int] = {}
    for module in unet.modules():
        name = type(module).__name__
        if name in extra:
            module.compile()
        if name in declared or name in extra:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise ValueError(
            f"regional compilation found no blocks to compile in {type(unet).__name__} "
            f"(declared {declared}, extra {list(extra_blocks)})"
        )
    _REGIONAL.add(unet)
    log.info("regional compilation of %s", ", ".join(f"{n} {k}" for k, n in counts.items()))
    return counts


def uncompile_regions(unet: torch.nn.Module) -> None:
    """Undo :func:`compile_regions`: every block runs its eager forward again."""
    for module in unet.modules():
        # nn.Module.compile() keeps the compiled call here; None is the eager module's value
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    _REGIONAL.discard(unet)
    _COMPILED.pop((id(unet), "regional"), None)


@contextlib.contextmanager
def eager(unet: torch.nn.Module) -> Iterator[None]:
    """Run a regionally compiled UNet eagerly inside the block (no compile for eval shapes)."""
    if unet in _REGIONAL:
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


# --------------------------------------------------------------------------------- compile cache
def has_portable_artifacts() -> bool:
    """Whether this torch can save and load portable compile artifacts."""
    compiler = getattr(torch, "compiler", None)
    return hasattr(compiler, "save_cache_artifacts") and hasattr(compiler, "load_cache_artifacts")


def device_signature(device: torch.device) -> str:
    """The compile target: the GPU's name and capability, or the CPU's architecture."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor} cuda{torch.version.cuda}"
    return f"{device.type} {platform.machine()}"


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (-1 when unknown)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return -1
    return int(counters["stats"]["unique_graphs"])


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype), value.is_contiguous()]
    return repr(value)


def _canonical(value: Any) -> Any:
    """A JSON-able form that is the same in every process (sets sorted, enums by value)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, set | frozenset):
        return sorted(str(_canonical(v)) for v in value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    to_dict = getattr(value, "to_dict", None)
    return _canonical(to_dict()) if callable(to_dict) else str(value)


class CompileCache:
    """A compile cache folder: Inductor's on-disk caches and the portable artifacts.

    Args:
        root: The folder (created); ``<root>/inductor`` becomes ``TORCHINDUCTOR_CACHE_DIR``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.inductor_dir = self.root / "inductor"
        self.artifacts_dir = self.root / "artifacts"
        self.key: str | None = None
        self.loaded: str | None = None

    def activate(self) -> None:
        """Point Inductor at ``<root>/inductor`` (before anything compiles in this process).

        Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it needs the folder; its in-memory
        caches of the previous folder are cleared when it changes (as
        ``torch._inductor.utils.temporary_cache_dir`` does).
        """
        self.inductor_dir.mkdir(parents=True, exist_ok=True)
        target = str(self.inductor_dir)
        if os.environ.get(INDUCTOR_CACHE_ENV) == target:
            return
        previous = os.environ.get(INDUCTOR_CACHE_ENV)
        os.environ[INDUCTOR_CACHE_ENV] = target
        with contextlib.suppress(Exception):  # torch without Inductor: nothing cached in memory
            from torch._inductor.utils import clear_caches

            clear_caches()
        log.info("compile cache: %s (%s was %s)", target, INDUCTOR_CACHE_ENV, previous)

    def artifact_key(
        self,
        mode: str,
        model: torch.nn.Module,
        inputs: Sequence[Any],
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The artifact key of one compiled call: torch, device, mode, model and input shapes.

        Args:
            mode: The compile mode.
            model: The compiled model (its ``config``, LoRA config, training flags and dtype).
            inputs: The call's arguments (tensors by shape, dtype and contiguity).
            extra: More that changes the graphs (e.g. ``channels_last``).

        Returns:
            ``<mode>-<16 hex digits>``; the full description is written beside the artifacts.
        """
        param = next(model.parameters())
        peft = getattr(model, "peft_config", {}) or {}
        description = {
            "torch": torch.__version__,
            "device": device_signature(param.device),
            "mode": mode,
            "config": _canonical(dict(getattr(model, "config", {}) or {})),
            "lora": _canonical(dict(peft)),
            "training": model.training,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "dtype": str(param.dtype),
            "grad_enabled": torch.is_grad_enabled(),
            "autocast": (
                str(torch.get_autocast_dtype(param.device.type))
                if torch.is_autocast_enabled(param.device.type)
                else None
            ),
            "inputs": [_describe(v) for v in inputs],
            **_canonical(extra or {}),
        }
        text = json.dumps(description, sort_keys=True, default=str)
        key = f"{mode}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        self.key = key
        self._description = description
        return key

    def artifact_path(self, key: str) -> Path:
        """The artifact file of a key."""
        return self.artifacts_dir / f"{key}.bin"

    def load(self, key: str) -> bool:
        """Load a key's artifacts into Inductor's caches (before the compile that needs them).

        Once per process and file: a warm worker's next job finds them loaded already. The
        cache folder is activated first, since the artifacts go into the folder Inductor uses.

        Returns:
            Whether artifacts were found and loaded (now or earlier in this process).
        """
        path = self.artifact_path(key)
        if str(path) in _LOADED:
            return self.loaded == key
        _LOADED.add(str(path))
        self.activate()  # the artifacts are written into the Inductor folder in use
        if not has_portable_artifacts() or not path.is_file():
            log.info("compile cache: no artifacts for %s", key)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as exc:  # a stale or foreign file must not stop training
            log.warning("compile cache: could not load %s: %r", path, exc)
            return False
        self.loaded = key
        log.info("compile cache: loaded %s (%s)", path, _summary(info))
        return True

    def save(self) -> Path | None:
        """Write this process's compile artifacts for the current key (atomically).

        An existing file is replaced only by a larger one (a process that found everything in the
        cache records less than the one that compiled). Nothing is serialised when no graph was
        compiled since this process last saved the file (a warm worker's next job).

        Returns:
            The file written, or ``None`` (no key, nothing new, or torch without artifacts).
        """
        if self.key is None or not has_portable_artifacts():
            return None
        path = self.artifact_path(self.key)
        graphs = _graphs_compiled()
        if graphs >= 0 and _SAVED_AT.get(str(path)) == graphs:
            return None
        _SAVED_AT[str(path)] = graphs
        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return None
        blob, info = saved
        if path.is_file() and path.stat().st_size >= len(blob):
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        description = path.with_suffix(".json")
        description.write_text(
            json.dumps(getattr(self, "_description", {}), indent=2, default=str), encoding="utf-8"
        )
        log.info("compile cache: saved %s (%d bytes, %s)", path, len(blob), _summary(info))
        return path


def _summary(info: Any) -> str:
    artifacts = getattr(info, "artifacts", None) or {}
    return ", ".join(f"{kind} {len(items)}" for kind, items in artifacts.items()) or "empty"
