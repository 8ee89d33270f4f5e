"""Module names of the SD1.5-family layouts: the LoRA-able modules, their shapes, and every spelling of them.

We write kohya names (`lora_unet_...`, `lora_te_text_model_...`): ComfyUI's LoraLoader,
A1111/Forge, kohya and diffusers all read them, while ComfyUI drops peft/diffusers UNet
keys (`unet.*.lora_A.weight`) with a "lora key not loaded" log line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import ldm_keys
from ..models import FAMILY_CONFIGS

FAMILIES = tuple(FAMILY_CONFIGS)  # SD1.5-family layouts; a LoRA's shapes say which one it was made on


@dataclass(frozen=True)
class ModuleTable:
    """The LoRA-able modules (Linear, Conv2d) of one SD1.5-family layout and their spellings."""

    family: str
    shapes: dict[str, tuple[int, ...]]  # canonical name -> weight shape
    aliases: dict[str, str]  # kohya / ldm spelling -> canonical name
    ldm: dict[str, str]  # canonical UNet name -> ldm module path (no prefix)


MODULE_TABLE_FILE = "module_table.json"  # shipped in each family's config folder


@lru_cache(maxsize=None)
def module_table(family: str) -> ModuleTable:
    """Read from the family's shipped module_table.json (building it costs ~0.2 s of meta-model
    construction per family, and every LoRA read tries each family)."""
    shipped = FAMILY_CONFIGS[family] / MODULE_TABLE_FILE
    rows = json.loads(shipped.read_text()) if shipped.is_file() else module_rows(family)
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    ldm: dict[str, str] = {}
    for path, (shape, ldm_path) in rows["unet"].items():
        name = f"unet.{path}"
        shapes[name] = tuple(shape)
        ldm[name] = ldm_path
        aliases[f"lora_unet_{path.replace('.', '_')}"] = name
        aliases[f"lora_unet_{ldm_path.replace('.', '_')}"] = name
        aliases[f"diffusion_model.{ldm_path}"] = name
    for path, shape in rows["text_encoder"].items():
        name = f"text_encoder.{path}"
        shapes[name] = tuple(shape)
        aliases[f"lora_te_text_model_{path.replace('.', '_')}"] = name
    return ModuleTable(family, shapes, aliases, ldm)


def module_rows(family: str) -> dict[str, dict[str, list]]:
    """The LoRA-able modules of a family, from a meta-device model: UNet path -> [shape, ldm path],
    text-encoder path -> shape. `scripts/build_module_tables.py` writes them to module_table.json."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = FAMILY_CONFIGS[family]
    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    rows: dict[str, dict[str, list]] = {"unet": {}, "text_encoder": {}}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            ldm_path = _unet_ldm_path(path, config["layers_per_block"], config["up_block_types"])
            rows["unet"][path] = [list(module.weight.shape), ldm_path]
    for path, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            # older transformers nest the model one level deeper
            rows["text_encoder"][path.removeprefix("text_model.")] = list(module.weight.shape)
    return rows


def _unet_ldm_path(path: str, layers_per_block: int, up_block_types: list[str]) -> str:
    if path.startswith("up_blocks.") and ".upsamplers." in path:
        has_attention = up_block_types[int(path.split(".")[1])].startswith("CrossAttn")
        key = ldm_keys.unet_upsampler_key_to_ldm(path + ".weight", layers_per_block, has_attention)
    else:
        key = ldm_keys.unet_key_to_ldm(path + ".weight", layers_per_block)
    return key.removesuffix(".weight")


def kohya_name(name: str) -> str:
    """`unet.down_blocks.0...attn1.to_q` -> `lora_unet_down_blocks_0_..._attn1_to_q`."""
    component, path = name.split(".", 1)
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")


_OLD_TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def canonical_name(module_key: str, table: ModuleTable) -> str | None:
    """Any supported spelling of a module -> its canonical name in `table`, or None."""
    key = module_key
    if key.startswith("lycoris_"):  # SimpleTuner's LyCORIS-plain-LoRA prefix, ComfyUI maps it to the UNet
        key = "lora_unet_" + key[len("lycoris_"):]
    if key.startswith("lora_te1_"):
        key = "lora_te_" + key[len("lora_te1_"):]
    if key.startswith(("lora_unet_", "lora_te_", "diffusion_model.")):
        return table.aliases.get(key)
    if key.startswith("text_encoders."):  # ComfyUI's own: text_encoders.clip_l.transformer.text_model....
        key = "text_encoder." + key[len("text_encoders."):].removeprefix("clip_l.").removeprefix("transformer.")
    if key.startswith("unet.base_model.model."):
        key = "unet." + key[len("unet.base_model.model."):]
    key = key.removeprefix("base_model.model.")
    candidates = [key] if key.startswith(("unet.", "text_encoder.")) else [f"unet.{key}", f"text_encoder.{key}"]
    for candidate in candidates:
        candidate = _fix_diffusers_spelling(candidate)
        if candidate in table.shapes:
            return candidate
    return None


def _fix_diffusers_spelling(name: str) -> str:
    component, path = name.split(".", 1)
    if component == "unet":
        path = path.replace(".processor.", ".")  # attention-processor LoRA: attn1.processor.to_q
        if path.endswith(".to_out"):
            path += ".0"
        return f"unet.{path}"
    path = path.removeprefix("text_model.")
    head, _, leaf = path.rpartition(".")
    if head.endswith("self_attn") and leaf in _OLD_TEXT_ATTENTION:
        path = f"{head}.{_OLD_TEXT_ATTENTION[leaf]}"
    return f"text_encoder.{path}"
