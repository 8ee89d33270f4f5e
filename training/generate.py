"""`generate`: sample the three scenes (or given prompts) from a base, optionally with a LoRA."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, input_name, name_list, turn_on
from .models import SDModel, load_model
from .progress import ProgressFn, no_progress
from .safe_io import atomic_save_image, atomic_write_text
from .prompts import SEED_NEGATIVE, SEED_SCENES, fill_prompt, scene_prompts, stray_braces
from .sampling import generate_images


PROMPTS_FILE = "prompts.json"  # beside the images: what made each one, for `evaluate`


@dataclass
class GenerateRequest:
    base: str = "tiny"
    lora: str | None = None
    strength: float = 1.0
    rank: int = 0  # 0: the LoRA as trained
    prompts: list[str] | None = None  # None: the three scenes
    negative: str | None = None  # None: the seed's negative prompt
    token: str | None = None  # None: the LoRA's trigger token, else "sks"
    class_word: str | None = None
    out: Path = Path("generated")
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    resolution: int | None = None
    sampler: str = "ddim"
    overwrite: bool = False  # replace images of the same names already in `out`


@torch.no_grad()
def apply_lora(model: SDModel, lora, strength: float = 1.0) -> int:
    """Merge a LoRA's weight changes into the model's modules, scaled by `strength`. Returns layers changed."""
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    for name, layer in lora.layers.items():
        component, path = name.split(".", 1)
        try:
            weight = modules[component].get_submodule(path).weight
        except AttributeError:
            raise UserError(f"The LoRA changes {name}, which this model does not have; pick the base it was trained on.") from None
        if layer.shape != tuple(weight.shape):
            raise UserError(f"The LoRA's {name} has shape {layer.shape} but the model's is {tuple(weight.shape)}; "
                            "pick the base it was trained on.")
        weight += (strength * layer.weight_change(weight)).to(weight.dtype)  # DoRA: rescaled as ComfyUI does
    return len(lora.layers)


def apply_embeddings(model: SDModel, embeddings: dict[str, torch.Tensor], prompts: list[str]) -> list[str]:
    """Give the model the LoRA's bundled token embeddings and write each trigger word in the prompts as
    its new tokens (what `load_textual_inversion` plus the trigger in a prompt does in diffusers)."""
    from .embedding import Embedding, attach, with_new_tokens

    for trigger, vectors in embeddings.items():
        embedding = Embedding(trigger, vectors)
        attach(model, embedding)
        prompts = [with_new_tokens(p, trigger, embedding.token_names) for p in prompts]
    return prompts


def check_request(req: GenerateRequest) -> None:
    """Refuse settings that would fail (or silently do nothing) only after the model is loaded."""
    if req.steps < 1:
        raise UserError(f"{input_name('steps')}: {req.steps} must be at least 1.")
    if req.resolution is not None and (req.resolution < 64 or req.resolution % 8):
        raise UserError(f"{input_name('resolution')}: {req.resolution} must be a multiple of 8 and at least 64 "
                        "(512 for SD1.5).")
    if req.rank < 0:
        raise UserError(f"{input_name('rank')}: {req.rank} must be 0 (the LoRA as trained) or a lower rank to resize it "
                        "to, such as 4.")
    named = [("prompt", p) for p in req.prompts or []] + [("negative prompt", req.negative or "")]
    for what, text in named:
        stray = stray_braces(text)
        if stray:
            raise UserError(f"The {what} '{text}' has {stray}; only {{token}} and {{class}} are filled in, "
                            "so remove the other braces.")


def output_paths(req: GenerateRequest) -> list[Path]:
    """The files `run_generate` writes: `<scene>_<seed>.png`, or `prompt<i>_<seed>.png` for given prompts."""
    names = [f"prompt{i + 1}" for i in range(len(req.prompts))] if req.prompts else list(SEED_SCENES)
    return [Path(req.out) / f"{name}_{req.seed}.png" for name in names]


def check_outputs(req: GenerateRequest) -> None:
    """Refuse, before any model is read, to replace images an earlier run left in `req.out`."""
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{input_name('out')} {out} is a file; pick a folder for the images.")
    existing = [p.name for p in output_paths(req) if p.exists()]
    if (out / PROMPTS_FILE).exists() and _read_record(out / PROMPTS_FILE) is None:
        existing.append(PROMPTS_FILE)  # not a record generate wrote: the user's own file
    if existing and not req.overwrite:
        raise UserError(f"{input_name('out')} {out} already holds {name_list(existing)}; pick another "
                        f"{input_name('out')} folder, or {turn_on('overwrite')} to replace them.")


def run_generate(req: GenerateRequest, progress: ProgressFn = no_progress, model: SDModel | None = None) -> list[Path]:
    """Write one PNG per prompt into `req.out` (named by scene and seed); returns their paths.
    Images of the same names already there are replaced only with `req.overwrite`."""
    check_request(req)
    check_outputs(req)
    token, class_word = req.token, req.class_word
    lora = None
    if req.lora:
        from .lora import read_lora, resize

        lora = read_lora(req.lora)
        trained = max(layer.rank for layer in lora.layers.values())
        if req.rank > trained:
            raise UserError(f"{input_name('rank')}: {req.rank} is above the LoRA's trained rank {trained}; give 1 to "
                            f"{trained}, or 0 for the LoRA as trained.")
        if req.rank:
            lora, _ = resize(lora, rank=req.rank)
        token = token or lora.metadata.get("dreambooth.token")
        class_word = class_word or lora.metadata.get("dreambooth.class_word")
    token, class_word = token or "sks", class_word or "man"
    if model is None:
        model = load_model(req.base).to("cuda" if torch.cuda.is_available() else "cpu")
    if lora is not None:  # merged into the model's weights: a model passed in keeps the LoRA
        apply_lora(model, lora, req.strength)
    if req.prompts:
        prompts = [fill_prompt(p, token, class_word) for p in req.prompts]
    else:
        prompts = list(scene_prompts(token, class_word).values())
    encoded = prompts  # as the text encoder reads them; `prompts` as the user wrote them, for the record
    if lora is not None and lora.embeddings:  # pivotal tuning: the trigger word reads the learned tokens
        encoded = apply_embeddings(model, lora.embeddings, prompts)
    negative = SEED_NEGATIVE if req.negative is None else req.negative
    images = generate_images(model, encoded, negative, [req.seed] * len(prompts),
                             resolution=req.resolution, steps=req.steps, guidance=req.guidance,
                             sampler=req.sampler, progress=progress)
    written = [atomic_save_image(im, path) for path, im in zip(output_paths(req), images)]
    rank = max(layer.rank for layer in lora.layers.values()) if lora is not None else None
    record_prompts(req, written, prompts, negative, rank)
    return written


def record_prompts(req: GenerateRequest, images: list[Path], prompts: list[str], negative: str,
                   rank: int | None) -> Path:
    """Add what made each image to `<out>/prompts.json`, the file `evaluate` reads (scene, prompt, method,
    rank); entries of other images already listed there stay."""
    path = Path(req.out) / PROMPTS_FILE
    listed = _read_record(path) or {}
    model = Path(req.lora).name if req.lora else (req.base if req.base == "tiny" else Path(req.base).name)
    for image, prompt in zip(images, prompts):
        listed[image.name] = {"scene": image.stem.rsplit("_", 1)[0], "prompt": prompt, "negative": negative,
                              "seed": req.seed, "method": "lora" if req.lora else "base", "rank": rank,
                              "strength": req.strength if req.lora else None, "model": model, "base": str(req.base),
                              "steps": req.steps, "guidance": req.guidance, "sampler": req.sampler}
    return atomic_write_text(path, json.dumps(listed, indent=1, sort_keys=True) + "\n")


def _read_record(path: Path) -> dict | None:
    """The prompts.json at path, or None where there is none or it is not one `record_prompts` could have written."""
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return listed if isinstance(listed, dict) and all(isinstance(v, dict) for v in listed.values()) else None
