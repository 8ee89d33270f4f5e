"""Load Stable Diffusion 1.5 offline (`tiny`, a single-file checkpoint or a diffusers
folder) and write a trained model back as a single-file checkpoint.

Nothing here touches the network: configs and the CLIP tokenizer ship in `configs/`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import ldm_keys
from .errors import UserError
from .quiet import quiet_libraries
from .safe_io import atomic_save_safetensors

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENIZER_DIR = CONFIGS / "clip_tokenizer"
FAMILY_CONFIGS = {"sd15": CONFIGS / "sd15", "tiny": CONFIGS / "tiny", "sd15-mini": CONFIGS / "sd15_mini"}
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "tiny": "tiny (random weights: its pictures are noise)",
                "sd15-mini": "SD1.5 family, reduced UNet (sd15-mini, a test layout)"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
TINY_SEED = 0


@dataclass
class SDModel:
    """The components of one SD1.5-family model and what was detected about it."""

    unet: "UNet2DConditionModel"  # noqa: F821
    vae: "AutoencoderKL"  # noqa: F821
    text_encoder: "CLIPTextModel"  # noqa: F821
    tokenizer: "CLIPTokenizer"  # noqa: F821
    scheduler_config: dict
    family: str  # "sd15", "tiny" or "sd15-mini" (see FAMILY_CONFIGS)
    source: str  # "tiny", or the file / folder it came from
    source_kind: str  # "random" (tiny and test layouts) | "single-file" | "diffusers"
    _sha256: str = ""

    @property
    def sha256(self) -> str:
        """Of the file for single files; of the weights as loaded otherwise (computed once)."""
        if not self._sha256:
            self._sha256 = file_sha256(self.source) if self.source_kind == "single-file" else weights_sha256(self)
        return self._sha256

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def resolution(self) -> int:
        """The native image size: 512 for SD1.5, 64 for `tiny`."""
        return int(self.unet.config.sample_size) * 8

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SDModel":
        for module in self.components().values():
            # nn.Module.to: diffusers' override warns about fp32-only modules, which SD1.5 has none of
            torch.nn.Module.to(module, device=device, dtype=dtype)
        return self


# ---------------------------------------------------------------- detection


@dataclass
class CheckpointInfo:
    """What a single-file checkpoint is, read from its header without loading tensors."""

    path: Path
    family: str
    dtype: str
    num_tensors: int
    metadata: dict[str, str]


def _shape(f, key: str) -> tuple[int, ...] | None:
    try:
        return tuple(f.get_slice(key).get_shape())
    except Exception:
        return None


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read a `.safetensors` header and say what it holds, or refuse with one line."""
    path = Path(path)
    name = path.name
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .safetensors checkpoint, a diffusers folder or 'tiny'.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{name} is a pickle file ({path.suffix}), which can run code when loaded and is never opened here; "
            "convert it to .safetensors first (for example with diffusers' or kohya's conversion script) and use that file."
        )
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{name} is not a .safetensors file; give a .safetensors checkpoint, a diffusers folder or 'tiny'.")
    if path.stat().st_size == 0:
        raise UserError(f"{name} is empty (0 bytes); download or copy it again.")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            family = _detect_family(f, keys, name)
            first = next((k for k in keys if k.startswith(ldm_keys.UNET_PREFIX)), keys[0])
            dtype = str(f.get_slice(first).get_dtype())
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise UserError(
            f"{name} is not a readable safetensors file (truncated or corrupt: {str(exc).splitlines()[0][:120]}); "
            "download or copy it again."
        ) from None
    _check_size(path, name)
    return CheckpointInfo(path, family, dtype, len(keys), metadata)


