"""How three consumers load kohya/LyCORIS-format SD1.5 network files: key names and weight deltas.

This is an independent transcription, in our own words and code, of the loading logic of:

* AUTOMATIC1111's built-in ``Lora`` extension (:data:`A1111`),
* ComfyUI's ``comfy/lora.py`` + ``comfy/weight_adapter`` (:data:`COMFYUI`),
* LyCORIS's ``lycoris.kohya`` network (:data:`LYCORIS_KOHYA`), which kohya sd-scripts uses for
  LoHa/LoKr (``--network_module lycoris.kohya``), and
* kohya sd-scripts' own ``networks/lora.py`` (:data:`KOHYA_SD_SCRIPTS`) for LoRA/LoCon.

No code was copied; each function cites the function it transcribes. The tensors handed to the
delta functions are the values under one module stem of a file, keyed by the suffix after the
first ``.`` exactly as it appears in the file (``"lora_down.weight"``, ``"alpha"``,
``"hada_w1_a"``, ``"lokr_w2_b"``, ...). Each delta function returns what that loader adds to the
base weight at multiplier (strength) 1.0, or raises :class:`LoaderRejects` where the loader would
fail, skip the module, or crash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class SourceRef:
    """Where a transcription comes from.

    Attributes:
        repo: GitHub ``owner/name``.
        commit: The commit read (repository HEAD where the repository could be fetched).
        files: Path -> commit of the stored file version read, where it differs from ``commit``.
        note: Caveats about the reading.
    """

    repo: str
    commit: str
    files: Mapping[str, str] = field(default_factory=dict)
    note: str = ""


#: AUTOMATIC1111 (the 1.6 GB repository could not be fetched whole; files were read from the code
#: index, each at the file-version commit listed).
A1111 = SourceRef(
    repo="AUTOMATIC1111/stable-diffusion-webui",
    commit="873edba44bedf0086d52343f282552b3601baeb8",
    files={
        "extensions-builtin/Lora/networks.py": "873edba44bedf0086d52343f282552b3601baeb8",
        "extensions-builtin/Lora/network.py": "f2844bd024ff3cf7ee712153a514afd9085980db",
        "extensions-builtin/Lora/network_lora.py": "1b7f430820d6015ab16881a7353d5fde04b36d0d",
        "extensions-builtin/Lora/network_hada.py": "c302b3ab9dd0f151cf8cb87a68002b42e5fc2676",
        "extensions-builtin/Lora/network_lokr.py": "fe89b098394aab3339078eb992f796a4aa1a32b6",
        "extensions-builtin/Lora/lyco_helpers.py": "f8391b8a8ff61bf7ebcddc9b387e6c2f206ed056",
        "extensions-builtin/Lora/ui_edit_user_metadata.py": (
            "0098b2946a3e1a77a3f848ee1f15ac923f3b0513"
        ),
    },
    note=(
        "HEAD not verifiable (snapshot over the fetch limit); the v1.10 networks.py (read from the "
        "index without a commit id) has the same convert_diffusers_name_to_compvis plus the resnet "
        "suffixes norm1->in_layers_0 and norm2->out_layers_0, which this module includes."
    ),
)

#: ComfyUI (1.2 GB repository, also read file by file from the code index).
COMFYUI = SourceRef(
    repo="comfyanonymous/ComfyUI",
    commit="41444b5236c613ee5ff7d09aa620f94b702f30eb",
    files={
        "comfy/lora.py": "41444b5236c613ee5ff7d09aa620f94b702f30eb",
        "comfy/utils.py": "2ba5cc8b867bc1aabe59fdaf0a8489e65012d603",
        "comfy/weight_adapter/__init__.py": "dc05edb5b27f0abbec88cd3994c2be8838a82059",
        "comfy/weight_adapter/lora.py": "6fd406fb14ca663225b88c6f75d7a7f2b997e5a0",
        "comfy/weight_adapter/loha.py": "183b377588102d00131247aec399f8b34e1122b4",
        "comfy/weight_adapter/lokr.py": "e8f3bc5ab766ba0149ac8ba8f67c328f8bb3da7d",
    },
    note="HEAD not verifiable (snapshot over the fetch limit).",
)

#: LyCORIS, fetched whole (HEAD of the stored snapshot, 2025-10-04).
LYCORIS_KOHYA = SourceRef(
    repo="KohakuBlueleaf/LyCORIS",
    commit="f49d30d670591ec8841d241d79aaa8449b30a715",
    files={
        p: "f49d30d670591ec8841d241d79aaa8449b30a715"
        for p in (
            "lycoris/kohya.py",
            "lycoris/config.py",
            "lycoris/modules/__init__.py",
            "lycoris/modules/base.py",
            "lycoris/modules/locon.py",
            "lycoris/modules/loha.py",
            "lycoris/modules/lokr.py",
            "lycoris/functional/general.py",
            "lycoris/functional/loha.py",
            "lycoris/functional/lokr.py",
        )
    },
)

#: kohya sd-scripts, fetched whole (HEAD of the stored snapshot, 2026-02-16).
KOHYA_SD_SCRIPTS = SourceRef(
    repo="kohya-ss/sd-scripts",
    commit="48d368fa557731ad0488c07304dfeba8c07910eb",
    files={
        p: "48d368fa557731ad0488c07304dfeba8c07910eb"
        for p in ("networks/lora.py", "library/original_unet.py", "library/train_util.py")
    },
)


class LoaderRejects(ValueError):
    """The loader would not apply these tensors (error, crash, skipped module or ignored key)."""


Tensors = Mapping[str, torch.Tensor]

# --------------------------------------------------------------------------------------------
# shared small helpers
# --------------------------------------------------------------------------------------------


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """Rows kept, every other axis folded into columns."""
    return _f32(t).reshape(t.shape[0], -1)


def _alpha(tensors: Tensors) -> float | None:
    return float(tensors["alpha"].item()) if "alpha" in tensors else None


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rebuild ``(out, in, *k)`` from a Tucker core ``(R, R, *k)``, ``a: (R, out)``, ``b: (R, in)``.

    The contraction every consumer uses for ``hada_t1``/``hada_t2``/``lokr_t2``: the core's first
    axis pairs with ``a``'s rows (output side), its second axis with ``b``'s rows (input side).
    """
    return torch.einsum("xy...,xo,yi->oi...", _f32(core), _f32(a), _f32(b))


