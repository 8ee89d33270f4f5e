"""Reading LoRAs: kohya, diffusers (current, training-script and attention-processor keys), peft
(state dicts and save_pretrained folders) and ComfyUI files -> one `LoraFile`, or a one-line refusal."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..embedding import BUNDLE_PREFIX, read_bundled
from ..errors import UserError
from ..models import PICKLE_SUFFIXES
from ..safe_io import read_metadata
from .layers import LoraFile, LoraLayer
from .names import FAMILIES, ModuleTable, canonical_name, module_table

# file key suffix -> role; the order matters only where one suffix ends another
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),  # kohya, ComfyUI
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # peft, diffusers >= 0.22
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # peft with the adapter name
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # diffusers text encoder
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # diffusers LoRACompatible layers
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # diffusers attention processors
    (".alpha", "alpha"),
    (".lora_mid.weight", "mid"),  # LoCon Tucker decomposition
    (".dora_scale", "dora_scale"),  # DoRA magnitude over |W0|, as ComfyUI applies a kohya file's
    (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),  # peft DoRA,
    (".lora_magnitude_vector.default.weight", "magnitude"),  # over |W0 + delta W|
)
_FULL_DIFF = (".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight", ".reshape_weight")
_LYCORIS = {".hada_": "LoHa", ".lokr_": "LoKr", ".oft_": "OFT", ".oft_blocks": "OFT", ".a1.weight": "GLoRA", ".on_input": "IA3"}


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _key_format(key: str) -> str:
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lycoris_")):
        return "kohya"
    if key.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    if key.startswith(("base_model.model.", "unet.base_model.model.")):
        return "peft"
    if ".processor." in key or "_lora.down." in key or "_lora.up." in key:
        return "diffusers-attn-processor"
    if key.startswith(("unet.", "text_encoder.")):
        return "diffusers"
    return "peft-state-dict"


def read_lora(source: str | os.PathLike | Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              *, name: str | None = None, peft_config: Mapping[str, Any] | None = None) -> LoraFile:
    """Read a LoRA file (kohya, diffusers, peft, ComfyUI) or state dict into one `LoraFile`.

    Refuses, with one UserError line, files for another base (SD2.x, SDXL), LyCORIS
    LoHa/LoKr, input-axis DoRA, pickles, malformed files and non-finite weights. DoRA layers keep
    their magnitude (kohya `dora_scale`, peft `lora_magnitude_vector`).
    """
    if isinstance(source, Mapping):
        state, meta, label = dict(source), dict(metadata or {}), name or "the LoRA state dict"
    else:
        state, meta, label, found_config = _load_file(Path(source))
        meta |= dict(metadata or {})
        peft_config = peft_config or found_config
    return parse_state(state, meta, label, peft_config)


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str, dict | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.is_dir():  # a peft adapter folder or a diffusers LoRA folder
        for candidate in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise UserError(f"{path} is a folder without adapter_model.safetensors or pytorch_lora_weights.safetensors; give the LoRA .safetensors file.")
    label = path.name
    if not path.exists():
        raise UserError(f"{path} does not exist; give the path of a LoRA .safetensors file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{label} is a pickle file ({path.suffix}), which can run code when loaded and is never opened here; "
                        "convert it to .safetensors first and use that file.")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{label} is not a .safetensors file; give a LoRA saved as .safetensors.")
    try:
        meta = read_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        if keys and not any(_split_key(k) or any(m in k for m in _LYCORIS) for k in keys):
            what = "a full model checkpoint" if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys) else "not a LoRA"
            raise UserError(f"{label} holds no LoRA weights ({len(keys)} tensors such as {keys[0]!r}); it is {what}, "
                            "give a LoRA file instead.")
        state = load_file(str(path))
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise UserError(f"{label} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                        "download or copy it again.") from None
    config = None
    config_file = path.parent / "adapter_config.json"
    if config_file.is_file() and any(k.startswith("base_model.model.") for k in state):
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            raise UserError(f"{config_file} is not valid JSON; restore the adapter_config.json that came with {label}.") from None
    return state, meta, label, config


def parse_state(state: dict[str, torch.Tensor], meta: dict[str, str], label: str,
           peft_config: Mapping[str, Any] | None) -> LoraFile:
    if not state:
        raise UserError(f"{label} holds no tensors; it is not a LoRA.")
    embeddings = {name: e.vectors for name, e in read_bundled(state).items()}  # pivotal tuning's, A1111's format
    state = {k: v for k, v in state.items() if not k.startswith(BUNDLE_PREFIX)}
    _refuse_unsupported(state, meta, label)
    modules: dict[str, dict[str, str]] = {}
    unmapped: dict[str, str] = {}
    for key in state:
        split = _split_key(key)
        if split is None:
            if key.endswith(_FULL_DIFF):
                unmapped[key] = _full_diff_reason(state[key])
            else:
                unmapped[key] = "not a LoRA factor (no lora_down/lora_up/lora_A/lora_B/alpha suffix)"
            continue
        module, role = split
        parts = modules.setdefault(module, {})
        if role in parts:
            unmapped[key] = f"a second {role} weight for {module} (kept {parts[role]})"
            continue
        parts[role] = key
    for module, parts in modules.items():
        if ("down" in parts) != ("up" in parts):
            have, missing = ("down", "up") if "down" in parts else ("up", "down")
            raise UserError(f"{label} is incomplete: {parts[have]} has no matching {missing} weight; "
                            "download or export the LoRA again.")
    formats = sorted({_key_format(parts.get("down") or parts.get("alpha") or next(iter(parts.values())))
                      for parts in modules.values()} or {"unknown"})
    alphas = _peft_alphas(meta, peft_config, label)

    best: tuple[int, str, dict, dict, list] | None = None
    for family in FAMILIES:
        layers, left, notes = _build_layers(state, modules, module_table(family), alphas, label)
        score = len(layers)
        if best is None or score > best[0]:
            best = (score, family, layers, left, notes)
    score, family, layers, left, notes = best
    if not layers:
        first = next(iter(modules), next(iter(state)))
        raise UserError(f"{label} has no layer that fits Stable Diffusion 1.5 ({len(state)} keys, e.g. {first!r}); "
                        "it was made for another model.")
    unmapped |= left
    return LoraFile(layers, meta, formats[0] if len(formats) == 1 else "mixed (" + ", ".join(formats) + ")",
                    family, unmapped, notes, embeddings)


def _full_diff_reason(tensor: torch.Tensor) -> str:
    peak = float(tensor.float().abs().max()) if tensor.numel() else 0.0
    what = "all zero, nothing lost" if peak == 0 else f"max |value| {peak:.3g}, its change is lost in kohya format"
    return f"full-weight difference, not a low-rank factor ({what})"


def _build_layers(state: dict[str, torch.Tensor], modules: dict[str, dict[str, str]], table: ModuleTable,
                  alphas: dict[str, Callable[[str, int], float | None]], label: str = "The LoRA") -> tuple[dict, dict, list]:
    found: dict[str, LoraLayer] = {}
    unmapped: dict[str, str] = {}
    assumed_alpha = 0
    for module, parts in modules.items():
        keys = list(parts.values())
        if "down" not in parts:
            unmapped |= {k: "alpha without lora_down/lora_up weights" for k in keys}
            continue
        name = canonical_name(module, table)
        if name is None:
            unmapped |= {k: "no Linear/Conv2d layer of that name in the SD1.5 UNet or text encoder" for k in keys}
            continue
        if "mid" in parts:
            unmapped |= {k: "LoCon Tucker (lora_mid) layers are not supported; convert the file with LyCORIS first" for k in keys}
            continue
        down, up = state[parts["down"]], state[parts["up"]]
        target = table.shapes[name]
        rank = int(down.shape[0]) if down.ndim else 0
        if (down.ndim < 2 or up.ndim < 2 or up.shape[1] != rank or up.shape[0] != target[0]
                or down[0].numel() != math.prod(target[1:])):
            unmapped |= {k: f"shapes up {tuple(up.shape)} / down {tuple(down.shape)} do not fit {name} {target}" for k in keys}
            continue
        if name in found:
            unmapped |= {k: f"a second LoRA for {name}" for k in keys}
            continue
        down = down.reshape(rank, *target[1:])  # ComfyUI's trainer stores conv `down` flattened
        up = up.reshape(target[0], rank, *([1] * (len(target) - 2)))
        if "alpha" in parts:
            if state[parts["alpha"]].numel() != 1:
                raise UserError(f"{label}: its {parts['alpha']} holds {state[parts['alpha']].numel()} values instead "
                                "of one; the file is damaged or not a LoRA: export it again.")
            alpha = float(state[parts["alpha"]].float().item())
        else:
            component, path = name.split(".", 1)
            alpha = alphas[component](path, rank) if component in alphas else None
            if alpha is None:
                alpha, assumed_alpha = float(rank), assumed_alpha + 1
        found[name] = LoraLayer(down, up, alpha, *_magnitude(state, parts, target, label))
    notes = []
    if assumed_alpha:
        notes.append(f"{assumed_alpha} layers have no alpha in the file; alpha = rank assumed (scale 1), as ComfyUI and diffusers do")
    layers = {name: found[name] for name in table.shapes if name in found}  # model order
    return layers, unmapped, notes


def _magnitude(state: dict[str, torch.Tensor], parts: dict[str, str], target: tuple[int, ...],
               label: str) -> tuple[torch.Tensor | None, str]:
    """A DoRA layer's magnitude, one value per output channel, and what it is relative to."""
    key = parts.get("dora_scale") or parts.get("magnitude")
    if key is None:
        return None, "base"
    tensor = state[key]
    if "dora_scale" in parts and tensor.ndim > 1 and tensor.shape[0] != target[0]:  # [1, in]: per input channel
        raise UserError(f"{label} is an input-axis DoRA ({key} has shape {tuple(tensor.shape)}, LyCORIS' default), "
                        "which this tool does not read; load it directly in ComfyUI instead.")
    if tensor.numel() != target[0]:
        raise UserError(f"{label}: {key} has shape {tuple(tensor.shape)}, not one value per output channel of a "
                        f"{target} weight; the file is damaged: export it again.")
    return tensor.reshape(target[0]), "base" if "dora_scale" in parts else "adapted"


