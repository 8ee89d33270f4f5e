"""Class images for prior preservation: N images of the class prompt from the base model,
cached in a folder keyed by everything that decides what they look like.

    <out_dir>/<class word>_<hash of key>/class_00000.png ...   one image per index, seed = seed + index
    <out_dir>/<class word>_<hash of key>/class_images.json     the key, and the next free index

Every image file in that folder counts, the user's own included, so a user can delete bad
ones and run again: only the missing number is made, at fresh indices (new seeds, so a
deleted image does not come back).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import UserError, input_name
from ..progress import Progress, ProgressFn, no_progress
from ..prompts import stray_braces
from ..safe_io import atomic_save_image, atomic_write_text
from .photos import IMAGE_SUFFIXES

# (prompts, negative, seeds, resolution, steps, guidance) -> one image per prompt
GenerateFn = Callable[[list[str], str, list[int], int, int, float], list[Image.Image]]

CLASS_JSON = "class_images.json"
CLASS_FORMAT = 1
_NAME = re.compile(r"^class_(\d+)\.png$")


@dataclass
class ClassImageConfig:
    """What to generate; every field but `num` and `batch_size` is part of the cache key. `{class}` in the
    prompt and the negative becomes the class word; other braces are refused."""

    class_word: str = "man"
    prompt: str = "a photo of a {class_word}"
    negative: str = ""
    num: int = 100
    resolution: int = 512
    steps: int = 30
    guidance: float = 7.5
    sampler: str = "ddim"
    seed: int = 0
    batch_size: int = 4

    def validate(self) -> "ClassImageConfig":
        """Raise UserError naming the first bad field; return self."""
        if not isinstance(self.class_word, str) or not self.class_word.strip():
            raise UserError(f"{input_name('class_word')} must be a word such as 'man' or 'dog', got {self.class_word!r}.")
        if not isinstance(self.prompt, str) or not self.class_prompt.strip():
            raise UserError(f"The class prompt must not be empty (e.g. 'a photo of a {{class_word}}'), got {self.prompt!r}.")
        if not isinstance(self.negative, str):
            raise UserError(f"The negative prompt must be text, got {self.negative!r}.")
        for name, text in (("class prompt", self.prompt), ("negative prompt", self.negative)):
            if "{token}" in text:
                raise UserError(f"The {name} has {{token}}, but class images show the class, not the subject; "
                                "remove it.")
            if stray := stray_braces(text):
                raise UserError(f"The {name} has {stray}, which is not filled in (only {{class}} is); "
                                "remove the other braces.")
        for name, low in (("num", 0), ("steps", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{input_name(name)} must be a whole number of at least {low}, got {value!r}.")
        if not isinstance(self.resolution, int) or self.resolution < 64 or self.resolution % 8:
            raise UserError(f"{input_name('resolution')} must be a multiple of 8 of at least 64 (e.g. 512), got {self.resolution!r}.")
        if not isinstance(self.guidance, (int, float)) or isinstance(self.guidance, bool) or self.guidance < 0:
            raise UserError(f"{input_name('guidance')} must be a number of at least 0 (e.g. 7.5), got {self.guidance!r}.")
        if not isinstance(self.sampler, str) or not self.sampler:
            raise UserError(f"{input_name('sampler')} must be a sampler name such as 'ddim', got {self.sampler!r}.")
        return self

    @property
    def class_prompt(self) -> str:
        return self._fill(self.prompt)

    @property
    def class_negative(self) -> str:
        return self._fill(self.negative)

    def _fill(self, text: str) -> str:
        return text.replace("{class_word}", self.class_word.strip()).replace("{class}", self.class_word.strip())

    def cache_key(self, base_id: str) -> dict:
        return {"base": base_id, "prompt": self.class_prompt, "negative": self.class_negative,
                "resolution": self.resolution, "sampler": self.sampler, "steps": self.steps,
                "guidance": float(self.guidance), "seed": self.seed}


@dataclass
class ClassImageReport:
    generated: int
    total: int
    folder: Path

    @property
    def images(self) -> list[Path]:
        return list_images(self.folder)

    def text(self) -> str:
        made = f"generated {self.generated}" if self.generated else "generated none (all cached)"
        return f"Class images: {made}; {self.total} in {self.folder}"


def class_image_folder(out_dir: str | Path, base_id: str, cfg: ClassImageConfig) -> Path:
    """The cache folder for this base model and config."""
    key = json.dumps(cfg.cache_key(base_id), sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", cfg.class_word.strip()).strip("_")[:32] or "class"
    return Path(out_dir) / f"{slug}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def list_images(folder: Path) -> list[Path]:
    """Every image file of the folder (ours and the user's), in name order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def ensure_class_images(generate: GenerateFn, base_id: str, out_dir: str | Path, cfg: ClassImageConfig,
                        progress: ProgressFn = no_progress) -> ClassImageReport:
    """Make sure the cache folder holds at least `cfg.num` images; generate only the missing ones.
    `generate` is e.g. `training.sampling.make_generator(model, cfg.sampler)`; `base_id` the model's sha256."""
    cfg.validate()
    folder = class_image_folder(out_dir, base_id, cfg)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; remove it or choose another class image folder.")
    have = list_images(folder)
    missing = max(0, cfg.num - len(have))
    if not missing:
        return ClassImageReport(0, len(have), folder)

    state = _read_state(folder, cfg.cache_key(base_id))
    used = [int(m.group(1)) for p in have if (m := _NAME.match(p.name))]
    next_index = max([state.get("next_index", 0)] + [i + 1 for i in used])
    prompt = cfg.class_prompt
    done = 0
    progress(Progress("class images", 0, missing, {"note": prompt}))
    while done < missing:
        count = min(cfg.batch_size, missing - done)
        indices = list(range(next_index, next_index + count))
        images = generate([prompt] * count, cfg.class_negative, [cfg.seed + i for i in indices],
                          cfg.resolution, cfg.steps, float(cfg.guidance))
        if len(images) != count:
            raise RuntimeError(f"the generator returned {len(images)} images for {count} prompts")
        for index, image in zip(indices, images):
            atomic_save_image(image.convert("RGB"), folder / f"class_{index:05d}.png", format="PNG")
        next_index += count
        done += count
        _write_state(folder, cfg.cache_key(base_id), next_index)
        progress(Progress("class images", done, missing, {"note": prompt}))
    return ClassImageReport(done, len(list_images(folder)), folder)


def _read_state(folder: Path, key: dict) -> dict:
    try:
        state = json.loads((folder / CLASS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("key") == key else {}


def _write_state(folder: Path, key: dict, next_index: int) -> None:
    state = {"format": CLASS_FORMAT, "key": key, "next_index": next_index}
    atomic_write_text(folder / CLASS_JSON, json.dumps(state, indent=1, ensure_ascii=False) + "\n")
