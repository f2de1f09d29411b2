"""LoHa and LoKr in LyCORIS keys (A1111, ComfyUI, kohya through ``lycoris.kohya``), both ways.

PEFT names the LoHa and LoKr tensors as LyCORIS does (``hada_w1_a``, ``lokr_w1``, ...), so a
module's tensors keep their suffix and take kohya's module stem (``lora_unet_`` + the diffusers
module name with ``_`` for ``.``), plus the module's ``.alpha``. The one difference is the scale:

- PEFT scales every LoHa/LoKr update by ``alpha / r``; the loaders by ``alpha / dim`` where
  ``dim`` is the rank of a factored matrix (``hada_w1_b``, ``lokr_w2_b`` or ``lokr_w1_b``).
- A LoKr module whose two Kronecker matrices are both full (PEFT's choice when ``r`` is at least
  half of the factored dimensions, as on the tiny model or with a large rank) has no ``dim``:
  every loader applies it at scale 1.
- LyCORIS' merge path (``merge_to``, sd-scripts' ``--network_merge``) applies ``alpha / dim``
  twice to LoHa and LoKr, its forward path once.

So the PEFT scale is folded into the first factor (``hada_w1_a``, ``lokr_w1`` or ``lokr_w1_a``)
and ``alpha`` is written equal to ``dim``: scale 1 on every path of every loader (the readings
of A1111's, ComfyUI's and LyCORIS' code are in ``tests/support/consumer_loaders.py``).
:func:`peft_state_from_lycoris` reads files of any alpha back at the loaders' scale.

PEFT's effective-conv2d (Tucker) layout differs from LyCORIS' ``hada_t1``/``lokr_t2`` one and is
not used (``use_effective_conv2d`` stays off): a 3x3 convolution's factors are flattened
``(r, in * 3 * 3)`` matrices, which every loader reshapes to the weight.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig
from peft.tuners.lokr.layer import factorization
from peft.utils import set_peft_model_state_dict

from lightning_lora.lora.networks import NetworkConfig, module_rank_alpha, module_scale

#: The tensor names of a LoHa module (Tucker ``hada_t1``/``hada_t2`` are not written).
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: The tensor names of a LoKr module (either ``lokr_w1`` or its factors, the same for ``w2``).
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("hada_t1", "hada_t2", "lokr_t2")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def is_lycoris_key(key: str) -> bool:
    """Whether a state-dict key is a LoHa or LoKr tensor (by its last name)."""
    return key.rsplit(".", 1)[-1] in (*LOHA_KEYS, *LOKR_KEYS, *TUCKER_KEYS)


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, name = key.rsplit(".", 1)
        grouped.setdefault(module, {})[name] = tensor
    return grouped


def lycoris_state_dict(
    peft_state_dict: Mapping[str, torch.Tensor], config: NetworkConfig, component: str = "unet"
) -> dict[str, torch.Tensor]:
    """One component's PEFT LoHa/LoKr state dict in LyCORIS keys, at the loaders' scale.

    Args:
        peft_state_dict: ``get_peft_model_state_dict(model)`` (``<module>.<tensor name>``).
        config: The component's ``LoHaConfig`` or ``LoKrConfig``.
        component: ``unet`` or ``text_encoder``.

    Returns:
        ``<stem>.<tensor name>`` and ``<stem>.alpha`` tensors.

    Raises:
        ValueError: A Tucker tensor, a key of another kind, or an unknown component.
    """
    if component not in PREFIXES:
        raise ValueError(f"component must be one of {sorted(PREFIXES)}, got {component!r}")
    out: dict[str, torch.Tensor] = {}
    for module, tensors in _modules(peft_state_dict).items():
        unknown = sorted(set(tensors) - set(LOHA_KEYS) - set(LOKR_KEYS))
        if unknown:
            raise ValueError(f"{module}.{unknown[0]}: not a LoHa/LoKr tensor LyCORIS files hold")
        stem = PREFIXES[component] + module.replace(".", "_")
        rank = module_rank_alpha(config, module)[0]
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        first = next(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in tensors)
        tensors[first] = tensors[first] * module_scale(config, module)  # alpha = dim below
        for name, tensor in tensors.items():
            out[f"{stem}.{name}"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(_file_dim(tensors) or rank))
    return out


def _file_dim(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank the loaders divide alpha by (``None``: LoKr of two full matrices, scale 1)."""
    for key in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in tensors:
            return int(tensors[key].shape[0])
    return None


