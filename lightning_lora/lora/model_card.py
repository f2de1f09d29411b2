"""The model card (``README.md``) written beside every exported LoRA, in diffusers' layout.

The card is rendered from the LoRA's metadata, the same facts ``export_lora`` writes into both
safetensors files (base model, rank, alpha, epochs, steps, dataset
size and hash, ...), so it states the values the run used, never defaults. It has diffusers'
layout: YAML front matter (``base_model``, ``library_name: diffusers``, ``license`` when known,
``tags``, ``instance_prompt``), a title, the sample grid, the training facts and how to load the
LoRA in diffusers, ComfyUI and AUTOMATIC1111.

Why not ``diffusers.utils.hub_utils.load_or_create_model_card``: it first calls
``ModelCard.load(repo_id_or_path)``, which downloads ``README.md`` from the Hub for anything that
is not an existing card file (no network here, and a worker must not call the Hub), and its
template's body is a list of TODOs. The pieces it is made of work offline and are used:
``huggingface_hub.ModelCardData`` holds the front matter's fields and diffusers'
``populate_model_card`` sets ``library_name`` and the tags; the YAML is written here, each string
a double-quoted scalar on one line with ``<>&[]`` escaped (:func:`yaml_string`), so no text
can add a key, end the block, or be HTML or a link where front matter is shown as Markdown. The
body is written here too.

Text that can come from a job message (the style token, and the validation prompts holding it)
is data: in Markdown it is HTML-escaped and its Markdown punctuation backslash-escaped, on one
line (:func:`markdown_text`); inside code blocks it is a quoted string literal on one line
(:func:`code_text`), so it can neither close the block nor add HTML, links or headings.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

__all__ = [
    "MODEL_CARD_NAME",
    "SAMPLES_NAME",
    "TAGS",
    "code_text",
    "markdown_text",
    "metadata_from_file",
    "render_model_card",
    "write_model_card",
    "yaml_string",
]

MODEL_CARD_NAME = "README.md"
"""The card's file name, beside the LoRA files (as on the Hugging Face Hub)."""
SAMPLES_NAME = "samples.png"
"""The final sample grid's file name, beside the card (the card links it by this name)."""
TAGS = ("text-to-image", "stable-diffusion", "stable-diffusion-diffusers", "diffusers", "lora")
"""The card's tags (diffusers' LoRA training scripts use the same)."""

_KNOWN_LICENSES = {
    # SD1.5's CreativeML OpenRAIL-M carries over to derivatives (its use restrictions apply)
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MARKDOWN_PUNCTUATION = frozenset("\\`*_{}[]()#+-.!|~=:")
_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&#x27;"}
_YAML_ESCAPES = {ch: f"\\u{ord(ch):04x}" for ch in "<>&[]"}


def _unprintable(ch: str) -> bool:
    """Control, format, surrogate and line/paragraph separator characters (newlines too)."""
    return unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}


