"""Helpers the LoRA tests share: seeded tensors, error measure, sample files in each tool's format.
(Not in conftest.py, for the reason given in fixture_paths.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from training.lora import LoraFile, module_table, read_lora, write_kohya
from training.models import FAMILY_CONFIGS
from training.resources import one_thread

TE_PATH = "encoder.layers.0.self_attn.q_proj"
Q1 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def assert_round_trip(source, expected: dict[str, torch.Tensor], tmp_path, fmt: str | None = None) -> LoraFile:
    """`source` reads to exactly `expected` (canonical name -> delta W), and survives kohya fp16."""
    lora = read_lora(source)
    if fmt is not None:
        assert lora.source_format == fmt
    assert set(lora.layers) == set(expected)
    for name, delta in expected.items():
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-5, name
    out = tmp_path / "converted_kohya.safetensors"
    write_kohya(lora, out)
    back = read_lora(out)
    assert back.source_format == "kohya" and not back.unmapped and back.family == lora.family
    for name, delta in expected.items():
        assert rel_err(back.layers[name].delta(torch.float64), delta) < 2e-3, name  # fp16 storage
    return lora


def kohya_file(tmp_path, family="tiny", rank=4, conv_rank=2):
    """What sd-scripts' networks/lora.py writes for SD1 (conv_dim set): fp16, 0-d fp16 alpha."""
    table = module_table(family)
    names = [Q1, "unet.down_blocks.1.attentions.0.proj_in", "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
             "unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.0.upsamplers.0.conv", f"text_encoder.{TE_PATH}",
             "text_encoder.encoder.layers.1.mlp.fc1"]
    state, expected = {}, {}
    for i, name in enumerate(names):
        shape = table.shapes[name]
        r = conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else rank
        alpha = 1.0 if r == conv_rank else 2.0
        component, path = name.split(".", 1)
        key = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + path.replace(".", "_")
        down = randn(r, *shape[1:], seed=i, scale=0.1).half()
        up = randn(shape[0], r, *([1] * (len(shape) - 2)), seed=100 + i, scale=0.1).half()
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(alpha).half()
        expected[name] = (up.double().flatten(1) @ down.double().flatten(1)).reshape(shape) * alpha / r
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": "2.0",
            "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": "1"}),
            "ss_output_name": "subject", "ss_steps": "400"}
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path), metadata=meta)
    return path, expected


def peft_unet_and_te(rank, alpha, alpha_pattern=None, unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(FAMILY_CONFIGS["tiny"] / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(FAMILY_CONFIGS["tiny"] / "text_encoder"))
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets), alpha_pattern=alpha_pattern or {})
    te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "fc1"])
    unet.add_adapter(unet_config)
    # transformers' own add_adapter wants peft >= 0.22; diffusers' pipeline loader uses peft directly
    text_encoder = inject_adapter_in_model(te_config, text_encoder)
    generator = torch.Generator().manual_seed(0)
    for module in (unet, text_encoder):
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    return unet, text_encoder, unet_config, te_config


def peft_deltas(unet, text_encoder) -> dict[str, torch.Tensor]:
    """delta W as peft itself computes it."""
    out = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for path, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                out[f"{component}.{path}"] = module.get_delta_weight("default").double()
    return out


def save_lora(tmp_path, state, name="x.safetensors", metadata=None):
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.fixture
def one_torch_thread():
    """Torch on one thread: on a shared, busy 2-core machine big LAPACK calls and tiny's training steps
    run 10-30x faster than on two contending threads."""
    with one_thread():
        yield