def _peft_alphas(meta: Mapping[str, str], peft_config: Mapping[str, Any] | None,
                 label: str = "The LoRA") -> dict[str, Callable[[str, int], float | None]]:
    """Per-component alpha lookups from diffusers' `lora_adapter_metadata` or a peft adapter_config.json."""
    configs: dict[str, Mapping[str, Any]] = {}
    if "lora_adapter_metadata" in meta:
        try:
            flat = json.loads(meta["lora_adapter_metadata"])
        except ValueError:
            flat = {}
        for key, value in (flat if isinstance(flat, dict) else {}).items():
            component, _, field_name = key.partition(".")
            configs.setdefault(component, {})[field_name] = value  # type: ignore[index]
    if peft_config is not None:
        if not isinstance(peft_config, Mapping):
            raise UserError(f"{label}: its adapter_config.json is not a JSON object; export the adapter again.")
        configs.setdefault("unet", peft_config)
        configs.setdefault("text_encoder", peft_config)
    for component, cfg in configs.items():
        if "lora_alpha" in cfg and (isinstance(cfg["lora_alpha"], bool)
                                    or not isinstance(cfg["lora_alpha"], (int, float))):
            raise UserError(f"{label}: the {component} lora_alpha in its lora_adapter_metadata (or adapter_config.json) "
                            f"is {str(cfg['lora_alpha'])[:40]!r}, not a number; fix it or export the LoRA again.")
        if not isinstance(cfg.get("alpha_pattern") or {}, Mapping):
            raise UserError(f"{label}: the {component} alpha_pattern in its lora_adapter_metadata (or "
                            "adapter_config.json) is not a mapping of module to alpha; fix it or export the LoRA again.")
    return {component: _alpha_lookup(cfg) for component, cfg in configs.items() if "lora_alpha" in cfg}


