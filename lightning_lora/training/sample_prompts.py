"""Sample prompts of the validation grid: strings, mappings, and kohya's prompt files.

``validation.prompts`` holds strings or mappings ``{prompt, negative_prompt, seed, width, height,
steps, guidance_scale}``; ``validation.prompts_file`` is a prompt file in kohya sd-scripts' syntax
(``library/train_util.py``'s sample prompts): one prompt a line, with options split off at
``" --"``: ``--n`` negative prompt, ``--w`` width, ``--h`` height, ``--d`` seed, ``--l`` guidance
scale, ``--s`` steps. Blank lines and lines starting with ``#`` are skipped; options kohya knows
but this sampler does not (``--ss`` sampler, ``--cn`` ...) are ignored with a warning, as kohya
ignores what it cannot parse. Like kohya, widths and heights are rounded down to a multiple of 8
(at least 64) and steps are clamped to 1..1000. Prompt text is data: only the literal
``{token}`` is replaced (:meth:`SamplePrompt.with_token`), nothing is formatted or evaluated.

A setting a prompt leaves out takes the validation config's: its ``seed`` plus the prompt's index
(the old per-prompt seeds), its steps and guidance scale, the sample resolution.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "SamplePrompt",
    "parse_prompt_line",
    "read_prompts_file",
    "resolve_sample_prompts",
]

log = logging.getLogger(__name__)

#: kohya's option letters -> our field names
_KOHYA_OPTIONS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "l": "guidance_scale",
    "s": "steps",
}
_OPTION = re.compile(r"([A-Za-z]+)(?:\s+(.*))?\Z", re.DOTALL)


@dataclass(frozen=True)
class SamplePrompt:
    """One sample of the grid with its own settings (``None``: the validation config's).

    Attributes:
        prompt: The prompt.
        negative_prompt: The negative prompt (``""``: none).
        seed: Seed of the initial noise.
        width: Image width in pixels (a multiple of 8).
        height: Image height in pixels (a multiple of 8).
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    def with_token(self, token: str) -> SamplePrompt:
        """The prompt with the literal ``{token}`` replaced by ``token`` (nothing else)."""
        return replace(
            self,
            prompt=self.prompt.replace("{token}", token),
            negative_prompt=self.negative_prompt.replace("{token}", token),
        )

    def filled(
        self, seed: int, width: int, height: int, steps: int, guidance_scale: float
    ) -> SamplePrompt:
        """The prompt with every unset setting taken from the given defaults."""
        return SamplePrompt(
            self.prompt,
            self.negative_prompt,
            seed if self.seed is None else self.seed,
            width if self.width is None else self.width,
            height if self.height is None else self.height,
            steps if self.steps is None else self.steps,
            guidance_scale if self.guidance_scale is None else self.guidance_scale,
        )


def _side(value: int) -> int:
    """The sample side as kohya rounds it: down to a multiple of 8, at least 64."""
    return max(64, value - value % 8)


def _convert(name: str, value: Any) -> Any:
    """A setting's value in its type (kohya's clamps applied); ``ValueError`` when it has none."""
    if value is None:
        return None
    if name in ("prompt", "negative_prompt"):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if name == "guidance_scale":
        return float(value)
    number = int(str(value).strip()) if isinstance(value, str) else value
    if not isinstance(number, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if name in ("width", "height"):
        return _side(number)
    if name == "steps":
        return max(1, min(1000, number))
    if number < 0:
        raise ValueError(f"seed must be >= 0, got {value!r}")
    return number


def _from_settings(settings: Mapping[str, Any], where: str) -> SamplePrompt:
    names = {f.name for f in fields(SamplePrompt)}
    unknown = sorted(set(map(str, settings)) - names)
    if unknown:
        raise ValueError(f"{where}: unknown sample prompt key(s) {', '.join(unknown)}")
    if not isinstance(settings.get("prompt"), str):
        raise ValueError(f"{where}: a sample prompt needs a 'prompt' string")
    try:
        values = {str(k): _convert(str(k), v) for k, v in settings.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if values.get("negative_prompt") is None:
        values.pop("negative_prompt", None)
    return SamplePrompt(**values)


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt:
    """One line of a kohya prompt file: ``prompt --n neg --w 512 --h 768 --d 1 --l 7 --s 28``.

    Args:
        line: The line (without its newline).
        where: Names the line in errors (``file:line``).

    Returns:
        The prompt and its options.

    Raises:
        ValueError: An option with a bad value (the message names ``where``).
    """
    parts = line.split(" --")
    settings: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        key = match.group(1).lower() if match else ""
        if key not in _KOHYA_OPTIONS:
            log.warning("%s: sample prompt option --%s ignored", where, part.strip())
            continue
        value = (match.group(2) or "").strip() if match else ""
        if not value:
            raise ValueError(f"{where}: option --{key} needs a value")
        name = _KOHYA_OPTIONS[key]
        try:
            settings[name] = value if name == "negative_prompt" else _parse_number(name, value)
        except ValueError as exc:
            raise ValueError(f"{where}: bad value for --{key}: {value!r}") from exc
    return _from_settings(settings, where)


def _parse_number(name: str, value: str) -> int | float:
    if name == "guidance_scale":
        return float(value)
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a kohya prompt file (blank lines and ``#`` comments skipped).

    Raises:
        ValueError: A line with a bad option value (the message names the file and line).
        FileNotFoundError: No such file.
    """
    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        prompts.append(parse_prompt_line(text, f"{path}:{number}"))
    return prompts


def resolve_sample_prompts(
    prompts: Iterable[str | Mapping[str, Any]] = (), prompts_file: str | Path | None = None
) -> list[SamplePrompt]:
    """``validation.prompts`` (strings or mappings) then ``validation.prompts_file``'s prompts.

    Raises:
        ValueError: A mapping with an unknown key or a bad value, or a bad prompt file line.
    """
    out = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            out.append(SamplePrompt(item))
        elif isinstance(item, Mapping):
            out.append(_from_settings(item, f"validation.prompts[{i}]"))
        else:
            raise ValueError(
                f"validation.prompts[{i}] must be a string or a mapping, got {type(item).__name__}"
            )
    if prompts_file:
        out.extend(read_prompts_file(prompts_file))
    return out
