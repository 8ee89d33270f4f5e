"""LoRA files for SD1.5: read every common format, write kohya, change rank, extract.

One in-memory form, `LoraFile`: layers keyed by a canonical module path in diffusers
naming with a component prefix (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_encoder.encoder.layers.0.self_attn.q_proj`), each `delta W = alpha / rank * up @ down`.

We write kohya names (`lora_unet_...`, `lora_te_text_model_...`): ComfyUI's LoraLoader,
A1111/Forge, kohya and diffusers all read them, while ComfyUI drops peft/diffusers UNet
keys (`unet.*.lora_A.weight`) with a "lora key not loaded" log line.

Rank changes work on the factors (QR of `up` and `down`^T, SVD of the small r x r core),
never on the full m x n product.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from . import ldm_keys
from .errors import UserError
from .models import FAMILY_CONFIGS, FAMILY_NAMES, PICKLE_SUFFIXES
from .progress import Progress, ProgressFn, no_progress
from .resources import one_thread

FAMILIES = tuple(FAMILY_CONFIGS)  # SD1.5-family layouts; a LoRA's shapes say which one it was made on

# ---------------------------------------------------------------- in-memory form


@dataclass
class LoraLayer:
    """One low-rank update: `down` [r, in(, kh, kw)], `up` [out, r(, 1, 1)], in the file's dtype."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kind(self) -> str:
        return "conv" if self.down.ndim == 4 else "linear"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this layer changes."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight change `alpha / rank * up @ down`, shaped like the weight."""
        product = self.up.reshape(self.up.shape[0], -1).to(dtype) @ self.down.reshape(self.rank, -1).to(dtype)
        return (product * self.scale).reshape(self.shape)


@dataclass
class LoraFile:
    """A LoRA read from any supported format; `unmapped` says why each leftover key was left."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "kohya"
    family: str = "sd15"  # the SD1.5-family layout the shapes fit (a key of models.FAMILY_CONFIGS)
    unmapped: dict[str, str] = field(default_factory=dict)  # file key -> reason
    notes: list[str] = field(default_factory=list)  # assumptions made while reading

    def components(self) -> dict[str, int]:
        counts = {"unet": 0, "text_encoder": 0}
        for name in self.layers:
            counts[name.split(".", 1)[0]] += 1
        return counts


def delta_weights(lora: LoraFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Canonical module name -> effective weight change, for every layer."""
    return {name: layer.delta(dtype) for name, layer in lora.layers.items()}


# ---------------------------------------------------------------- module names


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


def _canonical(module_key: str, table: ModuleTable) -> str | None:
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


