"""Reading every format: each file is made here with the exact key names and dtypes its tool writes
(diffusers and peft files by diffusers and peft themselves) and must read to the same delta W and
survive a kohya round trip; files for other bases, LyCORIS and broken files are refused in one line."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training import ldm_keys
from training.errors import UserError
from training.lora import kohya_name, lora_info, module_table, read_lora
from training.models import FAMILY_CONFIGS

from lora_helpers import Q1, TE_PATH, assert_round_trip, kohya_file, peft_deltas, peft_unet_and_te, randn, save_lora


def test_diffusers_current_format_with_adapter_metadata(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    unet, text_encoder, unet_config, te_config = peft_unet_and_te(4, 8, alpha_pattern={"attn2.to_k": 2})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f"unet.{Q1[5:]}.lora_A.weight" in f.keys() and "lora_adapter_metadata" in f.metadata()
    expected = peft_deltas(unet, text_encoder)
    lora = assert_round_trip(path, expected, tmp_path, fmt="diffusers")
    assert lora.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].alpha == 2.0
    assert lora.layers[Q1].alpha == 8.0 and lora.layers[f"text_encoder.{TE_PATH}"].alpha == 8.0
    assert any(n.endswith("resnets.0.conv1") for n in lora.layers)  # peft conv layers too


def test_diffusers_training_script_format_lora_down_up(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    unet, text_encoder, _, _ = peft_unet_and_te(4, 4)  # the scripts train with lora_alpha = rank
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert f"unet.{Q1[5:]}.lora.down.weight" in keys
    assert f"text_encoder.{TE_PATH}.lora_linear_layer.down.weight" in keys
    lora = assert_round_trip(path, peft_deltas(unet, text_encoder), tmp_path, fmt="diffusers")
    assert any("alpha = rank assumed" in note for note in lora.notes)


def test_peft_save_pretrained_folder_reads_alpha_from_adapter_config(tmp_path):
    from peft import LoraConfig, get_peft_model

    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(FAMILY_CONFIGS["tiny"] / "unet"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v", "ff.net.2"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = randn(*param.shape, seed=len(name), scale=0.1)
    model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert f"base_model.model.{Q1[5:]}.lora_A.weight" in f.keys()
    expected = {f"unet.{p.removeprefix('base_model.model.')}": m.get_delta_weight("default").double()
                for p, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}
    lora = assert_round_trip(tmp_path / "adapter", expected, tmp_path, fmt="peft")
    assert {layer.alpha for layer in lora.layers.values()} == {16.0}


def test_old_diffusers_attention_processor_keys(tmp_path):
    """diffusers <= 0.20 LoRAAttnProcessor files: `attn1.processor.to_q_lora.down.weight`, fp32, no alpha."""
    table = module_table("tiny")
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    state, expected = {}, {}
    for i, (proc, module) in enumerate([("to_q", "to_q"), ("to_k", "to_k"), ("to_out", "to_out.0")]):
        for attn in ("attn1", "attn2"):
            name = f"unet.{block}.{attn}.{module}"
            out_dim, in_dim = table.shapes[name]
            down, up = randn(4, in_dim, seed=i), randn(out_dim, 4, seed=50 + i)
            state[f"unet.{block}.{attn}.processor.{proc}_lora.down.weight"] = down
            state[f"unet.{block}.{attn}.processor.{proc}_lora.up.weight"] = up
            expected[name] = up.double() @ down.double()
    for proj in ("q", "out"):  # the old text encoder monkey-patch names
        name = f"text_encoder.encoder.layers.1.self_attn.{proj}_proj"
        down, up = randn(4, 32, seed=7), randn(32, 4, seed=8)
        state[f"text_encoder.text_model.encoder.layers.1.self_attn.to_{proj}_lora.down.weight"] = down
        state[f"text_encoder.text_model.encoder.layers.1.self_attn.to_{proj}_lora.up.weight"] = up
        expected[name] = up.double() @ down.double()
    path = tmp_path / "attn_procs.safetensors"
    save_file(state, str(path))
    assert_round_trip(path, expected, tmp_path, fmt="diffusers-attn-processor")
    # unet.save_attn_procs() wrote the same keys without the `unet.` prefix
    bare = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    lora = read_lora(bare)
    assert set(lora.layers) == {n for n in expected if n.startswith("unet.")}


def _ldm_names(family="tiny") -> dict[str, str]:
    """canonical UNet name -> ldm module path, as diffusers' single-file converter sees it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(FAMILY_CONFIGS[family] / "unet"))
    state = unet.state_dict()
    ldm = ldm_keys.unet_to_ldm(state, unet.config.layers_per_block, list(unet.config.up_block_types))
    by_storage = {t.data_ptr(): k for k, t in convert_ldm_unet_checkpoint(ldm, dict(unet.config)).items()}
    return {"unet." + by_storage[t.data_ptr()].removesuffix(".weight"): k.removeprefix(ldm_keys.UNET_PREFIX).removesuffix(".weight")
            for k, t in ldm.items() if k.endswith(".weight")}


