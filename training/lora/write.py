"""Writing LoRAs: the trainer's peft state -> `LoraFile`, and `LoraFile` -> a kohya-format .safetensors
with kohya `ss_*`, `modelspec.*` and our `dreambooth.*` metadata."""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..embedding import Embedding, bundled_tensors
from ..errors import UserError
from ..models import FAMILY_CONFIGS
from .layers import LoraFile, LoraLayer
from .names import kohya_name
from .read import parse_state

VARIANT_KEY = "dreambooth.lora_variant"  # "lora", "dora", "rslora" or "dora+rslora"
LORAPLUS_KEY = "dreambooth.loraplus_ratio"  # B's learning rate / A's, when LoRA+ trained it


def peft_state_to_lora(unet_state: Mapping[str, torch.Tensor] | None,
                       text_encoder_state: Mapping[str, torch.Tensor] | None = None,
                       alpha: float | Mapping[str, Any] = 1.0, metadata: Mapping[str, str] | None = None,
                       base_weight: Callable[[str], torch.Tensor] | None = None) -> LoraFile:
    """`get_peft_model_state_dict(unet)` (and of the text encoder) -> `LoraFile`.

    `alpha` is a number (peft's `lora_alpha`) or a peft `LoraConfig.to_dict()`-like mapping
    (`lora_alpha`, `alpha_pattern`, `use_rslora`, `use_dora`). rsLoRA's alpha / sqrt(r) becomes the
    alpha that gives that scale as alpha / r. `base_weight(name)`: the frozen weight of a canonical
    module, which turns peft's DoRA magnitudes into the kohya `dora_scale` ComfyUI applies.
    """
    config = dict(alpha) if isinstance(alpha, Mapping) else {"lora_alpha": float(alpha)}
    state: dict[str, torch.Tensor] = {}
    for component, part in (("unet", unet_state), ("text_encoder", text_encoder_state)):
        for key, tensor in (part or {}).items():
            state[f"{component}.{key.removeprefix('base_model.model.')}"] = tensor
    variant = [name for name, on in (("dora", config.get("use_dora")), ("rslora", config.get("use_rslora"))) if on]
    meta = {VARIANT_KEY: "+".join(variant) or "lora"} | dict(metadata or {})
    lora = parse_state(state, meta, "the trained LoRA", config)
    lora.source_format = "peft"
    if base_weight is not None:
        lora.layers = {name: layer.with_base_norm(base_weight(name)) for name, layer in lora.layers.items()}
    return lora