def _check_size(path: Path, name: str) -> None:
    """safetensors checks offsets lazily; a file cut short must be refused up front."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise UserError(f"{name} is truncated ({path.stat().st_size} bytes, needs {8 + header_len + end}); download or copy it again.")


def _detect_family(f, keys: list[str], name: str) -> str:
    if any(".lora_down." in k or ".lora_up." in k or "lora_A" in k or ".hada_" in k or ".lokr_" in k for k in keys[:2000]):
        raise UserError(f"{name} is a LoRA, not a base model; pick an SD1.5 checkpoint as the base and apply the LoRA on top of it.")
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{ldm_keys.UNET_PREFIX}label_emb.0.0.weight" in keys:
        raise UserError(f"{name} is an SDXL checkpoint; this pack trains Stable Diffusion 1.5, so pick an SD1.5 checkpoint.")
    if not any(k.startswith(ldm_keys.UNET_PREFIX) for k in keys):
        raise UserError(f"{name} has no Stable Diffusion UNet (no 'model.diffusion_model.' keys); pick an SD1.5 checkpoint.")
    conv_in = _shape(f, f"{ldm_keys.UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(f"{name} has an unknown UNet layout; pick an SD1.5 checkpoint.")
    if conv_in[1] != 4:
        kind = "an inpainting" if conv_in[1] == 9 else f"a {conv_in[1]}-channel"
        raise UserError(f"{name} is {kind} UNet ({conv_in[1]} input channels); pick a plain SD1.5 checkpoint, not an inpainting or depth model.")
    context = _shape(f, f"{ldm_keys.UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or (context and context[1] == 1024):
        raise UserError(f"{name} is a Stable Diffusion 2.x checkpoint (1024-wide cross-attention); pick an SD1.5 checkpoint.")
    output_blocks = {k.split(".")[3] for k in keys if k.startswith(f"{ldm_keys.UNET_PREFIX}output_blocks.")}
    for family, folder in FAMILY_CONFIGS.items():
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        levels = len(cfg["block_out_channels"]) * (cfg["layers_per_block"] + 1)
        if (conv_in[0], context and context[1], len(output_blocks)) == (cfg["block_out_channels"][0],
                                                                          cfg["cross_attention_dim"], levels):
            return family
    raise UserError(f"{name} has an unknown UNet layout ({conv_in[0]} channels, context {context}, "
                    f"{len(output_blocks)} output blocks); pick an SD1.5 checkpoint.")


# ---------------------------------------------------------------- loading


def load_tokenizer():
    """The real CLIP tokenizer shipped in `configs/clip_tokenizer` (49408 tokens, 77 positions)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def _scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def build_random(family: str = "tiny", seed: int = TINY_SEED, dtype: torch.dtype = torch.float32) -> SDModel:
    """A random-weight model of the SD1.5 family, deterministic from `seed`.

    `tiny` is the embedded default for demos and tests; `sd15` has the full SD1.5 layout.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = FAMILY_CONFIGS[family]
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, vae, text_encoder):
        torch.nn.Module.to(module, dtype=dtype)  # on meta: allocated once, at `dtype` (not fp32, then a cast)
        module.to_empty(device="cpu")
        _fill_random(module, generator)
        module.eval()
    model = SDModel(unet, vae, text_encoder, load_tokenizer(), _scheduler_config(folder), family,
                    "tiny" if family == "tiny" else f"random-{family}", "random")
    return model


def _fill_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic init: norms at 1/0, everything else N(0, 1/fan_in) so activations stay sane."""
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        with torch.no_grad():
            owner = name.split(".")[-2] if "." in name else ""
            if "norm" in owner:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                fan_in = max(1, param[0].numel()) if param.ndim > 1 else param.shape[-1]
                bound = (3.0 / fan_in) ** 0.5  # uniform with variance 1/fan_in; faster than randn at 1B params
                param.uniform_(-bound, bound, generator=generator)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


_TINY_BUILT: set[int] = set()  # seeds built once in this process
_TINY_KEPT: dict[int, SDModel] = {}  # seeds built twice: a copy (no tokenizer) that later calls copy


def build_tiny(seed: int = TINY_SEED) -> SDModel:
    """The embedded random-weight `tiny` model (pictures from it are noise). A process that builds it a
    second time keeps a copy of its modules; from then on each call gets deep copies of those and a
    tokenizer of its own (pivotal tuning adds tokens to it), in about half the time of a build."""
    if seed in _TINY_KEPT:
        return _copy_modules(_TINY_KEPT[seed], load_tokenizer())
    model = build_random("tiny", seed)
    if seed in _TINY_BUILT:
        _TINY_KEPT[seed] = _copy_modules(model, None)
    _TINY_BUILT.add(seed)  # a one-off run (the CLI) pays no copy
    return model