def markdown_text(value: object) -> str:
    r"""``value`` as literal inline Markdown text: no HTML, link, emphasis, heading or new line.

    HTML's special characters become entities, Markdown's punctuation is backslash-escaped
    (CommonMark allows it before any ASCII punctuation, also in GFM table cells), and control
    characters and line separators are shown as ``\uXXXX``.
    """
    out: list[str] = []
    for ch in str(value):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MARKDOWN_PUNCTUATION:
            out.append("\\" + ch)
        elif _unprintable(ch):
            out.append(f"\\\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def code_text(value: object) -> str:
    """``value`` as a double-quoted string literal on one line (Python and YAML read it back).

    Inside a fenced code block nothing but a line starting with the fence can end the block; a
    literal on one line that starts after other code cannot.
    """
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(_escape(ch) if _unprintable(ch) else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\U{code:08x}" if code > 0xFFFF else f"\\u{code:04x}"


def metadata_from_file(metadata: Mapping[str, str]) -> dict[str, Any]:
    """A LoRA file's safetensors metadata (``ss_*`` strings) as the export's values.

    ``export_lora`` stores ``key`` as ``ss_key`` (``lightning_lora*`` keys as they are) and
    every non-string value as JSON; this undoes both, so a card can be rendered from the file.
    """
    values: dict[str, Any] = {}
    for key, raw in metadata.items():
        name = key.removeprefix("ss_")
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
    return values


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "unknown" if value is None else str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


#: The card's name of each ``lightning_lora_network_type``.
_NETWORK_NAMES = {
    "lora": "LoRA",
    "locon": "LoCon (LoRA on the attention projections and the convolutions)",
    "loha": "LoHa (LyCORIS Hadamard product)",
    "lokr": "LoKr (LyCORIS Kronecker product)",
}


def _lora_type(md: Mapping[str, Any]) -> str:
    network = _NETWORK_NAMES.get(str(md.get("lightning_lora_network_type") or "lora"), "LoRA")
    kind = "DoRA (weight-decomposed LoRA)" if md.get("lightning_lora_use_dora") else network
    if md.get("lightning_lora_use_rslora"):
        kind += ", rank-stabilised scaling (alpha/sqrt(rank))"
    parts = "UNet and text encoder" if md.get("train_text_encoder") else "UNet"
    return f"{kind} (PEFT) of the {parts}"


def _front_matter(md: Mapping[str, Any], trigger: str | None) -> ModelCardData:
    base = str(md.get("base_model") or "")
    # only a Hub id is a valid base_model (a local folder path is not, and names this machine)
    hub_base = base if _HUB_ID.fullmatch(base) and not Path(base).exists() else None
    return ModelCardData(
        base_model=hub_base,
        license=_KNOWN_LICENSES.get(base),
        instance_prompt=trigger or None,
    )


def _facts_table(md: Mapping[str, Any], trigger: str | None) -> list[str]:
    rows: list[tuple[str, str]] = [
        ("base model", markdown_text(md.get("base_model") or "unknown")),
        ("trigger (style token)", markdown_text(trigger) if trigger else "none"),
        ("LoRA type", markdown_text(_lora_type(md))),
        ("rank", _number(md.get("network_dim"))),
        ("alpha", _number(md.get("network_alpha"))),
    ]
    if md.get("train_text_encoder"):
        te = (
            md.get("lightning_lora_text_encoder_dim"),
            md.get("lightning_lora_text_encoder_alpha"),
        )
        rows.append(("text encoder rank / alpha", f"{_number(te[0])} / {_number(te[1])}"))
    targets = md.get("target_modules") or []
    rows += [
        ("target modules", markdown_text(", ".join(map(str, targets)) or "unknown")),
        ("epochs", _number(md.get("num_epochs"))),
        ("steps", _number(md.get("steps"))),
        ("resolution", _number(md.get("resolution"))),
        ("dataset size", f"{_number(md.get('num_train_images'))} images"),
        ("dataset hash (SHA-256)", markdown_text(md.get("dataset_hash") or "unknown")),
        ("learning rate", _number(md.get("learning_rate"))),
        ("optimizer", markdown_text(md.get("optimizer") or "unknown")),
        ("seed", _number(md.get("seed"))),
        ("trained with", f"lightning\\_lora {markdown_text(md.get('lightning_lora_version', ''))}"),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def render_model_card(
    metadata: Mapping[str, Any],
    *,
    trigger: str | None,
    prompts: Sequence[str] = (),
    samples: str | None = None,
    diffusers_weight_name: str = "pytorch_lora_weights.safetensors",
    kohya_weight_name: str | None = "lora_kohya.safetensors",
    example_prompt: str | None = None,
) -> str:
    """The card's text.

    Args:
        metadata: The LoRA's metadata as :func:`~lightning_lora.lora.export.export_lora` wrote it
            (``TrainResult.metadata``, or :func:`metadata_from_file` of a LoRA file).
        trigger: The style token (trigger word) the captions carried, if any.
        prompts: The sample grid's prompts, row by row, left to right.
        samples: The sample grid's file name beside the card (``samples.png``), or ``None``.
        diffusers_weight_name: The diffusers file's name beside the card.
        kohya_weight_name: The kohya file's name beside the card (``None``: not written, DoRA).
        example_prompt: The prompt of the usage examples (default: the first sample prompt, else
            the trigger).

    Returns:
        ``README.md`` text: YAML front matter, then Markdown.
    """
    md = metadata
    default = f"an artwork in the style of {trigger}" if trigger else "an artwork"
    example = example_prompt or (prompts[0] if prompts else default)
    base = markdown_text(md.get("base_model") or "unknown")
    title = f"Style LoRA: {markdown_text(trigger)}" if trigger else "Style LoRA"
    lines = [
        f"# {title}",
        "",
        f"A {markdown_text(_lora_type(md))} for {base}, rank {_number(md.get('network_dim'))}, "
        f"alpha {_number(md.get('network_alpha'))}, trained by lightning\\_lora for "
        f"{_number(md.get('num_epochs'))} epochs ({_number(md.get('steps'))} steps) on "
        f"{_number(md.get('num_train_images'))} images.",
        "",
    ]
    if trigger:
        lines += [f"Trigger word: **{markdown_text(trigger)}**; use it in your prompts.", ""]
    if samples:
        lines += [f"![samples at the end of training]({samples})", ""]
        if prompts:
            lines.append("Prompts, row by row, left to right:")
            lines += [f"{i}. {markdown_text(p)}" for i, p in enumerate(prompts, 1)]
            lines.append("")
    lines += ["## Training", "", *_facts_table(md, trigger), ""]
    lines += _usage(md, example, diffusers_weight_name, kohya_weight_name)
    card = ModelCard(f"---\n{_front_matter(md, trigger).to_yaml()}\n---\n")
    data = populate_model_card(card, tags=list(TAGS)).data.to_dict()
    return f"---\n{_yaml_block(data)}\n---\n\n" + "\n".join(lines)


def _yaml_block(data: Mapping[str, Any]) -> str:
    """The front matter's YAML, every string a double-quoted scalar on one line.

    ``ModelCardData.to_yaml`` (``yaml.dump``) keeps the values YAML-safe but writes them raw
    (``<script>`` stays ``<script>``, long values wrap over lines); a viewer that does not know
    front matter shows it as Markdown. Written as :func:`yaml_string` scalars, no value holds a
    raw ``<>&[]`` or line break, and YAML reads back the exact text.
    """
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, list | tuple):
            lines.append(f"{key}:")
            lines += [f"- {yaml_string(item)}" for item in value]
        else:
            lines.append(f"{key}: {yaml_string(value)}")
    return "\n".join(lines)


def yaml_string(value: object) -> str:
    """``value`` as a YAML double-quoted scalar (also a JSON string), one line, no raw ``<>&[]``.

    Without them no HTML, link or image can appear where front matter is shown as Markdown.
    """
    return "".join(_YAML_ESCAPES.get(ch, ch) for ch in code_text(value))


def _usage(
    md: Mapping[str, Any], prompt: str, diffusers_name: str, kohya_name: str | None
) -> list[str]:
    base = str(md.get("base_model") or "stable-diffusion-v1-5/stable-diffusion-v1-5")
    lines = [
        "## How to use",
        "",
        "### diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f"pipe = StableDiffusionPipeline.from_pretrained({code_text(base)}, "
        'torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("path/to/this/folder", weight_name={code_text(diffusers_name)})',
        f"image = pipe({code_text(prompt)}, num_inference_steps=25).images[0]",
        "```",
        "",
    ]
    if md.get("lightning_lora_network_type") in ("loha", "lokr"):  # diffusers loads no LyCORIS
        lines = [
            "## How to use",
            "",
            "### lightning-lora-generate (PEFT)",
            "",
            "diffusers' `load_lora_weights` takes LoRA and LoCon only; this LyCORIS network "
            "loads through PEFT:",
            "",
            "```bash",
            f"lightning-lora-generate --model {code_text(base)[1:-1]} --lora path/to/this/folder "
            f"--prompt {code_text(prompt)}",
            "```",
            "",
        ]
    if kohya_name is None:
        return [
            *lines,
            "### ComfyUI and AUTOMATIC1111",
            "",
            "Not available: this is a DoRA, which the kohya format (A1111, ComfyUI) cannot "
            "carry; only the diffusers file is written.",
            "",
        ]
    tag = Path(kohya_name).stem
    shown = markdown_text(kohya_name)
    return [
        *lines,
        "### ComfyUI",
        "",
        f"Copy {shown} into `ComfyUI/models/loras/`, add a **Load LoRA** node (`LoraLoader`) "
        "between *Load Checkpoint* and the CLIP text encoders and sampler, choose the file, "
        "and set `strength_model` and `strength_clip` to 1.0.",
        "",
        "### AUTOMATIC1111",
        "",
        f"Copy {shown} into `stable-diffusion-webui/models/Lora/` and add "
        f"`<lora:{tag}:1>` to the prompt (the tag is the file name without its extension):",
        "",
        "```text",
        f"<lora:{tag}:1> {code_text(prompt)[1:-1]}",
        "```",
        "",
    ]


def write_model_card(folder: str | Path, text: str) -> Path:
    """Write ``text`` to ``folder/README.md`` (UTF-8) and return its path."""
    path = Path(folder) / MODEL_CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