def kohya_metadata(lora: LoraFile, *, title: str | None = None, steps: int | None = None,
                   token: str | None = None, class_word: str | None = None, base_sha256: str | None = None,
                   base_name: str | None = None, training: Mapping[str, Any] | None = None,
                   resolution: int | None = None) -> dict[str, str]:
    """The kohya `ss_*`, `modelspec.*` and our `dreambooth.*` metadata for a LoRA we write.

    The network-shape keys (dim, alpha, args) are recomputed by `write_kohya` from the layers.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    if resolution is None:
        unet_config = json.loads((FAMILY_CONFIGS[lora.family] / "unet" / "config.json").read_text())
        resolution = int(unet_config["sample_size"]) * 8  # the native image size: 512 for SD1.5, 64 for tiny
    meta = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or "LoRA",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "dreambooth.family": lora.family,
    }
    if title:
        meta["ss_output_name"] = title
    if steps is not None:
        meta["ss_steps"] = meta["ss_max_train_steps"] = str(int(steps))
    if base_name:
        meta["ss_sd_model_name"] = base_name
    if base_sha256:
        meta["ss_new_sd_model_hash"] = base_sha256
        meta["dreambooth.base_sha256"] = base_sha256
    if token:
        meta["dreambooth.token"] = token
        meta["modelspec.trigger_phrase"] = f"{token} {class_word}" if class_word else token
    if class_word:
        meta["dreambooth.class_word"] = class_word
    if training:
        meta["dreambooth.training_config"] = json.dumps(dict(training), sort_keys=True, default=str)
    return meta


def kohya_state_dict(lora: LoraFile, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of a kohya file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d), and for
    DoRA `.dora_scale` [out, 1(, 1, 1)] in fp32: the output-axis shape ComfyUI's weight_decompose divides by |W0|."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        if layer.magnitude is not None and layer.magnitude_norm != "base":
            raise UserError(f"{name} is a peft DoRA layer (magnitude over the adapted weight); converting it to a kohya "
                            "dora_scale needs the base model's weights, so load the peft adapter directly instead.")
        down, up = layer.down.float(), layer.up.float()
        if dtype in (torch.float16, torch.bfloat16):
            # the product is what matters; equal magnitudes keep both factors inside the half range
            d_max, u_max = float(down.abs().max()), float(up.abs().max())
            if d_max > 0 and u_max > 0:
                balance = math.sqrt(d_max / u_max)
                down, up = down / balance, up * balance
        key = kohya_name(name)
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        if layer.magnitude is not None:  # fp32 always: fp16 rounds it by 5e-4 of |W0|, as much as a small trained change
            shape = (layer.shape[0], *[1] * (len(layer.shape) - 1))
            out[f"{key}.dora_scale"] = layer.magnitude.float().reshape(shape).contiguous()
    return out


def write_kohya(lora: LoraFile, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write `lora` as a kohya-format `.safetensors` (fp16 by default) atomically."""
    from safetensors.torch import save as save_bytes

    from ..safe_io import atomic_save_safetensors

    if not lora.layers:
        raise UserError(f"There is no LoRA layer to write to {path}; the source had nothing that maps to SD1.5.")
    tensors = kohya_state_dict(lora, dtype)
    for trigger, vectors in lora.embeddings.items():  # A1111's bundle keys: the LoRA carries its token embedding
        tensors |= bundled_tensors(Embedding(trigger, vectors), dtype)
    carried = {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec.", "dreambooth."))}
    meta = kohya_metadata(lora, title=Path(path).stem) | carried | dict(metadata or {})
    meta |= _network_shape_metadata(lora)
    for stale in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        meta.pop(stale, None)
    # kohya's hashes (A1111's additional-networks reads them): over the file written with ss_* metadata only
    blob = save_bytes(tensors, metadata={k: str(v) for k, v in meta.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    meta["sshs_model_hash"] = hashlib.sha256(blob[8 + header:]).hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    digest = hashlib.sha256()
    for tensor in tensors.values():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    meta["modelspec.hash_sha256"] = "0x" + digest.hexdigest()
    del blob
    return atomic_save_safetensors(tensors, path, {k: str(v) for k, v in meta.items()})


def _network_shape_metadata(lora: LoraFile) -> dict[str, str]:
    def summary(layers: list[LoraLayer]) -> tuple[str, str]:
        ranks = {layer.rank for layer in layers}
        alphas = {round(layer.alpha, 6) for layer in layers}
        return (str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                str(float(alphas.pop())) if len(alphas) == 1 else "Dynamic")

    linear, conv = [], []
    for layer in lora.layers.values():
        (conv if layer.kind == "conv" and layer.down.shape[2:] != (1, 1) else linear).append(layer)
    dim, alpha = summary(linear or conv)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha,
            "ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.architecture": "stable-diffusion-v1/lora"}
    args = {}
    if conv and linear:
        conv_dim, conv_alpha = summary(conv)
        args |= {"conv_dim": conv_dim, "conv_alpha": conv_alpha}
    # the variant in LyCORIS' and kohya's network_args names, for tools that read ss_network_args
    if any(layer.magnitude is not None for layer in lora.layers.values()):
        args |= {"dora_wd": "True", "wd_on_output": "True"}
    if "rslora" in lora.metadata.get(VARIANT_KEY, ""):
        args["rs_lora"] = "True"
    if lora.metadata.get(LORAPLUS_KEY):
        args["loraplus_lr_ratio"] = lora.metadata[LORAPLUS_KEY]
    if args:
        meta["ss_network_args"] = json.dumps(args)
    te = lora.components()["text_encoder"]
    meta["ss_network_train_unet_only"] = str(te == 0)
    meta["ss_network_train_text_encoder_only"] = str(lora.components()["unet"] == 0)
    return meta