# ---------------------------------------------------------------- reading

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
    LoHa/LoKr/DoRA, pickles, malformed files and non-finite weights.
    """
    if isinstance(source, Mapping):
        state, meta, label = dict(source), dict(metadata or {}), name or "the LoRA state dict"
    else:
        state, meta, label, found_config = _load_file(Path(source))
        meta |= dict(metadata or {})
        peft_config = peft_config or found_config
    return _parse(state, meta, label, peft_config)


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
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
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


def _parse(state: dict[str, torch.Tensor], meta: dict[str, str], label: str,
           peft_config: Mapping[str, Any] | None) -> LoraFile:
    if not state:
        raise UserError(f"{label} holds no tensors; it is not a LoRA.")
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
                    family, unmapped, notes)


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
        name = _canonical(module, table)
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
        found[name] = LoraLayer(down, up, alpha)
    notes = []
    if assumed_alpha:
        notes.append(f"{assumed_alpha} layers have no alpha in the file; alpha = rank assumed (scale 1), as ComfyUI and diffusers do")
    layers = {name: found[name] for name in table.shapes if name in found}  # model order
    return layers, unmapped, notes


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
    if any(key.endswith((".dora_scale", ".lora_magnitude_vector.weight", ".lora_magnitude_vector")) for key in state):
        raise UserError(f"{label} is a DoRA file (dora_scale keys), which a plain LoRA cannot represent; "
                        "load it directly in ComfyUI instead.")
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


def peft_state_to_lora(unet_state: Mapping[str, torch.Tensor] | None,
                       text_encoder_state: Mapping[str, torch.Tensor] | None = None,
                       alpha: float | Mapping[str, Any] = 1.0, metadata: Mapping[str, str] | None = None) -> LoraFile:
    """`get_peft_model_state_dict(unet)` (and of the text encoder) -> `LoraFile`.

    `alpha` is a number (peft's `lora_alpha`) or a peft `LoraConfig.to_dict()`-like mapping
    (`lora_alpha`, `alpha_pattern`, `use_rslora`).
    """
    config = dict(alpha) if isinstance(alpha, Mapping) else {"lora_alpha": float(alpha)}
    state: dict[str, torch.Tensor] = {}
    for component, part in (("unet", unet_state), ("text_encoder", text_encoder_state)):
        for key, tensor in (part or {}).items():
            state[f"{component}.{key.removeprefix('base_model.model.')}"] = tensor
    lora = _parse(state, dict(metadata or {}), "the trained LoRA", config)
    lora.source_format = "peft"
    return lora


# ---------------------------------------------------------------- writing


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
    """The tensors of a kohya file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
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
    return out


def write_kohya(lora: LoraFile, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write `lora` as a kohya-format `.safetensors` (fp16 by default) atomically."""
    from safetensors.torch import save as save_bytes

    from .safe_io import atomic_save_safetensors

    if not lora.layers:
        raise UserError(f"There is no LoRA layer to write to {path}; the source had nothing that maps to SD1.5.")
    tensors = kohya_state_dict(lora, dtype)
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
    if conv and linear:
        conv_dim, conv_alpha = summary(conv)
        meta["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_alpha})
    te = lora.components()["text_encoder"]
    meta["ss_network_train_unet_only"] = str(te == 0)
    meta["ss_network_train_text_encoder_only"] = str(lora.components()["unet"] == 0)
    return meta


# ---------------------------------------------------------------- rank resize


@dataclass
class LayerResize:
    """What one layer lost: its rank before and after, and the kept fraction of its Frobenius norm."""

    name: str
    rank_before: int
    rank_after: int
    kept: float


def _chosen_rank(singular_values: torch.Tensor, rank: int | None, keep_energy: float | None) -> tuple[int, float]:
    """Smallest rank keeping `keep_energy` of the Frobenius norm, capped at `rank`; and the kept fraction."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1, 1.0  # a zero layer keeps one (zero) component, as kohya does
    kept_fraction = (energy.cumsum(0) / total).sqrt()
    k = len(singular_values)
    if keep_energy is not None:
        k = int(torch.searchsorted(kept_fraction, torch.tensor(keep_energy - 1e-12, dtype=torch.float64))) + 1
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, len(singular_values)))
    return k, float(kept_fraction[k - 1])


def _check_targets(rank: int | None, keep_energy: float | None, what: str) -> None:
    if rank is None and keep_energy is None:
        raise UserError(f"Give {what} a target: --rank R and/or --keep-energy F.")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1 (got {rank}).")
    if keep_energy is not None and not 0.0 < keep_energy <= 1.0:
        raise UserError(f"--keep-energy is a fraction of the Frobenius norm in (0, 1] (got {keep_energy}).")


