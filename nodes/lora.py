"""Load Subject LoRA (any format, optional rank change, applied by ComfyUI itself; a bundled learned embedding
attached to the CLIP it returns) and Extract Subject LoRA (a LoRA from a DreamBooth checkpoint, for the rank sweep)."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections import OrderedDict
from pathlib import Path

from .host import (CATEGORY, NONE_CHOICE, HostProgress, NodeError, check_output_name, file_signature,
                   first_model_folder, model_choices, model_file, name_in_model_folder, user_errors)

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
CACHE_SIZE = 4  # prepared LoRAs kept in memory: a new strength or base model does not read and resize again
_PREPARED: OrderedDict[tuple, tuple[dict, str, dict]] = OrderedDict()
EMBEDDING_PREFIX = "subject_lora."  # internal embedding names on a tokenizer copy: `embedding:subject_lora.sks`


# ---------------------------------------------------------------- pure helpers


def lora_module(key: str) -> str:
    """`lora_unet_x.lora_down.weight` -> `lora_unet_x`."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def describe_ranks(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    low, high = min(ranks), max(ranks)
    return str(low) if low == high else f"{low}-{high} (per layer)"


def trigger_of(metadata: dict) -> str:
    token = metadata.get("dreambooth.token")
    if token:
        return " ".join(p for p in (token, metadata.get("dreambooth.class_word", "")) if p)
    return metadata.get("modelspec.trigger_phrase", "") or "unknown (not in the file's metadata)"


def prepare_lora(path: Path, rank: int, keep_energy: float) -> tuple[dict, str, dict]:
    """The kohya state dict (fp32) of a LoRA file in any format, resized when asked, a one-paragraph
    description and its bundled embeddings (trigger -> [N, 768]). Cached by (file sha256, rank, keep_energy)."""
    import torch

    from ..training.lora import kohya_state_dict, read_lora, resize
    from ..training.models import file_sha256

    key = (file_sha256(path), rank, keep_energy)
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    lora = read_lora(path)
    if lora.unmapped:
        keys = list(lora.unmapped)
        raise NodeError(f"{path.name}: {len(keys)} keys do not fit an SD1.5 layer and would be lost "
                        f"(e.g. {', '.join(keys[:3])}: {lora.unmapped[keys[0]]}).")
    trained = [layer.rank for layer in lora.layers.values()]
    alphas = sorted({round(layer.alpha, 4) for layer in lora.layers.values()})
    line = (f"{path.name}: {len(lora.layers)} layers ({lora.source_format}), trained rank {describe_ranks(trained)}"
            f", alpha {'/'.join(f'{a:g}' for a in alphas[:3])}{'...' if len(alphas) > 3 else ''}")
    if rank or keep_energy:
        lora, reports = resize(lora, rank=rank or None, keep_energy=keep_energy or None)
        kept = [r.kept for r in reports]
        used = describe_ranks([r.rank_after for r in reports])
        energy = f"kept energy mean {sum(kept) / len(kept):.3f}, min {min(kept):.3f}"
    else:
        used, energy = "as trained", "kept energy 1.000"
    text = f"{line}\nused rank {used}; {energy}\ntrigger: {trigger_of(lora.metadata)}"
    if lora.embeddings:
        from ..training.embedding import Embedding, describe

        text += "".join(f"\nlearned embedding: {describe(Embedding(t, v))}; the word '{t}' in a prompt through "
                        "the returned CLIP reads these vectors" for t, v in lora.embeddings.items())
    prepared = (kohya_state_dict(lora, dtype=torch.float32), text, dict(lora.embeddings))
    _PREPARED[key] = prepared
    while len(_PREPARED) > CACHE_SIZE:
        _PREPARED.popitem(last=False)
    return prepared