def _comfy_tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`_tucker` with ComfyUI's own einsum operand order (its result's strides matter there:
    ComfyUI hands it to ``torch.kron`` without making it contiguous)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", _f32(core), _f32(b), _f32(a))


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Kronecker product, ``w1`` padded with trailing unit axes up to ``w2``'s rank."""
    w1 = _f32(w1)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, _f32(w2).contiguous())


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


# --------------------------------------------------------------------------------------------
# UNet layout and ComfyUI's diffusers -> ldm key table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that decides SD1.x UNet module names.

    Attributes:
        layers_per_block: Resnets per down block (up blocks have one more).
        down_depths: Transformer blocks per attention, per down block (0: no attentions).
        up_depths: The same per up block, in diffusers order.
        mid_depth: Transformer blocks of the mid attention.
    """

    layers_per_block: int
    down_depths: tuple[int, ...]
    up_depths: tuple[int, ...]
    mid_depth: int

    @classmethod
    def of(cls, unet: nn.Module) -> UNetLayout:
        """Read the layout off a diffusers ``UNet2DConditionModel``."""

        def depth(block: nn.Module) -> int:
            attns = getattr(block, "attentions", None)
            return len(attns[0].transformer_blocks) if attns else 0

        return cls(
            layers_per_block=len(unet.down_blocks[0].resnets),
            down_depths=tuple(depth(b) for b in unet.down_blocks),
            up_depths=tuple(depth(b) for b in unet.up_blocks),
            mid_depth=len(unet.mid_block.attentions[0].transformer_blocks),
        )


#: Stable Diffusion 1.5's UNet.
SD15_LAYOUT = UNetLayout(2, (1, 1, 1, 0), (0, 1, 1, 1), 1)

_COMFY_RESNET = {  # ldm child -> diffusers child
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER_BLOCK = (
    "norm1",
    "norm2",
    "norm3",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
_COMFY_BASIC = {  # diffusers -> ldm
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}


def comfyui_unet_to_diffusers(layout: UNetLayout) -> dict[str, str]:
    """ComfyUI's diffusers -> ldm (compvis) module-name table for an SD1.x UNet.

    Transcribes ``comfy.utils.unet_to_diffusers`` (see :data:`COMFYUI`), at module level (ComfyUI
    keys the same table by ``.weight``/``.bias``; only ``.weight`` entries feed the LoRA key map).
    Like ComfyUI, it lists a downsampler for every down block and an upsampler for every up block,
    including the last ones that SD1.x does not have; callers filter by what exists. The
    per-block transformer depth is read from ``layout`` rather than ComfyUI's detected config.

    Args:
        layout: The UNet's block structure.

    Returns:
        Diffusers module name (``down_blocks.0.resnets.0.conv1``) -> ldm module name
        (``input_blocks.1.0.in_layers.2``), without the ``diffusion_model.`` prefix.
    """
    out: dict[str, str] = {}

    def attention(diff: str, ldm: str, depth: int) -> None:
        for child in _COMFY_ATTENTION:
            out[f"{diff}.{child}"] = f"{ldm}.{child}"
        for t in range(depth):
            for child in _COMFY_TRANSFORMER_BLOCK:
                out[f"{diff}.transformer_blocks.{t}.{child}"] = (
                    f"{ldm}.transformer_blocks.{t}.{child}"
                )

    def resnet(diff: str, ldm: str) -> None:
        for ldm_child, diff_child in _COMFY_RESNET.items():
            out[f"{diff}.{diff_child}"] = f"{ldm}.{ldm_child}"

    n_blocks = len(layout.down_depths)
    per = layout.layers_per_block
    for x in range(n_blocks):
        n = 1 + (per + 1) * x
        for i in range(per):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if layout.down_depths[x] > 0:
                attention(
                    f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", layout.down_depths[x]
                )
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"

    attention("mid_block.attentions.0", "middle_block.1", layout.mid_depth)
    for i, n in enumerate((0, 2)):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")

    for x in range(n_blocks):
        n = (per + 1) * x
        for i in range(per + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            c = 1
            if layout.up_depths[x] > 0:
                c += 1
                attention(
                    f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", layout.up_depths[x]
                )
            if i == per:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1

    out.update(_COMFY_BASIC)
    return out


def _sd15_ldm_unet_modules(layout: UNetLayout = SD15_LAYOUT) -> set[str]:
    """Module names (``_``-joined, ``diffusion_model_`` prefixed) of the ldm UNet for ``layout``."""
    last = len(layout.down_depths) - 1
    names = set()
    for diff, ldm in comfyui_unet_to_diffusers(layout).items():
        if diff.startswith((f"down_blocks.{last}.downsamplers", f"up_blocks.{last}.upsamplers")):
            continue  # the last down/up block has no resampler
        names.add("diffusion_model_" + ldm.replace(".", "_"))
    return names


_SD15_LDM_UNET = _sd15_ldm_unet_modules()
_CLIP_L_LAYER_CHILDREN = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
    "layer_norm1",
    "layer_norm2",
)
_SD15_TE = {
    f"transformer_text_model_encoder_layers_{i}_{c}"
    for i in range(12)
    for c in _CLIP_L_LAYER_CHILDREN
}

# --------------------------------------------------------------------------------------------
# AUTOMATIC1111
# --------------------------------------------------------------------------------------------

_A1111_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _a1111_suffix(kind: str, tail: str) -> str:
    return _A1111_RESNET_SUFFIX.get(tail, tail) if kind == "resnets" else tail


def _a1111_convert(stem: str) -> str:
    """The name rewrite of A1111 ``networks.convert_diffusers_name_to_compvis`` (SD1, not SD2).

    The first rule whose pattern matches at the start of the stem wins; a stem that matches none
    comes back unchanged.
    """
    rules: list[tuple[str, object]] = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{_a1111_suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                f"{_a1111_suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{_a1111_suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: (
                f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_"
                f"{2 if int(m[1]) > 0 else 1}_conv"
            ),
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}",
        ),
    ]
    for pattern, build in rules:
        found = re.match(pattern, stem)
        if found:
            return build(found)  # type: ignore[operator]
    return stem


def a1111_module_name(kohya_stem: str) -> str | None:
    """The SD1.5 compvis module A1111's Lora extension binds a ``lora_unet_``/``lora_te_`` stem to.

    Transcribes ``networks.convert_diffusers_name_to_compvis`` and the lookup in
    ``networks.load_network`` (see :data:`A1111`): convert the stem, look it up among the
    ldm model's ``named_modules()`` (dots -> ``_``); if absent and the stem contains
    ``lora_unet``, retry with ``lora_unet`` replaced by ``diffusion_model`` (stems already in
    compvis form). Stems that find no module are dropped ("Failed to match keys").

    Args:
        kohya_stem: The key part before the first ``.``, e.g.
            ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.

    Returns:
        The compvis module name (``diffusion_model_input_blocks_1_1_..._attn1_to_q`` or
        ``transformer_text_model_encoder_layers_0_self_attn_q_proj``), or None when A1111 would
        not match it on an SD1.5 checkpoint (e.g. ``lora_unet_conv_norm_out``: no rule, and the
        fallback name does not exist).
    """
    known = _SD15_LDM_UNET | _SD15_TE
    key = _a1111_convert(kohya_stem)
    if key in known:
        return key
    if "lora_unet" in kohya_stem:
        key = kohya_stem.replace("lora_unet", "diffusion_model")
        if key in known:
            return key
    return None


def a1111_module_type(tensors: Tensors) -> str | None:
    """Which A1111 module type takes these keys (the first whose ``create_module`` accepts).

    Order in ``networks.module_types``: lora, hada (loha), ia3, lokr, full, norm, glora, oft. Only
    the lora/loha/lokr tests are transcribed here (``network_lora.ModuleTypeLora``,
    ``network_hada.ModuleTypeHada``, ``network_lokr.ModuleTypeLokr``).

    Args:
        tensors: Suffix -> tensor for one stem.

    Returns:
        ``"lora"``, ``"loha"``, ``"lokr"`` or None.
    """
    keys = set(tensors)
    if {"lora_up.weight", "lora_down.weight"} <= keys or {"lora_A.weight", "lora_B.weight"} <= keys:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
        return "loha"
    has_1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
    has_2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
    if has_1 and has_2:
        return "lokr"
    return None


def _a1111_finalize(
    updown: torch.Tensor,
    shape: Sequence[int],
    output_shape: Sequence[int],
    tensors: Tensors,
    dim: int | None,
) -> torch.Tensor:
    """``network.NetworkModule.finalize_updown`` + ``calc_scale`` at multiplier 1 (no bias/DoRA)."""
    if "dora_scale" in tensors or "bias" in tensors:
        raise LoaderRejects("dora_scale/bias handling is not transcribed")
    if len(output_shape) == 4:
        updown = updown.reshape(tuple(output_shape))
    if updown.numel() != _numel(shape):
        raise LoaderRejects(f"A1111: delta {tuple(updown.shape)} cannot be added to {tuple(shape)}")
    updown = updown.reshape(tuple(shape))
    if "scale" in tensors:
        scale = float(tensors["scale"].item())
    elif dim is not None and _alpha(tensors) is not None:
        scale = _alpha(tensors) / dim  # type: ignore[operator]
    else:
        scale = 1.0
    return updown * scale


def a1111_delta(tensors: Tensors, shape: Sequence[int]) -> torch.Tensor:
    """The weight delta A1111's Lora extension adds at multiplier 1.0.

    Transcribes ``NetworkModuleLora.calc_updown`` (with its ``create_module`` reshapes),
    ``NetworkModuleHada.calc_updown``, ``NetworkModuleLokr.calc_updown``, the helpers of
    ``lyco_helpers`` and ``NetworkModule.finalize_updown``/``calc_scale`` (see :data:`A1111`).

    Scale: a ``scale`` key overrides everything; else ``alpha / dim`` when both exist, else 1.0.
    ``dim`` is ``lora_down.shape[0]`` (LoRA), ``hada_w1_b.shape[0]`` (LoHa), and for LoKr
    ``lokr_w2_b.shape[0]`` if present, else ``lokr_w1_b.shape[0]`` if present, else none (so a
    LoKr with full ``lokr_w1`` and ``lokr_w2`` is applied at scale 1 whatever ``alpha`` says).

    Args:
        tensors: Suffix -> tensor for one stem.
        shape: The target module's weight shape.

    Returns:
        The delta, shaped like the weight.

    Raises:
        LoaderRejects: No module type accepts the keys, or the delta does not fit the weight.
    """
    kind = a1111_module_type(tensors)
    is_conv = len(shape) == 4
    if kind == "lora":
        up = tensors.get("lora_up.weight", tensors.get("lora_B.weight"))
        down = tensors.get("lora_down.weight", tensors.get("lora_A.weight"))
        mid = tensors.get("lora_mid.weight")
        assert up is not None and down is not None
        # create_module: a linear target gets 2-D factors; a conv target gets conv-shaped ones
        down = _f32(down)
        if not is_conv:
            down = down.reshape(down.shape[0], -1)
        elif down.dim() == 2:
            down = down.reshape(down.shape[0], -1, 1, 1)
        dim = down.shape[0]
        output_shape = [up.shape[0], down.shape[1]]
        if mid is not None:
            updown = torch.einsum("ab...,oa,bi->oi...", _f32(mid), _flat(up), _flat(down))
            output_shape += list(mid.shape[2:])
        else:
            output_shape += list(down.shape[2:])
            updown = (_flat(up) @ _flat(down)).reshape(output_shape)
        return _a1111_finalize(updown, shape, output_shape, tensors, dim)
    if kind == "loha":
        w1a, w1b = tensors["hada_w1_a"], tensors["hada_w1_b"]
        w2a, w2b = tensors["hada_w2_a"], tensors["hada_w2_b"]
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        output_shape = [w1a.shape[0], w1b.shape[1]]
        if t1 is not None:
            output_shape = [w1a.shape[1], w1b.shape[1], *t1.shape[2:]]
            part1 = _tucker(t1, w1a, w1b)
        else:
            if w1b.dim() == 4:
                output_shape += list(w1b.shape[2:])
            part1 = (_flat(w1a) @ _flat(w1b)).reshape(output_shape)
        if t2 is not None:
            part2 = _tucker(t2, w2a, w2b)
        else:
            part2 = (_flat(w2a) @ _flat(w2b)).reshape(output_shape)
        return _a1111_finalize(part1 * part2, shape, output_shape, tensors, w1b.shape[0])
    if kind == "lokr":
        dim = None
        if "lokr_w1_b" in tensors:
            dim = tensors["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in tensors:
            dim = tensors["lokr_w2_b"].shape[0]
        w1 = tensors.get("lokr_w1")
        w1 = _f32(w1) if w1 is not None else _f32(tensors["lokr_w1_a"]) @ _f32(tensors["lokr_w1_b"])
        if "lokr_w2" in tensors:
            w2 = _f32(tensors["lokr_w2"])
        elif "lokr_t2" in tensors:
            w2 = _tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
        else:
            w2 = _f32(tensors["lokr_w2_a"]) @ _f32(tensors["lokr_w2_b"])
        output_shape = (
            list(shape) if is_conv else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        )
        updown = _kron(w1, w2)
        if updown.numel() != _numel(output_shape):
            raise LoaderRejects("A1111: kron product does not fit the weight")
        updown = updown.reshape(output_shape)
        return _a1111_finalize(updown, shape, output_shape, tensors, dim)
    raise LoaderRejects(f"A1111: no module type accepts keys {sorted(tensors)}")


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------


def comfyui_unet_key_map(unet: nn.Module, include_norms: bool = False) -> dict[str, str]:
    """The ``lora_unet_...`` stems ComfyUI's key map accepts for a diffusers-layout SD1.x UNet.

    Transcribes the diffusers half of ``comfy.lora.model_lora_keys_unet`` (see :data:`COMFYUI`):
    every ``.weight`` entry of ``unet_to_diffusers`` becomes ``lora_unet_`` + the diffusers
    name with ``.`` -> ``_`` (ComfyUI also registers ``lycoris_<same>`` and the compvis-form
    ``lora_unet_<ldm name>`` for every ldm weight; those aliases are not listed here).

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        include_norms: Also list GroupNorm/LayerNorm modules (ComfyUI maps those too).

    Returns:
        Stem -> diffusers module name, for modules that exist in ``unet``.
    """
    modules = dict(unet.named_modules())
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    if include_norms:
        kinds += (nn.GroupNorm, nn.LayerNorm)
    out = {}
    for diff in comfyui_unet_to_diffusers(UNetLayout.of(unet)):
        module = modules.get(diff)
        if isinstance(module, kinds) and getattr(module, "weight", None) is not None:
            out["lora_unet_" + diff.replace(".", "_")] = diff
    return out


#: The CLIP-L children ComfyUI maps for ``lora_te_text_model_encoder_layers_<i>_<child>``
#: (``comfy.lora.LORA_CLIP_MAP``); layer norms are not mapped.
COMFYUI_TE_CHILDREN = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)


def comfyui_module_types(tensors: Tensors) -> list[str]:
    """Every ComfyUI weight adapter whose ``load`` accepts these keys, in adapter order.

    ``comfy.lora.load_lora`` tries ``weight_adapter.adapters`` (LoRA, LoHa, LoKr, GLoRA, OFT,
    BOFT) and its ``continue`` does not stop the loop, so the last accepting adapter's patch is
    the one kept. Only the LoRA/LoHa/LoKr/GLoRA tests are transcribed.

    Args:
        tensors: Suffix -> tensor for one stem.

    Returns:
        Names among ``"lora"``, ``"loha"``, ``"lokr"``, ``"glora"``.
    """
    keys = set(tensors)
    found = []
    lora_pairs = (
        ("lora_up.weight", "lora_down.weight"),
        ("lora_B.weight", "lora_A.weight"),
        ("lora.up.weight", "lora.down.weight"),
        ("lora_B", "lora_A"),
        ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),
    )
    if any(up in keys for up, _ in lora_pairs):
        found.append("lora")
    if "hada_w1_a" in keys:
        found.append("loha")
    if keys & {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"}:
        found.append("lokr")
    if "a1.weight" in keys:
        found.append("glora")
    return found


def comfyui_module_type(tensors: Tensors) -> str | None:
    """The ComfyUI adapter whose patch is kept (the last accepting one), or None."""
    found = comfyui_module_types(tensors)
    return found[-1] if found else None


def comfyui_delta(tensors: Tensors, shape: Sequence[int]) -> torch.Tensor:
    """The weight delta ComfyUI adds at strength 1.0.

    Transcribes ``calculate_weight`` of ``LoRAAdapter``, ``LoHaAdapter`` and ``LoKrAdapter``
    (see :data:`COMFYUI`). Scale: ``alpha / rank`` when ``alpha`` exists, else 1.0, with rank
    ``lora_down.shape[0]`` (LoRA), ``hada_w1_b.shape[0]`` (LoHa), and for LoKr ``lokr_w2_b``'s
    rows if ``lokr_w2`` is absent, else ``lokr_w1_b``'s rows if ``lokr_w1`` is absent, else no rank
    (scale 1.0 whatever ``alpha`` says). Every delta is finally ``reshape``d to the weight shape.

    Tucker LoKr (``lokr_t2``): ComfyUI passes the einsum result straight to ``torch.kron``; with
    torch 2.13 (CPU) that tensor is non-contiguous and ``kron`` raises, so ComfyUI logs
    ``ERROR lokr ...`` and leaves the weight unpatched. This function reproduces that by running
    the same operations, so the outcome follows the installed torch.

    Args:
        tensors: Suffix -> tensor for one stem.
        shape: The target module's weight shape.

    Returns:
        The delta, shaped like the weight.

    Raises:
        LoaderRejects: No adapter takes the keys, or ComfyUI's computation fails (ComfyUI logs
            the error and leaves the weight unpatched).
    """
    if "dora_scale" in tensors or "reshape_weight" in tensors:
        raise LoaderRejects("dora_scale/reshape_weight handling is not transcribed")
    kind = comfyui_module_type(tensors)
    alpha = _alpha(tensors)
    try:
        if kind == "lora":
            up, down = tensors["lora_up.weight"], _f32(tensors["lora_down.weight"])
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            mid = tensors.get("lora_mid.weight")
            if mid is not None:
                # fold the mid core into down: (R, in, 1, 1) x (R, R, kh, kw) -> (R, in, kh, kw)
                mid = _f32(mid)
                folded = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = folded.reshape(down.shape[1], down.shape[0], *mid.shape[2:]).transpose(0, 1)
            diff = torch.mm(_f32(up).flatten(1), down.flatten(1)).reshape(tuple(shape))
            return diff * scale
        if kind == "loha":
            w1a, w1b = _f32(tensors["hada_w1_a"]), _f32(tensors["hada_w1_b"])
            w2a, w2b = _f32(tensors["hada_w2_a"]), _f32(tensors["hada_w2_b"])
            scale = alpha / w1b.shape[0] if alpha is not None else 1.0
            if "hada_t1" in tensors:
                m1 = _comfy_tucker(tensors["hada_t1"], w1a, w1b)
                m2 = _comfy_tucker(tensors["hada_t2"], w2a, w2b)
            else:
                m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
            return (m1 * m2).reshape(tuple(shape)) * scale
        if kind == "lokr":
            dim = None
            if "lokr_w1" in tensors:
                w1 = _f32(tensors["lokr_w1"])
            else:
                dim = tensors["lokr_w1_b"].shape[0]
                w1 = torch.mm(_f32(tensors["lokr_w1_a"]), _f32(tensors["lokr_w1_b"]))
            if "lokr_w2" in tensors:
                w2 = _f32(tensors["lokr_w2"])
            else:
                dim = tensors["lokr_w2_b"].shape[0]
                if "lokr_t2" in tensors:
                    w2 = _tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
                else:
                    w2 = torch.mm(_f32(tensors["lokr_w2_a"]), _f32(tensors["lokr_w2_b"]))
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            scale = alpha / dim if alpha is not None and dim is not None else 1.0
            return torch.kron(w1, w2).reshape(tuple(shape)) * scale
    except (RuntimeError, KeyError) as err:
        raise LoaderRejects(f"ComfyUI: {kind} patch fails ({err}); weight left unpatched") from err
    raise LoaderRejects(f"ComfyUI: no adapter accepts keys {sorted(tensors)}")


# --------------------------------------------------------------------------------------------
# LyCORIS (lycoris.kohya)
# --------------------------------------------------------------------------------------------

#: ``LycorisNetworkKohya`` targets with the default preset ``full`` (``enable_conv: True``).
LYCORIS_FULL_TARGET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
LYCORIS_FULL_TARGET_NAMES = (
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)
#: Preset ``full-lin`` (``enable_conv: False``), LyCORIS's way to train without kxk convs.
LYCORIS_LIN_TARGET_CLASSES = ("Transformer2DModel", "ResnetBlock2D")
LYCORIS_LIN_TARGET_NAMES = ("time_embedding.linear_1", "time_embedding.linear_2")


def _lycoris_takes(module: nn.Module, conv: bool) -> bool:
    """``create_single_module``'s filter: Linear; 1x1 conv (linear dim); kxk conv if conv dim."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.kernel_size[0] == 1 or conv
    return False


