"""Prompts of the three-scene test (the seed's), and filling in the subject. No heavy imports."""
from __future__ import annotations

import re

from .errors import UserError

_BRACED = re.compile(r"\{[^{}]*\}?|\}")
_FILLED = {"{token}", "{class}", "{class_word}"}

SEED_NEGATIVE = (
    "naked, nsfw, deformed, distorted, disfigured, poorly drawn, bad anatomy, extra limb, missing limb, "
    "floating limbs, mutated hands, disconnected limbs, mutation, ugly, blurry, amputation"
)
SEED_SCENES = {
    "forest": "portrait of {token} {class} face, in the forest, standing, 4K, raw, hrd, hd, high quality, sharp focus",
    "desert": "middle view portrait of {token} {class}, in the desert, running, 4K, raw, hrd, hd, high quality, realism, sharp focus",
    "mountains": "close-up portrait of {token} {class}, in the mountains, snow, trees, standing, 4K, raw, hrd, hd, high quality, realism, sharp focus",
}
# The off-identity probe of the validation set: a subject rendered without the purple hair means the run
# is overfitting (the token has learned one picture, not a person who can be changed by the prompt).
PROBE_PROMPT = "{token} {class} with purple hair"


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """Substitute `{token}` and `{class}` (and `{class_word}`); any other braces stay as written."""
    return template.replace("{token}", token).replace("{class_word}", class_word).replace("{class}", class_word)


def stray_braces(text: str) -> str | None:
    """The first brace group that `fill_prompt` would leave in the text (it would reach the model), or None."""
    return next((b for b in _BRACED.findall(text) if b not in _FILLED), None)


def scene_prompts(token: str = "sks", class_word: str = "man", scenes: dict[str, str] | None = None) -> dict[str, str]:
    """The three-scene test prompts with the subject filled in."""
    return {name: fill_prompt(p, token, class_word) for name, p in (scenes or SEED_SCENES).items()}


def parse_scenes(text: str) -> dict[str, str]:
    """`name: prompt` per line (blank lines and `#` comments skipped) -> {name: prompt}."""
    scenes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, prompt = line.partition(":")
        if not sep or not name.strip() or not prompt.strip():
            raise UserError(f"scenes line {number} ('{line[:40]}') must read 'name: prompt', for example "
                            "'forest: portrait of {token} {class} in the forest'.")
        if name.strip() in scenes:
            raise UserError(f"scenes line {number} repeats the scene name '{name.strip()}'; give each scene its own name.")
        scenes[name.strip()] = prompt.strip()
    if not scenes:
        raise UserError("scenes is empty; give at least one 'name: prompt' line.")
    return scenes


def scenes_text(scenes: dict[str, str] | None = None) -> str:
    """The inverse of `parse_scenes`, for a node's default text."""
    return "\n".join(f"{name}: {prompt}" for name, prompt in (scenes or SEED_SCENES).items())