def unloadable_keys(state: dict, key_map: dict, weights: dict) -> list[str]:
    """The LoRA modules ComfyUI would not apply: no such layer in its key map, or a shape that
    does not fit the model's weight (a LoRA for another base)."""
    bad = []
    for module in dict.fromkeys(lora_module(k) for k in state):
        target = key_map.get(module)
        if target is None:
            bad.append(f"{module} (no such layer)")
            continue
        down, up = state.get(f"{module}.lora_down.weight"), state.get(f"{module}.lora_up.weight")
        weight = weights.get(target) if isinstance(target, str) else None
        if down is not None and up is not None and weight is not None:
            if up.shape[0] * math.prod(down.shape[1:]) != weight.numel():
                bad.append(f"{module} (shape {tuple(up.shape[:1]) + tuple(down.shape[1:])} vs the model's "
                           f"{tuple(weight.shape)})")
    return bad


# ---------------------------------------------------------------- learned embeddings on a CLIP


def mark_triggers(text: str, names: dict[str, str]) -> str:
    """`text` with each whole-word trigger (any case, as CLIP lowercases) as ` embedding:<internal name> `, the
    host's own embedding syntax; the spaces make it a word of its own wherever the trigger stood."""
    if not names:
        return text
    lowered = {trigger.lower(): name for trigger, name in names.items()}
    pattern = "|".join(re.escape(t) for t in sorted(lowered, key=len, reverse=True))
    return re.sub(rf"(?<![\w:<.])({pattern})(?![\w>])", lambda m: f" embedding:{lowered[m[1].lower()]} ", text,
                  flags=re.IGNORECASE)


class SubjectEmbeddings:
    """Mixed into a copy of ComfyUI's SDTokenizer: the trigger words read learned vectors, held in memory
    (`subject_vectors`: internal name -> [N, d]); every other `embedding:` word is the host's as before."""

    subject_triggers: dict[str, str]  # trigger -> internal name
    subject_vectors: dict

    def tokenize_with_weights(self, text, *args, **kwargs):
        return super().tokenize_with_weights(mark_triggers(text, self.subject_triggers), *args, **kwargs)

    def _try_get_embedding(self, embedding_name):
        found = super()._try_get_embedding(embedding_name)  # (embed, [name,] leftover): its shape per host version
        words = embedding_name.split()
        if words and words[0] in self.subject_vectors:
            return (self.subject_vectors[words[0]], *found[1:])
        return found


_MIXED: dict[type, type] = {}


def with_embeddings(clip, embeddings: dict):
    """Give `clip` (ComfyUI's CLIP, already cloned) its own tokenizer copy whose trigger words read `embeddings`
    (trigger -> [N, d]); the tokenizer that CLIP.clone() shares with the other CLIPs in the graph is untouched."""
    tokenizer = copy.copy(clip.tokenizer)
    attribute = getattr(tokenizer, "clip", None)
    inner = getattr(tokenizer, attribute, None) if isinstance(attribute, str) else None
    width = next(iter(embeddings.values())).shape[-1]
    if inner is None or not hasattr(inner, "_try_get_embedding") or getattr(inner, "embedding_size", None) != width:
        raise NodeError(f"The LoRA carries a learned embedding of width {width}, which this CLIP cannot read; "
                        "use the SD1.5 checkpoint's CLIP.")
    inner = copy.copy(inner)
    if not isinstance(inner, SubjectEmbeddings):
        base = type(inner)
        _MIXED.setdefault(base, type(f"Subject{base.__name__}", (SubjectEmbeddings, base), {}))
        inner.__class__ = _MIXED[base]
        inner.subject_triggers, inner.subject_vectors = {}, {}
    names = {trigger: EMBEDDING_PREFIX + trigger for trigger in embeddings}
    inner.subject_triggers = {**inner.subject_triggers, **names}
    inner.subject_vectors = {**inner.subject_vectors, **{names[t]: v for t, v in embeddings.items()}}
    if inner.embedding_directory is None:  # the host reads `embedding:` words only with a folder list
        inner.embedding_directory = []
    setattr(tokenizer, attribute, inner)
    clip.tokenizer = tokenizer
    return clip


