"""Writing kohya files: names, dtypes and metadata kohya writes; the trainer's peft state converts
exactly; diffusers' load_lora_weights consumes every key we write and applies our delta W."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from training.lora import LoraFile, LoraLayer, module_table, peft_state_to_lora, write_kohya
from training.models import FAMILY_CONFIGS, build_tiny

from lora_helpers import assert_round_trip, kohya_file, peft_deltas, peft_unet_and_te, randn, rel_err


def test_kohya_round_trip_keeps_layers_metadata_and_writes_kohya_names(tmp_path):
    path, expected = kohya_file(tmp_path)
    lora = assert_round_trip(path, expected, tmp_path, fmt="kohya")
    assert lora.family == "tiny" and lora.metadata["ss_steps"] == "400"
    with safe_open(str(tmp_path / "converted_kohya.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").dtype == torch.float16
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape[2:] == (3, 3)
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").dtype == torch.float16
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_steps"] == "400" and len(meta["sshs_model_hash"]) == 64


def test_peft_state_dict_from_the_trainer(tmp_path):
    from peft import get_peft_model_state_dict

    unet, text_encoder, unet_config, _ = peft_unet_and_te(4, 8, alpha_pattern={"attn2.to_k": 2})
    lora = peft_state_to_lora(get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder),
                                 alpha=unet_config.to_dict())
    expected = peft_deltas(unet, text_encoder)
    assert set(lora.layers) == set(expected) and lora.family == "tiny" and not lora.unmapped
    for name, delta in expected.items():
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-6, name


def test_diffusers_load_lora_weights_consumes_every_key_and_applies_our_delta(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    table = module_table("tiny")
    layers = {}
    for i, name in enumerate(table.shapes):  # every LoRA-able layer, convs and text encoder included
        shape = table.shapes[name]
        layers[name] = LoraLayer(randn(2, *shape[1:], seed=i, scale=0.3), randn(shape[0], 2, *([1] * (len(shape) - 2)), seed=999 - i, scale=0.3), 1.0)
    path = tmp_path / "ours.safetensors"
    write_kohya(LoraFile(layers, family="tiny"), path)

    model = build_tiny()
    pipe = StableDiffusionPipeline(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   scheduler=DDIMScheduler.from_pretrained(FAMILY_CONFIGS["tiny"] / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def sample():
        return pipe("a photo of sks man", num_inference_steps=1, height=64, width=64, output_type="latent",
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    before = {c: {k: v.clone() for k, v in getattr(model, c).state_dict().items()} for c in ("unet", "text_encoder")}
    pipe.load_lora_weights(str(path))  # raises on any key it cannot rename
    adapted = sum(hasattr(m, "lora_A") for c in (model.unet, model.text_encoder) for m in c.modules())
    assert adapted == len(layers)
    with_lora = sample()
    assert (with_lora - plain).abs().max() > 1e-3
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights
    after = {c: getattr(model, c).state_dict() for c in ("unet", "text_encoder")}
    for name, layer in layers.items():
        component, module = name.split(".", 1)
        applied = after[component][f"{module}.weight"] - before[component][f"{module}.weight"]
        assert rel_err(applied, layer.delta(torch.float64)) < 2e-3, name