def _copy_modules(model: SDModel, tokenizer) -> SDModel:
    return dataclasses.replace(model, unet=copy.deepcopy(model.unet), vae=copy.deepcopy(model.vae),
                               text_encoder=copy.deepcopy(model.text_encoder), tokenizer=tokenizer,
                               scheduler_config=copy.deepcopy(model.scheduler_config), _sha256="")


def load_model(base: str | os.PathLike, dtype: torch.dtype = torch.float32,
               unet_dtype: torch.dtype | None = None) -> SDModel:
    """Load `tiny`, a single-file SD1.5 `.safetensors`, or a diffusers folder, offline.
    `unet_dtype` (default: `dtype`) lets a LoRA run keep the UNet at the precision it is stored in."""
    unet_dtype = unet_dtype or dtype
    if str(base) == "tiny":
        model = build_tiny().to(dtype=dtype)
        torch.nn.Module.to(model.unet, dtype=unet_dtype)  # diffusers' .to warns about fp32-only modules, of which it has none
        return model
    path = Path(base)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, unet_dtype)
    return _load_single_file(path, dtype, unet_dtype)


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_unet_dtype(base: str | os.PathLike) -> torch.dtype:
    """The precision a base stores its UNet weights in (fp32 for `tiny`), read from headers only."""
    if str(base) == "tiny":
        return torch.float32
    path = Path(base)
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors"))
        if not files:
            return torch.float32
        with safe_open(str(files[0]), framework="pt") as f:
            dtype = str(f.get_slice(next(iter(f.keys()))).get_dtype())
    else:
        dtype = inspect_checkpoint(path).dtype
    return _DTYPES.get(dtype, torch.float32)


def _load_single_file(path: Path, dtype: torch.dtype, unet_dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    info = inspect_checkpoint(path)
    folder = FAMILY_CONFIGS[info.family]
    # load_file maps the file and reads a tensor when it is first used; a tensor loaded at the
    # file's precision stays a view of that mapping, which lives while any view does. The UNet
    # gets a mapping of its own, so pages the VAE and text encoder read go when they are released.
    checkpoint = load_file(str(path))
    common = dict(config=str(folder), local_files_only=True, torch_dtype=dtype)
    with quiet_libraries():  # diffusers warns about fp32-only modules on every cast, listing none
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(folder), torch_dtype=dtype,
            local_files_only=True)
        del checkpoint
        checkpoint = load_file(str(path))
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **common | {"torch_dtype": unet_dtype})
    del checkpoint
    scheduler = _scheduler_config(folder)
    if info.metadata.get("modelspec.prediction_type") == "v":
        scheduler["prediction_type"] = "v_prediction"
    return SDModel(unet, vae, text_encoder, load_tokenizer(), scheduler, info.family, str(path), "single-file")


def _same_unet(a: dict, b: dict) -> bool:
    keys = ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types")
    return all(list(a.get(k)) == list(b.get(k)) if isinstance(a.get(k), list) else a.get(k) == b.get(k) for k in keys)