def test_comfyui_lora_save_format(tmp_path):
    """comfy_extras/nodes_lora_extract.py LoraSave: `diffusion_model.<ldm>.lora_up.weight` fp16, no alpha,
    `.diff` for 1-D weights and `.diff_b` for biases; text encoder under `text_encoders.clip_l.transformer.`."""
    table, ldm = module_table("tiny"), _ldm_names("tiny")
    names = [Q1, "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "unet.mid_block.attentions.0.proj_out",
             "unet.down_blocks.2.resnets.0.conv_shortcut", "unet.up_blocks.0.upsamplers.0.conv", "unet.time_embedding.linear_1"]
    state, expected = {}, {}
    for i, name in enumerate(names):
        shape = table.shapes[name]
        up = randn(shape[0], 4, *([1] * (len(shape) - 2)), seed=i, scale=0.1).half()
        down = randn(4, *shape[1:], seed=20 + i, scale=0.1).half()
        state[f"diffusion_model.{ldm[name]}.lora_up.weight"] = up
        state[f"diffusion_model.{ldm[name]}.lora_down.weight"] = down
        expected[name] = (up.double().flatten(1) @ down.double().flatten(1)).reshape(shape)
    state[f"diffusion_model.{ldm[Q1].rsplit('.', 2)[0]}.norm1.diff"] = torch.zeros(32).half()
    state[f"diffusion_model.{ldm[names[1]]}.diff_b"] = randn(table.shapes[names[1]][0], seed=3).half()
    te = "text_encoders.clip_l.transformer.text_model."
    state[f"{te}{TE_PATH}.lora_up.weight"] = up_te = randn(32, 4, seed=9).half()
    state[f"{te}{TE_PATH}.lora_down.weight"] = down_te = randn(4, 32, seed=10).half()
    expected[f"text_encoder.{TE_PATH}"] = up_te.double() @ down_te.double()
    state[f"{te}embeddings.token_embedding.lora_up.weight"] = randn(49408, 4, seed=11).half()
    state[f"{te}embeddings.token_embedding.lora_down.weight"] = randn(4, 32, seed=12).half()
    path = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    save_file(state, str(path))
    lora = assert_round_trip(path, expected, tmp_path, fmt="comfyui")
    # every key is mapped or reported, with a reason
    assert set(lora.unmapped) == {k for k in state if ".diff" in k or "token_embedding" in k}
    assert "nothing lost" in next(r for k, r in lora.unmapped.items() if k.endswith(".diff"))
    assert "is lost" in next(r for k, r in lora.unmapped.items() if k.endswith(".diff_b"))
    info = lora_info(path)
    assert "not mapped: 4 keys" in info and "token_embedding" in info