def _alpha_lookup(cfg: Mapping[str, Any]) -> Callable[[str, int], float | None]:
    default = float(cfg["lora_alpha"])
    patterns = dict(cfg.get("alpha_pattern") or {})
    rslora = bool(cfg.get("use_rslora"))

    def alpha(path: str, rank: int) -> float:
        value = default
        for pattern, pattern_alpha in patterns.items():  # peft matches a pattern against the end of the module path
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
                value = float(pattern_alpha)
                break
        # rsLoRA scales by alpha / sqrt(r); we store scale as alpha / r
        return value * math.sqrt(rank) if rslora else value

    return alpha


def _refuse_unsupported(state: dict[str, torch.Tensor], meta: Mapping[str, str], label: str) -> None:
    for marker, kind in _LYCORIS.items():
        if any(marker in key for key in state):
            raise UserError(f"{label} is a LyCORIS {kind} file; ComfyUI's LoraLoader applies it as it is, "
                            "but this tool reads and writes plain LoRA (lora_down/lora_up) only.")
    foreign = _foreign_base(state, meta)
    if foreign:
        raise UserError(f"{label} is a LoRA for {foreign}; this pack works with Stable Diffusion 1.5 LoRAs only, "
                        "so pick a LoRA trained on an SD1.5 base.")
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{label} has NaN or infinite values in {key}; the LoRA is broken (a diverged training run?), "
                            "use an earlier or re-exported file.")


def _foreign_base(state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str | None:
    """The base a LoRA was made for when it is not SD1.5, with the evidence; None for SD1.5."""
    version = meta.get("ss_base_model_version", "")
    architecture = meta.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return f"SDXL (metadata says {version or architecture})"
    if version.startswith("sd_v2") or meta.get("ss_v2") == "True" or architecture.startswith("stable-diffusion-v2"):
        return f"Stable Diffusion 2.x (metadata says {version or architecture or 'ss_v2=True'})"
    if architecture and not architecture.startswith("stable-diffusion-v1"):
        return f"{architecture.split('/')[0]} (metadata modelspec.architecture)"
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in state):
        return "SDXL (it has a second text encoder, lora_te2_/text_encoder_2 keys)"
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None or split[1] != "down" or tensor.ndim < 2:
            continue
        module = split[0]
        width = int(tensor.shape[1])
        if re.search(r"attn2[._](processor[._])?to_[kv]$", module):
            if width == 2048:
                return "SDXL (cross-attention input width 2048)"
            if width == 1024:
                return "Stable Diffusion 2.x (cross-attention input width 1024)"
        if re.search(r"(lora_te_|text_model[._]|^text_encoder[._]).*self_attn[._](q_proj|to_q)$", module):
            if width == 1024:
                return "Stable Diffusion 2.x (text encoder width 1024, OpenCLIP ViT-H)"
            if width == 1280:
                return "SDXL (text encoder width 1280, OpenCLIP ViT-bigG)"
    return None
