"""Diffusers -> original Stable Diffusion ("ldm") key names for SD1.5-family models.

Diffusers ships only the other direction (its single-file loader). The map is built from
the names a diffusers model actually has, so it serves any width and any
`layers_per_block` (SD1.5: 2, `tiny`: 1).
"""
from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _swap(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_key_to_ldm(key: str, layers_per_block: int) -> str:
    """`down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight` (no prefix)."""
    per_level = layers_per_block + 1
    top = _swap(key, _UNET_TOP)
    if top != key:
        return top
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + j
        if part == "resnets":
            return f"input_blocks.{block}.0.{_swap(rest, _RESNET_UNET)}"
        return f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_swap(m[2], _RESNET_UNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per_level + j
        if part == "resnets":
            return f"output_blocks.{block}.0.{_swap(rest, _RESNET_UNET)}"
        return f"output_blocks.{block}.1.{rest}"
    raise KeyError(key)


def unet_upsampler_key_to_ldm(key: str, layers_per_block: int, level_has_attention: bool) -> str:
    """`up_blocks.0.upsamplers.0.conv.weight` -> `output_blocks.2.1.conv.weight`."""
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if not m:
        raise KeyError(key)
    per_level = layers_per_block + 1
    block = int(m[1]) * per_level + layers_per_block
    return f"output_blocks.{block}.{2 if level_has_attention else 1}.conv.{m[2]}"


def unet_to_ldm(state: dict, layers_per_block: int, up_block_types: list[str]) -> dict:
    """A diffusers UNet state dict -> ldm names with the `model.diffusion_model.` prefix."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("up_blocks.") and ".upsamplers." in key:
            level = int(key.split(".")[1])
            has_attn = up_block_types[level].startswith("CrossAttn")
            name = unet_upsampler_key_to_ldm(key, layers_per_block, has_attn)
        else:
            name = unet_key_to_ldm(key, layers_per_block)
        out[UNET_PREFIX + name] = tensor
    return out


def vae_key_to_ldm(key: str, num_levels: int) -> tuple[str, bool]:
    """Diffusers VAE key -> (ldm name without prefix, whether the tensor is a 1x1 conv in ldm)."""
    is_attn = ".attentions." in key
    name = key
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)

    def up_level(m: re.Match) -> str:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.{m[2]}"

    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+\.)", up_level, name)
    name = re.sub(r"^decoder\.up\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.block.\2.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", name)
    name = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                  lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", name)
    name = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", name)
    name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
    head, _, leaf = name.rpartition(".")
    parts = head.split(".")
    # the module's own name is the last part of `head` (two parts for to_out.0)
    for width in (2, 1):
        module = ".".join(parts[-width:])
        table = _ATTN_VAE if is_attn else _RESNET_VAE
        if module in table:
            head = ".".join(parts[:-width] + [table[module]])
            break
    return f"{head}.{leaf}", is_attn and leaf == "weight" and not name.endswith("norm.weight")


def vae_to_ldm(state: dict, num_levels: int) -> dict:
    """A diffusers AutoencoderKL state dict -> ldm names with the `first_stage_model.` prefix."""
    out = {}
    for key, tensor in state.items():
        name, conv_1x1 = vae_key_to_ldm(key, num_levels)
        if conv_1x1 and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + name] = tensor
    return out


def text_to_ldm(state: dict) -> dict:
    """A transformers CLIPTextModel state dict (flattened or `text_model.`) -> ldm names."""
    return {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}