def _load_diffusers_folder(path: Path, dtype: torch.dtype, unet_dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for part in ("unet", "vae", "text_encoder"):
        sub = path / part
        if not sub.is_dir():
            raise UserError(f"{path} is not a diffusers model folder (no '{part}' subfolder); give a diffusers folder, a .safetensors file or 'tiny'.")
        if not any(sub.glob("*.safetensors")):
            raise UserError(f"{sub} has no .safetensors weights (only pickle files are never loaded); re-save the model with safe_serialization=True.")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    if unet_cfg.get("in_channels", 4) != 4:
        raise UserError(f"{path} holds an inpainting or depth UNet ({unet_cfg['in_channels']} input channels); pick a plain SD1.5 model.")
    context = unet_cfg.get("cross_attention_dim")
    if context in (1024, 2048) or "addition_embed_type" in unet_cfg and unet_cfg["addition_embed_type"]:
        base = "SDXL" if context == 2048 or unet_cfg.get("addition_embed_type") else "Stable Diffusion 2.x"
        raise UserError(f"{path} is a {base} model ({context}-wide cross-attention); pick an SD1.5 model.")
    family = next((f for f, folder in FAMILY_CONFIGS.items()
                   if _same_unet(json.loads((folder / "unet" / "config.json").read_text()), unet_cfg)), None)
    if family is None:
        raise UserError(f"{path} has an unknown UNet layout ({unet_cfg.get('block_out_channels')}, context {context}); "
                        "pick an SD1.5 model.")
    kw = dict(local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw | {"torch_dtype": unet_dtype})
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    tok_dir = path / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True) if (tok_dir / "vocab.json").exists() else load_tokenizer()
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(sched_file.read_text()) if sched_file.exists() else _scheduler_config(FAMILY_CONFIGS[family])
    return SDModel(unet, vae, text_encoder, tokenizer, scheduler, family, str(path), "diffusers")


# ---------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def weights_sha256(model: SDModel) -> str:
    """A content hash of the weights, for models that do not come from one file. Floating tensors
    are hashed as fp32, so a UNet kept in its stored fp16 hashes as the same base."""
    digest = hashlib.sha256()
    for name, module in model.components().items():
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            tensor = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
            # flat first: a channels-last [o, i, 1, 1] weight counts as contiguous but has a last stride > 1
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------- saving


def to_ldm_state_dict(model: SDModel, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """The single-file SD1.5 ("ldm") state dict of a model's UNet, VAE and text encoder."""
    ucfg = model.unet.config
    state = ldm_keys.unet_to_ldm(model.unet.state_dict(), ucfg.layers_per_block, list(ucfg.up_block_types))
    state |= ldm_keys.vae_to_ldm(model.vae.state_dict(), len(model.vae.config.block_out_channels))
    state |= ldm_keys.text_to_ldm(model.text_encoder.state_dict())
    positions = model.text_encoder.config.max_position_embeddings
    state[ldm_keys.TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(model: SDModel, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the model as one SD1.5 `.safetensors` file (ldm keys), atomically."""
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "dreambooth.family": model.family,
    }
    meta |= metadata or {}
    return atomic_save_safetensors(to_ldm_state_dict(model, dtype), path, meta)


# ---------------------------------------------------------------- describing

_COMPONENT_PREFIXES = {"unet": ldm_keys.UNET_PREFIX, "vae": ldm_keys.VAE_PREFIX, "text_encoder": "cond_stage_model."}


def describe(base: str | os.PathLike) -> str:
    """A few lines on what a base is (family, dtype, parameters per component, sha256), or a UserError."""
    if str(base) != "tiny" and Path(base).is_file():
        info = inspect_checkpoint(base)
        counts = dict.fromkeys(_COMPONENT_PREFIXES, 0)
        with safe_open(str(info.path), framework="pt") as f:
            for key in f.keys():
                for comp, prefix in _COMPONENT_PREFIXES.items():
                    if key.startswith(prefix) and not key.endswith("position_ids"):
                        shape = f.get_slice(key).get_shape()
                        counts[comp] += int(torch.Size(shape).numel())
        family, dtype, kind, sha = info.family, info.dtype, "single-file", file_sha256(info.path)
    else:
        model = load_model(base)
        counts = {n: sum(p.numel() for p in m.parameters()) for n, m in model.components().items()}
        family, kind, sha = model.family, model.source_kind, model.sha256
        dtype = str(next(model.unet.parameters()).dtype).removeprefix("torch.")
    lines = [f"{base}", f"  family:     {FAMILY_NAMES[family]}", f"  format:     {kind}", f"  dtype:      {dtype}"]
    lines += [f"  {name + ':':<11} {n / 1e6:,.1f} M parameters" for name, n in counts.items()]
    lines.append(f"  sha256:     {sha}")
    return "\n".join(lines)