def _module_names(model: torch.nn.Module) -> dict[str, str]:
    """Kohya stem (without prefix) -> module name, for every Linear and Conv2d of ``model``."""
    return {
        name.replace(".", "_"): name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def _lokr_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    if "lokr_w1_b" in tensors:
        return int(tensors["lokr_w1_b"].shape[0])
    if "lokr_w2_b" in tensors:
        return int(tensors["lokr_w2_b"].shape[0])
    w2 = tensors["lokr_w2"]
    return int(max(w2.shape[0], w2.shape[1]))  # any r >= max/2 keeps w2 full in PEFT


def _lokr_factor(tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> int:
    """The ``decompose_factor`` under which PEFT gives the module the file's Kronecker shapes."""
    w1 = tensors.get("lokr_w1")
    a, c = (
        (w1.shape[0], w1.shape[1])
        if w1 is not None
        else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    )
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    for factor in (-1, *sorted({int(a), int(c)})):
        if factorization(out_dim, factor)[0] == a and factorization(in_dim, factor)[0] == c:
            return factor
    raise ValueError(
        f"no LoKr factor gives the Kronecker shapes {(a, c)} of a {tuple(weight.shape)}"
    )


def peft_state_from_lycoris(
    state: Mapping[str, torch.Tensor], unet: torch.nn.Module
) -> tuple[NetworkConfig, dict[str, torch.Tensor]]:
    """A LyCORIS LoHa/LoKr UNet state dict as a PEFT config and state dict for ``unet``.

    Args:
        state: The file's ``lora_unet_`` tensors (LoHa or LoKr, one kind).
        unet: The diffusers UNet it will be loaded into (its module names resolve the stems).

    Returns:
        ``(config, peft_state_dict)``: per-module ranks and alphas in the config's patterns.

    Raises:
        ValueError: Naming the key: a stem that is no UNet module, Tucker tensors, mixed kinds,
            or LoKr shapes PEFT cannot build.
    """
    names = _module_names(unet)
    weights = dict(unet.named_modules())
    modules = _modules(state)
    kinds: set[str] = set()
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    factors: Counter[int] = Counter()
    decompose_both = False
    peft: dict[str, torch.Tensor] = {}
    for stem, tensors in sorted(modules.items()):
        name = names.get(stem.removeprefix(PREFIXES["unet"]))
        if not stem.startswith(PREFIXES["unet"]) or name is None:
            raise ValueError(f"{stem}: no module of this UNet has that kohya name")
        tucker = sorted(set(tensors) & set(TUCKER_KEYS))
        if tucker:
            raise ValueError(f"{stem}.{tucker[0]}: LyCORIS' Tucker factors are not supported")
        alpha_t = tensors.pop("alpha", None)
        if "hada_w1_a" in tensors:
            kinds.add("loha")
            rank = int(tensors["hada_w1_b"].shape[0])
        elif any(k in tensors for k in LOKR_KEYS):
            kinds.add("lokr")
            rank = _lokr_rank(tensors)
            factors[_lokr_factor(tensors, weights[name].weight)] += 1
            decompose_both = decompose_both or "lokr_w1_a" in tensors
        else:
            raise ValueError(f"{stem}: neither LoHa nor LoKr tensors ({sorted(tensors)})")
        full = "lokr_w1" in tensors and "lokr_w2" in tensors
        alpha = float(rank) if alpha_t is None or full else float(alpha_t)
        ranks[name], alphas[name] = rank, alpha
        for key, tensor in tensors.items():
            peft[f"{name}.{key}"] = tensor
    if len(kinds) != 1:
        raise ValueError(f"a LyCORIS UNet file of one kind (LoHa or LoKr) expected, got {kinds}")
    if len(factors) > 1:
        raise ValueError(f"LoKr modules of several decompose factors: {sorted(factors)}")
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    common: dict[str, Any] = {
        "r": default_rank,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "alpha_pattern": alphas,
        "init_weights": True,
    }
    if kinds == {"loha"}:
        return LoHaConfig(alpha=default_rank, **common), peft
    factor = next(iter(factors))
    config = LoKrConfig(
        alpha=default_rank, decompose_both=decompose_both, decompose_factor=factor, **common
    )
    return config, peft


def add_lycoris_adapter(
    unet: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str
) -> NetworkConfig:
    """Add a LyCORIS LoHa/LoKr file's UNet modules to ``unet`` as a PEFT adapter.

    Args:
        unet: A diffusers UNet (its ``add_adapter`` registers the adapter for ``set_adapters``).
        state: The file's ``lora_unet_`` tensors.
        adapter_name: The new adapter's name.

    Returns:
        The adapter's config.

    Raises:
        ValueError: As :func:`peft_state_from_lycoris`, or a tensor the adapter has no place
            for (naming it).
    """
    config, peft = peft_state_from_lycoris(state, unet)
    unet.add_adapter(config, adapter_name=adapter_name)  # type: ignore[operator]  # diffusers' PeftAdapterMixin
    result = set_peft_model_state_dict(unet, peft, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ValueError(f"{unexpected[0]}: no tensor of the rebuilt adapter has that shape/name")
    return config


def lycoris_delta(tensors: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The delta a LyCORIS LoHa/LoKr module adds to its weight, at the loaders' scale.

    ``alpha / dim`` with ``dim`` the rank of a factored matrix (no ``alpha``: 1), and scale 1 for
    a LoKr of two full matrices, as A1111, ComfyUI and LyCORIS apply them (the module docstring).

    Args:
        tensors: One module's tensors by name (``hada_w1_a``, ..., ``alpha``), Tucker excluded.
        shape: The weight's shape.

    Returns:
        The delta, in float64, of ``shape``.

    Raises:
        ValueError: Tucker factors, missing tensors, or a product of another size.
    """
    t = {k: v.double() for k, v in tensors.items()}
    tucker = sorted(set(t) & set(TUCKER_KEYS))
    if tucker:
        raise ValueError(f"{tucker[0]}: LyCORIS' Tucker factors are not supported")
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif any(k in t for k in LOKR_KEYS):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2.contiguous())
    else:
        raise ValueError(f"neither LoHa nor LoKr tensors: {sorted(tensors)}")
    if delta.numel() != math.prod(shape):
        raise ValueError(f"a {tuple(delta.shape)} product does not fit a {tuple(shape)} weight")
    dim = _file_dim(tensors)
    scale = float(t["alpha"]) / dim if dim is not None and "alpha" in t else 1.0
    return delta.reshape(tuple(shape)) * scale