class BundledEmbeddingNote(logging.Filter):
    """ComfyUI's load_lora logs `lora key not loaded: bundle_emb.<name>...` for an embedding a LoRA bundles (the
    core LoraLoader cannot apply it). That one line becomes a plain note; no other record is touched."""

    PREFIX = "lora key not loaded: bundle_emb."

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            name = message[len(self.PREFIX):].split(".", 1)[0]
            record.msg = (f"This LoRA bundles a learned embedding for '{name}'; Load Subject LoRA applies it, or "
                          f"write embedding:<LoRA name>_embedding in the prompt (Train Subject writes that file "
                          "to models/embeddings).")
            record.args = ()
        return True


def install_bundled_embedding_note() -> None:
    """Add the filter to the root logger (where comfy/lora.py logs), once."""
    root = logging.getLogger()
    if not any(isinstance(f, BundledEmbeddingNote) for f in root.filters):
        root.addFilter(BundledEmbeddingNote())


# ---------------------------------------------------------------- nodes


class LoadSubjectLoRA:
    DESCRIPTION = ("Applies a LoRA (kohya, diffusers, peft or ComfyUI format) to the model and CLIP, optionally "
                   "at a lower rank (SVD resize), the way the core LoRA loader does it, so it stacks with other "
                   "LoRA nodes. Any layer ComfyUI could not apply is an error here, not a silent log line. A "
                   "learned embedding in the file (pivotal tuning) goes onto the returned CLIP: its trigger word "
                   "in any prompt through that CLIP reads the learned vectors.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "info")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",
                       "The CLIP with the LoRA applied, and the learned embedding if the file has one.",
                       "Trained rank, used rank, kept energy, the trigger token and any learned embedding.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model to apply the LoRA to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP (text encoder) to apply the LoRA to."}),
                "lora_name": (model_choices("loras", none=True), {"tooltip":
                              "A LoRA from models/loras. Ignored when lora_file is connected (a file trained "
                              "in the same run cannot be picked here yet)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip":
                                   "How strongly the LoRA changes the UNet (1 = as trained)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip":
                                  "How strongly the LoRA changes the text encoder (if it has text encoder layers)."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip":
                         "Apply the LoRA at this lower rank (best rank-r approximation of each layer); "
                         "0 = as trained."}),
                "keep_energy": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Per layer, the smallest rank that keeps this fraction of the update's Frobenius "
                                "norm (e.g. 0.9); 0 = off. With rank too, the smaller of the two."}),
            },
            "optional": {
                "lora_file": ("STRING", {"forceInput": True, "tooltip":
                              "A LoRA file name from Train Subject or Extract Subject LoRA; overrides lora_name."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name="", **_):
        try:
            return file_signature(model_file("loras", lora_name)) if lora_name != NONE_CHOICE else ""
        except Exception:  # noqa: BLE001 - reported when the node runs
            return float("nan")

    def load(self, model, clip, lora_name, strength_model, strength_clip, rank, keep_energy, lora_file=None):
        import comfy.lora
        import comfy.lora_convert
        import comfy.sd

        name = lora_file or lora_name
        path = model_file("loras", name)
        with user_errors():
            state, info, embeddings = prepare_lora(path, rank, keep_energy)
        if strength_model == 0 and strength_clip == 0:
            info += "\nstrengths are 0: not applied"
            return {"ui": {"text": [info]}, "result": (model, clip, info)}
        state = comfy.lora_convert.convert_lora(dict(state))
        key_map, weights = {}, {}
        if model is not None:
            key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
            weights |= model.model.state_dict()
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
            weights |= clip.cond_stage_model.state_dict()
        bad = unloadable_keys(state, key_map, weights)
        if bad:
            raise NodeError(f"{path.name}: {len(bad)} LoRA layers would not load into this model, e.g. "
                            f"{'; '.join(bad[:3])}. Use the SD1.5 checkpoint the LoRA was trained on.")
        model, clip = comfy.sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)
        if embeddings and clip is not None:
            clip = with_embeddings(clip, embeddings)
        info += f"\nstrength model {strength_model:g}, clip {strength_clip:g}"
        return {"ui": {"text": [info]}, "result": (model, clip, info)}


class ExtractSubjectLoRA:
    DESCRIPTION = ("Makes a LoRA from a DreamBooth checkpoint: the best rank-r approximation of what training "
                   "changed in each attention layer (and in the text encoder, if it was trained). Written to "
                   "models/loras; reused while both checkpoints and the rank stay the same.")
    CATEGORY = CATEGORY
    FUNCTION = "extract"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_file", "report")
    OUTPUT_TOOLTIPS = ("The written LoRA's name in models/loras, for Load Subject LoRA.",
                       "Ranks and the kept fraction of each layer's change.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base_checkpoint": (model_choices("checkpoints"), {"tooltip":
                                    "The checkpoint the DreamBooth model was trained from."}),
                "tuned_checkpoint": ("STRING", {"forceInput": True, "tooltip":
                                     "The DreamBooth checkpoint's name (from Train Subject)."}),
                "rank": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip":
                         "Rank of the extracted LoRA. Extract once at a high rank and lower it in Load Subject "
                         "LoRA to compare ranks."}),
                "output_name": ("STRING", {"default": "", "tooltip":
                                "File name in models/loras; empty = <tuned checkpoint>_r<rank>."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, base_checkpoint="", **_):
        try:
            return file_signature(model_file("checkpoints", base_checkpoint))
        except Exception:  # noqa: BLE001 - reported when the node runs
            return float("nan")

    def extract(self, base_checkpoint, tuned_checkpoint, rank, output_name, unique_id=None):
        from ..training.lora import extract, format_report, write_kohya
        from ..training.models import file_sha256

        base = model_file("checkpoints", base_checkpoint)
        tuned = model_file("checkpoints", tuned_checkpoint)
        stem = check_output_name(output_name or f"{tuned.stem}_r{rank}")
        out = first_model_folder("loras") / f"{stem}.safetensors"
        key = json.dumps([file_sha256(base), file_sha256(tuned), rank])
        written = _metadata(out)
        if written.get("dreambooth.extract_key") == key:
            report = f"Reused {out}: extracted from the same checkpoints at rank {rank}."
        else:
            if out.exists() and "dreambooth.extract_key" not in written:
                raise NodeError(f"{out} exists and was not extracted by this node; choose another output_name.")
            with user_errors():
                lora, reports = extract(base, tuned, rank=rank, text_encoder=_trained_text_encoder(tuned),
                                        progress=HostProgress(unique_id))
                lora.metadata |= {k: v for k, v in _metadata(tuned).items() if k in ("dreambooth.token",
                                                                                    "dreambooth.class_word")}
                write_kohya(lora, out, metadata={"dreambooth.extract_key": key})
            report = f"Extracted {out} at rank {rank} from {tuned.name} - {base.name}\n" + format_report(reports)
            report += "".join(f"\n{note}" for note in lora.notes)
        return {"ui": {"text": [report]}, "result": (name_in_model_folder("loras", out), report)}


def _metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    from ..training.safe_io import read_metadata

    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - not a safetensors file: no metadata
        return {}


def _trained_text_encoder(checkpoint: Path) -> bool:
    """Whether our trainer trained the text encoder of this checkpoint (its config is in the metadata).
    Unknown files: no; a fp32 base against an fp16 copy would otherwise 'extract' rounding noise."""
    try:
        return bool(json.loads(_metadata(checkpoint).get("dreambooth.config", "{}")).get("train_text_encoder"))
    except ValueError:
        return False