def lycoris_kohya_names(unet: nn.Module, conv: bool) -> dict[str, str]:
    """Stems ``LycorisNetworkKohya`` creates (and so saves) for a diffusers UNet.

    Transcribes ``LycorisNetworkKohya.__init__``'s ``create_modules``/``create_single_module``
    with preset ``full`` (``conv=True``) or ``full-lin`` (``conv=False``) (see
    :data:`LYCORIS_KOHYA`): for each module of a target class, each Linear or Conv descendant
    (the class itself included) becomes ``lora_unet_<path>`` with ``.`` -> ``_``; the target names
    are matched with ``re.match`` against module paths. 1x1 convs always qualify (they get the
    linear dim/alpha), kxk convs only with a conv dim. Note ``create_network`` turns
    ``conv_dim=0`` into ``network_dim``; only a preset switches kxk convs off.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        conv: Preset ``full`` (True) or ``full-lin`` (False).

    Returns:
        Stem -> diffusers module name.
    """
    classes = LYCORIS_FULL_TARGET_CLASSES if conv else LYCORIS_LIN_TARGET_CLASSES
    names = LYCORIS_FULL_TARGET_NAMES if conv else LYCORIS_LIN_TARGET_NAMES
    out: dict[str, str] = {}
    for path, module in unet.named_modules():
        if type(module).__name__ in classes and not any(re.match(p, path) for p in names):
            for child, sub in module.named_modules():
                full = f"{path}.{child}" if child else path
                stem = "lora_unet_" + full.replace(".", "_")
                if stem not in out and _lycoris_takes(sub, conv):
                    out[stem] = full
        elif any(re.match(p, path) for p in names) and _lycoris_takes(module, conv):
            out["lora_unet_" + path.replace(".", "_")] = path
    return out