def resize(lora: LoraFile, rank: int | None = None, keep_energy: float | None = None,
           progress: ProgressFn = no_progress) -> tuple[LoraFile, list[LayerResize]]:
    """Lower each layer's rank to `rank` and/or to the rank keeping `keep_energy` of its Frobenius norm.

    Exact truncated SVD of every layer's product, computed on the factors: QR of `up` and
    `down`^T, then an SVD of the r x r core. Alpha is rescaled so alpha / rank stays the
    effective scale. Layers of one shape are done as one batch.
    """
    _check_targets(rank, keep_energy, "the resize")
    trained = max((layer.rank for layer in lora.layers.values()), default=0)
    if keep_energy is None and rank is not None and rank > trained:
        raise UserError(f"rank {rank} is above the LoRA's rank {trained}; a resize only makes it smaller, "
                        f"so give 1 to {max(1, trained - 1)} (or 0 in the loader for the LoRA as trained).")
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, layer in lora.layers.items():
        groups.setdefault((layer.shape[0], math.prod(layer.shape[1:]), layer.rank), []).append(name)
    new_layers: dict[str, LoraLayer] = {}
    reports: dict[str, LayerResize] = {}
    done = 0
    with one_thread():
        for (m, n, r), names in groups.items():
            if keep_energy is None and rank is not None and r <= rank:
                for name in names:  # already small enough: nothing to compute
                    new_layers[name] = lora.layers[name]
                    reports[name] = LayerResize(name, r, r, 1.0)
            elif r > min(m, n):  # a rank above the layer's own size: its product is no bigger than the factors
                for name in names:
                    layer = lora.layers[name]
                    new_layers[name], report = _factor(name, layer.delta(), rank, keep_energy)
                    reports[name] = LayerResize(name, r, report.rank_after, report.kept)
            else:
                for chunk in _chunks(names, max(1, (32 << 20) // (4 * r * (m + n)))):  # ~32 MiB of float32 factors per batch
                    _resize_group([lora.layers[name] for name in chunk], chunk, rank, keep_energy, new_layers, reports)
            done += len(names)
            progress(Progress("resize", done, len(lora.layers), {"layers": len(names), "shape": (m, n, r)}))
    order = list(lora.layers)
    resized = LoraFile({name: new_layers[name] for name in order}, dict(lora.metadata), lora.source_format,
                       lora.family, dict(lora.unmapped), list(lora.notes))
    return resized, [reports[name] for name in order]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _resize_group(layers: list[LoraLayer], names: list[str], rank: int | None, keep_energy: float | None,
                  out: dict[str, LoraLayer], reports: dict[str, LayerResize]) -> None:
    first = layers[0]
    m, r = first.up.shape[0], first.rank
    n = first.down[0].numel()
    ups = torch.empty(len(layers), m, r)
    downs_t = torch.empty(len(layers), n, r)
    for i, layer in enumerate(layers):  # copy_ converts the file dtype in the same pass
        ups[i].copy_(layer.up.reshape(m, r))
        downs_t[i].copy_(layer.down.reshape(r, n).T)
    # Householder QR without forming Q: Q is applied later to the k kept columns only
    up_qr, up_tau = torch.geqrf(ups)
    down_qr, down_tau = torch.geqrf(downs_t)
    del ups, downs_t
    core = up_qr[:, :r, :].triu() @ down_qr[:, :r, :].triu().transpose(1, 2)  # R_up @ R_down^T, [b, r, r]
    u_core, s_core, vh_core = torch.linalg.svd(core)
    scales = torch.tensor([layer.scale for layer in layers]).unsqueeze(1)
    singular = s_core * scales.abs()  # singular values of each layer's delta W
    chosen = [_chosen_rank(singular[i], rank, keep_energy) for i in range(len(layers))]
    k_max = max(k for k, _ in chosen)
    root = s_core[:, :k_max].sqrt().unsqueeze(1)  # split sqrt(S) between both factors
    up_small = torch.zeros(len(layers), m, k_max)
    up_small[:, :r] = u_core[:, :, :k_max] * root
    down_small = torch.zeros(len(layers), n, k_max)
    down_small[:, :r] = vh_core[:, :k_max, :].transpose(1, 2) * root
    new_up = torch.ormqr(up_qr, up_tau, up_small)  # Q_up @ U_k sqrt(S_k)
    new_down_t = torch.ormqr(down_qr, down_tau, down_small)  # Q_down @ V_k sqrt(S_k)
    for i, (layer, name) in enumerate(zip(layers, names)):
        k, kept = chosen[i]
        up = new_up[i, :, :k].reshape(layer.up.shape[0], k, *layer.up.shape[2:])
        down = new_down_t[i, :, :k].T.reshape(k, *layer.down.shape[1:])
        out[name] = LoraLayer(down.contiguous(), up.contiguous(), layer.scale * k)
        reports[name] = LayerResize(name, layer.rank, k, kept)


def format_report(reports: list[LayerResize], limit: int = 12) -> str:
    """A short per-layer table (the `limit` most reduced layers) and totals."""
    if not reports:
        return "no layers"
    lines = [f"{'layer':<72} {'rank':>9}  kept"]
    worst = sorted(reports, key=lambda rep: rep.kept)[:limit]
    for rep in worst:
        lines.append(f"{rep.name[-72:]:<72} {rep.rank_before:>4}->{rep.rank_after:<4} {rep.kept:6.4f}")
    if len(reports) > limit:
        lines.append(f"... and {len(reports) - limit} more layers")
    kept = [rep.kept for rep in reports]
    before = sum(rep.rank_before for rep in reports) / len(reports)
    after = sum(rep.rank_after for rep in reports) / len(reports)
    lines.append(f"{len(reports)} layers: mean rank {before:.1f} -> {after:.1f}; kept Frobenius fraction "
                 f"min {min(kept):.4f}, mean {sum(kept) / len(kept):.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- extraction


class _WeightSource:
    """Reads one weight at a time from a model, so extraction holds one layer per model in memory."""

    def __init__(self, label: str, family: str, get: Callable[[str], torch.Tensor | None]):
        self.label, self.family, self._get = label, family, get

    def get(self, name: str) -> torch.Tensor | None:
        return self._get(name)


def _weight_source(model: Any) -> _WeightSource:
    """A `_WeightSource` over `tiny`, a single-file checkpoint, a diffusers folder, an `SDModel`,
    or `{"unet": state_dict, "text_encoder": state_dict}` in diffusers naming."""
    from .models import SDModel, inspect_checkpoint, load_model

    if isinstance(model, (str, os.PathLike)) and str(model) == "tiny":
        model = load_model("tiny")
    if isinstance(model, SDModel):
        states = {"unet": model.unet.state_dict(), "text_encoder": model.text_encoder.state_dict()}
        return _state_source(model.source, states, model.family)
    if isinstance(model, Mapping):
        return _state_source("the given state dicts", model, None)
    path = Path(model)
    if path.is_dir():
        return _folder_source(path)
    info = inspect_checkpoint(path)  # refuses LoRAs, SDXL, SD2, inpainting, pickles, truncated files
    return _safetensors_source(path.name, info.family, [path], lambda name: [_single_file_key(name, info.family)])


def _single_file_key(name: str, family: str) -> str:
    component, path = name.split(".", 1)
    if component == "unet":
        return f"{ldm_keys.UNET_PREFIX}{module_table(family).ldm[name]}.weight"
    return f"{ldm_keys.TEXT_PREFIX}{path}.weight"


def _diffusers_keys(name: str) -> list[str]:
    component, path = name.split(".", 1)
    return [f"{path}.weight"] if component == "unet" else [f"{path}.weight", f"text_model.{path}.weight"]


def _state_source(label: str, states: Mapping[str, Mapping[str, torch.Tensor]], family: str | None) -> _WeightSource:
    def get(name: str) -> torch.Tensor | None:
        component = name.split(".", 1)[0]
        state = states.get(component) or {}
        return next((state[k] for k in _diffusers_keys(name) if k in state), None)

    return _WeightSource(label, family or _family_by_shape(label, get), get)


def _folder_source(path: Path) -> _WeightSource:
    files = sorted((path / "unet").glob("*.safetensors")) + sorted((path / "text_encoder").glob("*.safetensors"))
    if not (path / "unet").is_dir() or not files:
        raise UserError(f"{path} is not a diffusers model folder with .safetensors weights; give a .safetensors "
                        "checkpoint, a diffusers folder or 'tiny'.")
    source = _safetensors_source(path.name, None, files, _diffusers_keys)
    return source


def _safetensors_source(label: str, family: str | None, files: list[Path],
                        keys_of: Callable[[str], list[str]]) -> _WeightSource:
    from safetensors import safe_open

    where: dict[tuple[str, str], Path] = {}  # (component or "", key) -> file
    for file in files:
        component = file.parent.name if file.parent.name in ("unet", "text_encoder") and len(files) > 1 else ""
        with safe_open(str(file), framework="pt") as f:
            where |= {(component, key): file for key in f.keys()}

    def get(name: str) -> torch.Tensor | None:
        component = name.split(".", 1)[0]
        for key in keys_of(name):
            file = where.get((component, key)) or where.get(("", key))
            if file is not None:
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(key)
        return None

    return _WeightSource(label, family or _family_by_shape(label, get), get)


def _family_by_shape(label: str, get: Callable[[str], torch.Tensor | None]) -> str:
    """The layout whose first and last cross-attention key projections match the model's."""
    for family in FAMILIES:
        table = module_table(family)
        probes = [n for n in table.shapes if n.endswith("attn2.to_k")]
        weights = [get(name) for name in (probes[0], probes[-1])]
        if all(w is not None and tuple(w.shape) == table.shapes[n] for w, n in zip(weights, (probes[0], probes[-1]))):
            return family
    raise UserError(f"{label} is not a Stable Diffusion 1.5 model (its cross-attention weights fit no SD1.5 layout); "
                    "extract from an SD1.5 checkpoint and its fine-tuned copy.")


def extraction_targets(family: str, text_encoder: bool = False) -> list[str]:
    """What `extract` looks at: every Linear/1x1-conv of the UNet's transformer blocks (kohya's
    default), plus the text encoder's attention and MLP layers when asked."""
    names = [name for name in module_table(family).shapes if name.startswith("unet.") and ".attentions." in name]
    if text_encoder:
        names += [name for name in module_table(family).shapes if name.startswith("text_encoder.encoder.layers.")]
    return names


def extract(base: Any, tuned: Any, rank: int | None = None, keep_energy: float | None = None,
            text_encoder: bool = False, min_diff: float = 0.0,
            progress: ProgressFn = no_progress) -> tuple[LoraFile, list[LayerResize]]:
    """A LoRA approximating `tuned - base`, layer by layer (one layer of each model in memory).

    `base` / `tuned`: `tiny`, a single-file checkpoint, a diffusers folder, an `SDModel`, or
    `{"unet": ..., "text_encoder": ...}` diffusers state dicts. Layers whose largest change is
    at most `min_diff` are left out.
    """
    _check_targets(rank, keep_energy, "the extraction")
    base_src, tuned_src = _weight_source(base), _weight_source(tuned)
    if base_src.family != tuned_src.family:
        raise UserError(f"{base_src.label} ({base_src.family}) and {tuned_src.label} ({tuned_src.family}) are "
                        "different model layouts; extract from a model and its own fine-tuned copy.")
    family = base_src.family
    targets = extraction_targets(family, text_encoder)
    layers: dict[str, LoraLayer] = {}
    reports: list[LayerResize] = []
    unchanged = 0
    for step, name in enumerate(targets, 1):
        old, new = base_src.get(name), tuned_src.get(name)
        if old is None or new is None:
            missing = base_src.label if old is None else tuned_src.label
            raise UserError(f"{missing} has no weight for {name}; it is not a complete SD1.5 model.")
        diff = new.float() - old.float()
        del old, new
        if float(diff.abs().max()) <= min_diff:
            unchanged += 1
        else:
            layers[name], report = _factor(name, diff, rank, keep_energy)
            reports.append(report)
        del diff
        progress(Progress("extract", step, len(targets), {"layer": name}))
    notes = [f"{unchanged} of {len(targets)} layers did not change and were left out"] if unchanged else []
    meta = {"dreambooth.extracted_from": tuned_src.label, "dreambooth.extracted_base": base_src.label}
    if not layers:
        raise UserError(f"{tuned_src.label} does not differ from {base_src.label} in any extracted layer; "
                        "nothing to extract (was the right fine-tuned model given?).")
    return LoraFile(layers, meta, "extracted", family, {}, notes), reports


def _factor(name: str, diff: torch.Tensor, rank: int | None, keep_energy: float | None) -> tuple[LoraLayer, LayerResize]:
    shape = diff.shape
    u, s, vh = torch.linalg.svd(diff.reshape(shape[0], -1), full_matrices=False)
    k, kept = _chosen_rank(s, rank, keep_energy)
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(shape[0], k, *([1] * (len(shape) - 2)))
    down = (root.unsqueeze(1) * vh[:k]).reshape(k, *shape[1:])
    return LoraLayer(down.contiguous(), up.contiguous(), float(k)), LayerResize(name, len(s), k, kept)


# ---------------------------------------------------------------- describing


def lora_info(path: str | os.PathLike) -> str:
    """What a LoRA file holds: format, base, modules, ranks, alpha, metadata, what does not map."""
    lora = read_lora(path)
    counts = lora.components()
    ranks: dict[int, int] = {}
    alphas: dict[float, int] = {}
    for layer in lora.layers.values():
        ranks[layer.rank] = ranks.get(layer.rank, 0) + 1
        alphas[round(layer.alpha, 4)] = alphas.get(round(layer.alpha, 4), 0) + 1
    conv = sum(layer.kind == "conv" and layer.down.shape[2:] != (1, 1) for layer in lora.layers.values())
    first = next(iter(lora.layers.values()))
    family = FAMILY_NAMES.get(lora.family, lora.family)
    lines = [
        f"{Path(path).name}",
        f"  format:    {lora.source_format}",
        f"  base:      {family}",
        f"  modules:   {counts['unet']} UNet, {counts['text_encoder']} text encoder ({conv} of them 3x3 convs)",
        "  rank:      " + ", ".join(f"{r} ({n} layers)" for r, n in sorted(ranks.items())),
        "  alpha:     " + ", ".join(f"{a:g} ({n} layers)" for a, n in sorted(alphas.items())),
        f"  dtype:     {str(first.down.dtype).removeprefix('torch.')}",
    ]
    lines += [f"  note:      {note}" for note in lora.notes]
    if lora.unmapped:
        lines.append(f"  not mapped: {len(lora.unmapped)} keys")
        by_reason: dict[str, list[str]] = {}
        for key, reason in lora.unmapped.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"    {len(keys)} x {reason}: {keys[0]}" + (" ..." if len(keys) > 1 else ""))
    else:
        lines.append("  not mapped: none (every key maps to an SD1.5 layer)")
    if lora.metadata:
        lines.append("  metadata:")
        for key in sorted(lora.metadata):
            value = " ".join(str(lora.metadata[key]).split())
            lines.append(f"    {key}: {value[:100]}{' ...' if len(value) > 100 else ''}")
    return "\n".join(lines)