def test_comfyui_train_lora_node_format_bf16_flat_conv_down(tmp_path):
    """comfy_extras/nodes_train.py: bf16 `lora_up.weight`, `lora_down.weight` (2-D even for convs), 0-d `alpha` 1.0."""
    table, ldm = module_table("tiny"), _ldm_names("tiny")
    state, expected = {}, {}
    for i, name in enumerate([Q1, "unet.down_blocks.0.resnets.0.conv1", "unet.conv_in", "unet.down_blocks.0.downsamplers.0.conv"]):
        shape = table.shapes[name]
        up = randn(shape[0], 8, seed=i).bfloat16()
        down = randn(8, math.prod(shape[1:]), seed=30 + i).bfloat16()
        key = f"diffusion_model.{ldm[name]}"
        state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"] = up, down
        state[f"{key}.alpha"] = torch.tensor(1.0).bfloat16()
        state[f"{key}.diff_b"] = torch.zeros(shape[0]).bfloat16()
        expected[name] = (up.double() @ down.double()).reshape(shape) / 8
    path = tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors"
    save_file(state, str(path))
    lora = assert_round_trip(path, expected, tmp_path, fmt="comfyui")
    assert lora.layers["unet.conv_in"].down.shape[1:] == table.shapes["unet.conv_in"][1:]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("key,width,words", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, "SDXL"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 1024, "Stable Diffusion 2.x"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, "Stable Diffusion 2.x"),
])
def test_lora_for_another_base_is_refused_with_one_line(tmp_path, key, width, words):
    path = save_lora(tmp_path, {f"{key}.lora_down.weight": torch.zeros(4, width).half(), f"{key}.lora_up.weight": torch.zeros(320, 4).half()})
    with pytest.raises(UserError, match=words) as err:
        read_lora(path)
    assert "\n" not in str(err.value) and "x.safetensors" in str(err.value)


def test_sdxl_by_second_text_encoder_or_metadata(tmp_path):
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    with pytest.raises(UserError, match="SDXL"):
        read_lora(save_lora(tmp_path, {f"{key}.lora_down.weight": torch.zeros(4, 1280), f"{key}.lora_up.weight": torch.zeros(1280, 4)}))
    path, _ = kohya_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    with pytest.raises(UserError, match="SDXL"):
        read_lora(save_lora(tmp_path, state, "meta.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"}))


@pytest.mark.parametrize("suffixes,kind", [
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"), "LoHa"),
    ((".lokr_w1", ".lokr_w2", ".alpha"), "LoKr"),
])
def test_lycoris_is_refused_not_dropped(tmp_path, suffixes, kind):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(UserError, match=kind):
        read_lora(save_lora(tmp_path, {key + s: torch.ones(4, 4) for s in suffixes}))


def test_broken_files_are_refused_with_the_file_and_key(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = {f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.ones(32, 4)}
    bad[f"{key}.lora_up.weight"][3, 1] = float("nan")
    with pytest.raises(UserError, match=rf"nan_lora.safetensors.*{key}.lora_up.weight"):
        read_lora(save_lora(tmp_path, bad, "nan_lora.safetensors"))
    with pytest.raises(UserError, match="no matching up"):
        read_lora(save_lora(tmp_path, {f"{key}.lora_down.weight": torch.ones(4, 32)}))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    checkpoint = save_lora(tmp_path, {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(32, 4, 3, 3)}, "base.safetensors")
    with pytest.raises(UserError, match="full model checkpoint"):
        read_lora(checkpoint)
    (tmp_path / "old.ckpt").write_bytes(b"whatever")
    with pytest.raises(UserError, match="pickle"):
        read_lora(tmp_path / "old.ckpt")


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    path, expected = kohya_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["lora_unet_not_a_module.lora_down.weight"] = torch.ones(4, 8)
    state["lora_unet_not_a_module.lora_up.weight"] = torch.ones(8, 4)
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 7)  # wrong width
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4)
    state["something_else"] = torch.ones(3)
    lora = read_lora(save_lora(tmp_path, state, "extra.safetensors"))
    assert set(lora.layers) == set(expected)
    assert set(lora.unmapped) == {k for k in state if "not_a_module" in k or "down_blocks_0_attentions_0_proj_in" in k} | {"something_else"}
    assert "do not fit" in lora.unmapped["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]


def test_full_size_sd15_layers_are_recognised(tmp_path):
    """A few real SD1.5-size layers in kohya form read as `sd15`, not `tiny`."""
    table = module_table("sd15")
    state = {}
    for name in ["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
                 "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k", "text_encoder.encoder.layers.11.mlp.fc2"]:
        out_dim, in_dim = table.shapes[name][:2]
        state[kohya_name(name) + ".lora_down.weight"] = torch.full((2, in_dim), 0.01).half()
        state[kohya_name(name) + ".lora_up.weight"] = torch.full((out_dim, 2), 0.01).half()
    lora = read_lora(save_lora(tmp_path, state))
    assert lora.family == "sd15" and len(lora.layers) == 3 and not lora.unmapped