def lycoris_loadable_names(unet: nn.Module) -> dict[str, str]:
    """Stems ``lycoris.kohya.create_network_from_weights`` binds: every Linear/Conv module.

    Loading matches ``lora_unet_<path with _>`` against all of ``unet.named_modules()``, not only
    the training targets; a Linear/Conv match is then built by ``get_module``/``make_module``.
    """
    return {
        "lora_unet_" + path.replace(".", "_"): path
        for path, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }


def lycoris_module_type(tensors: Tensors) -> str | None:
    """The first of ``lycoris.modules.MODULE_LIST`` whose ``algo_check`` sees its marker key.

    Markers (``weight_list_det``): locon ``lora_up.weight``; loha ``hada_w1_a``; ia3
    ``on_input``; lokr ``lokr_w1`` or ``lokr_w1_a``; full ``diff``; norm ``w_norm``; diag-oft
    and boft ``oft_blocks``; glora ``a1.weight``.
    """
    keys = set(tensors)
    for name, markers in (
        ("locon", ("lora_up.weight",)),
        ("loha", ("hada_w1_a",)),
        ("ia3", ("on_input",)),
        ("lokr", ("lokr_w1", "lokr_w1_a")),
        ("full", ("diff",)),
        ("norm", ("w_norm",)),
        ("diag_oft", ("oft_blocks",)),
        ("glora", ("a1.weight",)),
    ):
        if keys & set(markers):
            return name
    return None


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``lycoris.functional.general.factorization``: split ``dimension`` into ``(m, n)``, m <= n.

    With a positive ``factor`` that divides ``dimension``: ``(factor, dimension // factor)``
    sorted. Otherwise walk the divisors upward from 1, taking each while it does not exceed the
    limit (``factor``, or ``dimension`` when ``factor`` is negative) and stopping once the small
    side reaches the large one; the last pair taken is returned sorted.
    """
    if factor > 0 and dimension % factor == 0:
        a, b = factor, dimension // factor
        return (a, b) if a <= b else (b, a)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        if cand + dimension // cand > 1 + dimension or cand > limit:
            break
        m, n = cand, dimension // cand
    return (m, n) if m <= n else (n, m)


def _lycoris_alpha(tensors: Tensors, lora_dim: int) -> float:
    if "alpha" not in tensors:
        raise LoaderRejects("LyCORIS: make_module_from_state_dict calls float(alpha) on None")
    alpha = _alpha(tensors)
    return alpha if alpha else float(lora_dim)  # alpha 0 means "no scaling"


def _check_shapes(tensors: Tensors, expected: Mapping[str, tuple[int, ...]], algo: str) -> None:
    extra = {k for k in tensors if k not in expected and k not in ("alpha",)}
    if extra:
        raise LoaderRejects(f"LyCORIS {algo}: the module it builds has no {sorted(extra)}")
    for key, want in expected.items():
        if key not in tensors:
            raise LoaderRejects(f"LyCORIS {algo}: expects {key} {want}")
        if tuple(tensors[key].shape) != tuple(want):
            raise LoaderRejects(
                f"LyCORIS {algo}: {key} is {tuple(tensors[key].shape)}, the module has {want}"
            )


def _lycoris_lokr_structure(
    tensors: Tensors, shape: Sequence[int]
) -> tuple[dict[str, tuple[int, ...]], int, bool, bool]:
    """Rebuild the module ``LokrModule.make_module_from_state_dict`` constructs for these keys.

    Returns:
        The parameter shapes that module has, its ``lora_dim``, ``use_w1`` and ``use_w2``.
    """
    w1, w1a, w1b = (tensors.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"))
    w2, w2a, w2b = (tensors.get(k) for k in ("lokr_w2", "lokr_w2_a", "lokr_w2_b"))
    t2 = tensors.get("lokr_t2")
    full_matrix = False
    if w1a is not None:
        lora_dim = w1a.shape[1]
    elif w2a is not None:
        lora_dim = w2a.shape[1]  # for a Tucker w2 this is w2_a's column count, not the rank
    else:
        full_matrix, lora_dim = True, 1
    if w1 is not None:
        out_d, in_d = w1.shape[0], w1.shape[1]
    else:
        assert w1a is not None and w1b is not None
        out_d, in_d = w1a.shape[0], w1b.shape[1]
    first = (out_d, in_d)
    if w2 is not None:
        out_d, in_d = out_d * w2.shape[0], in_d * w2.shape[1]
    else:
        assert w2a is not None and w2b is not None
        out_d, in_d = out_d * w2a.shape[0], in_d * w2b.shape[1]
    # the factor the loader infers from the stored shapes
    if first == (lycoris_factorization(out_d)[0], lycoris_factorization(in_d)[0]):
        factor = -1
    else:
        w1_shape = tuple(w1.shape) if w1 is not None else (w1a.shape[0], w1b.shape[1])
        w2_shape = tuple(w2.shape) if w2 is not None else (w2a.shape[0], w2b.shape[1])
        group_out, group_in = (w1_shape[0], w2_shape[0]), (w1_shape[1], w2_shape[1])
        whole = (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1])
        f1, f2 = max(w1_shape), max(w2_shape)

        def fits(f: int) -> bool:
            return whole[0] % f == 0 and whole[1] % f == 0 and f in group_out and f in group_in

        factor = f1 if fits(f1) else f2 if fits(f2) else min(f1, f2)
    # LokrModule.__init__ on the real module
    out_dim, in_dim, *k = (int(s) for s in shape)
    in_m, in_n = lycoris_factorization(in_dim, factor)
    out_l, out_k = lycoris_factorization(out_dim, factor)
    conv = bool(k)
    tucker = t2 is not None and conv and any(s != 1 for s in k)
    decompose_both = w1 is None and w2 is None
    use_w1 = not (decompose_both and lora_dim < max(out_l, in_m) / 2 and not full_matrix)
    use_w2 = lora_dim >= max(out_k, in_n) / 2 or full_matrix
    expected: dict[str, tuple[int, ...]] = {}
    if use_w1:
        expected["lokr_w1"] = (out_l, in_m)
    else:
        expected["lokr_w1_a"] = (out_l, lora_dim)
        expected["lokr_w1_b"] = (lora_dim, in_m)
    if use_w2:
        expected["lokr_w2"] = (out_k, in_n, *k)
    elif tucker:
        expected["lokr_t2"] = (lora_dim, lora_dim, *k)
        expected["lokr_w2_a"] = (lora_dim, out_k)
        expected["lokr_w2_b"] = (lora_dim, in_n)
    else:
        expected["lokr_w2_a"] = (out_k, lora_dim)
        expected["lokr_w2_b"] = (lora_dim, in_n * math.prod(k))
    return expected, lora_dim, use_w1, use_w2


def lycoris_delta(tensors: Tensors, shape: Sequence[int]) -> torch.Tensor:
    """The weight delta a ``lycoris.kohya`` network built from weights applies at multiplier 1.0.

    Transcribes ``create_network_from_weights`` -> ``get_module``/``make_module`` ->
    ``make_module_from_state_dict`` + ``__init__`` + ``forward`` of ``LoConModule``,
    ``LohaModule`` and ``LokrModule`` (see :data:`LYCORIS_KOHYA`). The loader rebuilds each module
    from the *target* layer and copies the stored tensors in, so every stored shape must equal
    the rebuilt parameter's shape, and ``alpha`` must be present (``float(None)`` raises).
    ``alpha == 0`` means alpha = rank. Scale ``alpha / lora_dim`` (LoKr: ``lora_dim`` from
    ``lokr_w1_a``'s or else ``lokr_w2_a``'s column count; both factors full -> scale 1).

    This is the ``apply_to``/``forward`` path. The ``merge_to``/``get_merged_weight`` path of
    LoHa and LoKr applies the scale twice (``get_weight`` already includes it and
    ``get_diff_weight`` multiplies again); :func:`lycoris_merge_delta` models that.

    Args:
        tensors: Suffix -> tensor for one stem.
        shape: The target module's weight shape.

    Returns:
        The delta, shaped like the weight.

    Raises:
        LoaderRejects: Where the LyCORIS loader would raise (missing alpha, shape mismatch,
            parameters the rebuilt module lacks) or no module type takes the keys.
    """
    kind = lycoris_module_type(tensors)
    if "dora_scale" in tensors:
        raise LoaderRejects("dora_scale handling is not transcribed")
    shape = tuple(int(s) for s in shape)
    out_dim, in_dim, *k = shape
    conv = bool(k)
    kxk = conv and any(s != 1 for s in k)
    if kind == "locon":
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        rank = down.shape[0]
        mid = tensors.get("lora_mid.weight")
        if mid is not None and not kxk:
            raise LoaderRejects("LyCORIS locon: lora_mid on a layer without a kxk kernel")
        if not conv:
            expected = {"lora_down.weight": (rank, in_dim), "lora_up.weight": (out_dim, rank)}
        elif mid is not None:
            expected = {
                "lora_down.weight": (rank, in_dim, *(1 for _ in k)),
                "lora_mid.weight": (rank, rank, *k),
                "lora_up.weight": (out_dim, rank, *(1 for _ in k)),
            }
        else:
            expected = {
                "lora_down.weight": (rank, in_dim, *k),
                "lora_up.weight": (out_dim, rank, *(1 for _ in k)),
            }
        _check_shapes(tensors, expected, "locon")
        scale = _lycoris_alpha(tensors, rank) / rank
        if mid is not None:
            weight = _tucker(mid, _flat(up).transpose(0, 1), _flat(down))
        else:
            weight = _flat(up) @ _flat(down)
        return weight.reshape(shape) * scale
    if kind == "loha":
        rank = tensors["hada_w1_b"].shape[0]
        tucker = "hada_t1" in tensors
        if tucker and not kxk:
            raise LoaderRejects("LyCORIS loha: hada_t1 on a layer without a kxk kernel")
        if tucker:
            pair = {"_a": (rank, out_dim), "_b": (rank, in_dim)}
            expected = {f"hada_w{i}{s}": v for i in (1, 2) for s, v in pair.items()}
            expected.update({"hada_t1": (rank, rank, *k), "hada_t2": (rank, rank, *k)})
        else:
            pair = {"_a": (out_dim, rank), "_b": (rank, in_dim * math.prod(k))}
            expected = {f"hada_w{i}{s}": v for i in (1, 2) for s, v in pair.items()}
        _check_shapes(tensors, expected, "loha")
        scale = _lycoris_alpha(tensors, rank) / rank
        if tucker:
            m1 = _tucker(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
            m2 = _tucker(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"])
        else:
            m1 = _f32(tensors["hada_w1_a"]) @ _f32(tensors["hada_w1_b"])
            m2 = _f32(tensors["hada_w2_a"]) @ _f32(tensors["hada_w2_b"])
        return (m1 * m2).reshape(shape) * scale
    if kind == "lokr":
        expected, lora_dim, use_w1, use_w2 = _lycoris_lokr_structure(tensors, shape)
        _check_shapes(tensors, expected, "lokr")
        alpha = _lycoris_alpha(tensors, lora_dim)
        if use_w1 and use_w2:
            alpha = float(lora_dim)
        scale = alpha / lora_dim
        w1 = (
            _f32(tensors["lokr_w1"])
            if use_w1
            else _f32(tensors["lokr_w1_a"]) @ _f32(tensors["lokr_w1_b"])
        )
        if use_w2:
            w2 = _f32(tensors["lokr_w2"])
        elif "lokr_t2" in tensors:
            w2 = _tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
        else:
            w2 = _f32(tensors["lokr_w2_a"]) @ _f32(tensors["lokr_w2_b"])
        return (_kron(w1, w2) * scale).reshape(shape)
    raise LoaderRejects(f"LyCORIS: no transcribed module type accepts keys {sorted(tensors)}")


def lycoris_merge_delta(tensors: Tensors, shape: Sequence[int]) -> torch.Tensor:
    """The delta of LyCORIS's ``merge_to`` path (``get_merged_weight`` -> ``get_diff_weight``).

    Same as :func:`lycoris_delta` for locon; for loha and lokr the scale is applied twice.
    """
    delta = lycoris_delta(tensors, shape)
    kind = lycoris_module_type(tensors)
    if kind == "loha":
        rank = tensors["hada_w1_b"].shape[0]
        return delta * (_lycoris_alpha(tensors, rank) / rank)
    if kind == "lokr":
        _, lora_dim, use_w1, use_w2 = _lycoris_lokr_structure(tensors, shape)
        alpha = float(lora_dim) if use_w1 and use_w2 else _lycoris_alpha(tensors, lora_dim)
        return delta * (alpha / lora_dim)
    return delta


# --------------------------------------------------------------------------------------------
# kohya sd-scripts networks/lora.py
# --------------------------------------------------------------------------------------------

KOHYA_TARGET_CLASSES = ("Transformer2DModel",)
KOHYA_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def kohya_lora_names(unet: nn.Module, conv: bool) -> dict[str, str]:
    """Stems sd-scripts ``networks.lora.LoRANetwork`` creates for an SD1.x UNet.

    Transcribes ``LoRANetwork.__init__``'s ``create_modules`` (see :data:`KOHYA_SD_SCRIPTS`):
    children (the target itself included) of ``Transformer2DModel`` whose class name is exactly
    ``Linear`` or ``Conv2d``; with ``conv_dim`` also those of ``ResnetBlock2D``,
    ``Downsample2D`` and ``Upsample2D``. Linear and 1x1 conv children get the network dim, kxk
    convs the conv dim (skipped without one). ``conv_in``, ``conv_out`` and ``time_embedding`` are
    never targets; without ``conv_dim`` nothing of a resnet is (not even ``time_emb_proj`` or
    ``conv_shortcut``). When loading from weights (``create_network_from_weights``) the conv
    classes are always targeted, so the loadable set is ``kohya_lora_names(unet, conv=True)``.

    Args:
        unet: A diffusers (or sd-scripts ``original_unet``) UNet; both share module names.
        conv: Whether ``conv_dim`` is given.

    Returns:
        Stem -> diffusers module name.
    """
    classes = KOHYA_TARGET_CLASSES + (KOHYA_CONV_TARGET_CLASSES if conv else ())
    out: dict[str, str] = {}
    for path, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child, sub in module.named_modules():
            cls = type(sub).__name__
            if cls == "Linear" or (cls == "Conv2d" and (conv or sub.kernel_size == (1, 1))):
                full = f"{path}.{child}" if child else path
                out["lora_unet_" + full.replace(".", "_")] = full
    return out


def kohya_delta(tensors: Tensors, shape: Sequence[int]) -> torch.Tensor:
    """The delta sd-scripts ``networks.lora`` applies (``LoRAModule.forward``/``merge_to``).

    Only ``lora_down.weight``/``lora_up.weight``/``alpha``: the factors are loaded into
    ``nn.Linear``/``nn.Conv2d`` layers built from the target, so shapes must match exactly
    (linear ``(r, in)``/``(out, r)``; conv ``(r, in, kh, kw)``/``(out, r, 1, 1)``); ``alpha``
    missing or 0 means alpha = r. Scale ``alpha / r``.

    Args:
        tensors: Suffix -> tensor for one stem.
        shape: The target module's weight shape.

    Returns:
        The delta, shaped like the weight.

    Raises:
        LoaderRejects: Other keys (``lora_mid`` etc.) or mismatched shapes.
    """
    shape = tuple(int(s) for s in shape)
    out_dim, in_dim, *k = shape
    extra = set(tensors) - {"lora_down.weight", "lora_up.weight", "alpha"}
    if extra or "lora_down.weight" not in tensors:
        raise LoaderRejects(f"sd-scripts networks.lora cannot load {sorted(extra) or 'this'}")
    rank = tensors["lora_down.weight"].shape[0]
    want = {
        "lora_down.weight": (rank, in_dim, *k),
        "lora_up.weight": (out_dim, rank, *(1 for _ in k)),
    }
    for key, expected in want.items():
        if tuple(tensors[key].shape) != expected:
            raise LoaderRejects(f"sd-scripts: {key} {tuple(tensors[key].shape)} != {expected}")
    alpha = _alpha(tensors) or float(rank)
    delta = _flat(tensors["lora_up.weight"]) @ _flat(tensors["lora_down.weight"])
    return delta.reshape(shape) * (alpha / rank)
