"""LoRA formats: every readable format -> kohya -> reader keeps each layer's delta W;
resize equals the truncated SVD of the full product; extraction recovers a known change;
diffusers loads what we write. Test files are made here with the exact key names and
dtypes each tool writes (diffusers and peft files by diffusers and peft themselves)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training import ldm_keys
from training import lora_format as lf
from training.errors import UserError
from training.models import build_tiny, save_single_file

TE_PATH = "encoder.layers.0.self_attn.q_proj"
Q1 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def assert_round_trip(source, expected: dict[str, torch.Tensor], tmp_path, fmt: str | None = None) -> lf.LoraFile:
    """`source` reads to exactly `expected` (canonical name -> delta W), and survives kohya fp16."""
    lora = lf.read_lora(source)
    if fmt is not None:
        assert lora.source_format == fmt
    assert set(lora.layers) == set(expected)
    for name, delta in expected.items():
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-5, name
    out = tmp_path / "converted_kohya.safetensors"
    lf.write_kohya(lora, out)
    back = lf.read_lora(out)
    assert back.source_format == "kohya" and not back.unmapped and back.family == lora.family
    for name, delta in expected.items():
        assert rel_err(back.layers[name].delta(torch.float64), delta) < 2e-3, name  # fp16 storage
    return lora


# ---------------------------------------------------------------- names


def test_name_tables_cover_sd15_and_map_kohya_names_both_ways():
    table = lf.module_table("sd15")
    unet = [n for n in table.shapes if n.startswith("unet.")]
    te = [n for n in table.shapes if n.startswith("text_encoder.")]
    assert len(te) == 72 and len(unet) == 282  # CLIP-L: 12 layers x 6 linears
    assert sum(".transformer_blocks." in n and n.endswith(("to_q", "ff.net.2")) for n in unet) == 16 * 3
    # kohya names: one per module, each maps back to it
    kohya = {lf.kohya_name(n): n for n in table.shapes}
    assert len(kohya) == len(table.shapes)
    assert all(table.aliases[k] == n for k, n in kohya.items())
    assert lf.kohya_name(Q1) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lf.kohya_name("text_encoder.encoder.layers.11.mlp.fc2") == "lora_te_text_model_encoder_layers_11_mlp_fc2"
    assert table.shapes["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"] == (10240, 1280)


@pytest.mark.parametrize("family", lf.FAMILIES)
def test_shipped_module_tables_equal_tables_built_from_the_installed_diffusers(family):
    """module_table.json is read instead of building meta models; rebuild with scripts/build_module_tables.py."""
    import json

    shipped = json.loads((lf.FAMILY_CONFIGS[family] / lf.MODULE_TABLE_FILE).read_text())
    assert shipped == json.loads(json.dumps(lf.module_rows(family)))


@pytest.mark.parametrize("family", lf.FAMILIES)
def test_ldm_module_names_agree_with_diffusers_single_file_converter(family):
    """ComfyUI's own files use ldm names; diffusers' ldm -> diffusers converter is the referee."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = dict(UNet2DConditionModel.load_config(lf.FAMILY_CONFIGS[family] / "unet"))
    if config["block_out_channels"][0] >= 320:  # the layout at toy widths (that still differ where the real ones do)
        config.update(block_out_channels=[w // 20 for w in config["block_out_channels"]], cross_attention_dim=32,
                      norm_num_groups=8, attention_head_dim=2)
    unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    ldm = ldm_keys.unet_to_ldm(state, config["layers_per_block"], config["up_block_types"])
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    by_storage = {t.data_ptr(): k for k, t in converted.items()}
    table = lf.module_table(family)
    checked = 0
    for ldm_key, tensor in ldm.items():
        diffusers_key = by_storage[tensor.data_ptr()]
        name = "unet." + diffusers_key.removesuffix(".weight")
        if ldm_key.endswith(".weight") and name in table.shapes:
            module = ldm_key.removeprefix(ldm_keys.UNET_PREFIX).removesuffix(".weight")
            assert table.aliases[f"diffusion_model.{module}"] == name
            assert table.aliases["lora_unet_" + module.replace(".", "_")] == name
            checked += 1
    assert checked == len([n for n in table.shapes if n.startswith("unet.")])


# ---------------------------------------------------------------- formats


def kohya_file(tmp_path, family="tiny", rank=4, conv_rank=2):
    """What sd-scripts' networks/lora.py writes for SD1 (conv_dim set): fp16, 0-d fp16 alpha."""
    table = lf.module_table(family)
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


def _peft_unet_and_te(rank, alpha, alpha_pattern=None, unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(lf.FAMILY_CONFIGS["tiny"] / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(lf.FAMILY_CONFIGS["tiny"] / "text_encoder"))
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


def _peft_deltas(unet, text_encoder) -> dict[str, torch.Tensor]:
    """delta W as peft itself computes it."""
    out = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for path, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                out[f"{component}.{path}"] = module.get_delta_weight("default").double()
    return out


def test_diffusers_current_format_with_adapter_metadata(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    unet, text_encoder, unet_config, te_config = _peft_unet_and_te(4, 8, alpha_pattern={"attn2.to_k": 2})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f"unet.{Q1[5:]}.lora_A.weight" in f.keys() and "lora_adapter_metadata" in f.metadata()
    expected = _peft_deltas(unet, text_encoder)
    lora = assert_round_trip(path, expected, tmp_path, fmt="diffusers")
    assert lora.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].alpha == 2.0
    assert lora.layers[Q1].alpha == 8.0 and lora.layers[f"text_encoder.{TE_PATH}"].alpha == 8.0
    assert any(n.endswith("resnets.0.conv1") for n in lora.layers)  # peft conv layers too


def test_diffusers_training_script_format_lora_down_up(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    unet, text_encoder, _, _ = _peft_unet_and_te(4, 4)  # the scripts train with lora_alpha = rank
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert f"unet.{Q1[5:]}.lora.down.weight" in keys
    assert f"text_encoder.{TE_PATH}.lora_linear_layer.down.weight" in keys
    lora = assert_round_trip(path, _peft_deltas(unet, text_encoder), tmp_path, fmt="diffusers")
    assert any("alpha = rank assumed" in note for note in lora.notes)


def test_peft_save_pretrained_folder_reads_alpha_from_adapter_config(tmp_path):
    from peft import LoraConfig, get_peft_model

    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(lf.FAMILY_CONFIGS["tiny"] / "unet"))
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


def test_peft_state_dict_from_the_trainer(tmp_path):
    from peft import get_peft_model_state_dict

    unet, text_encoder, unet_config, _ = _peft_unet_and_te(4, 8, alpha_pattern={"attn2.to_k": 2})
    lora = lf.peft_state_to_lora(get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder),
                                 alpha=unet_config.to_dict())
    expected = _peft_deltas(unet, text_encoder)
    assert set(lora.layers) == set(expected) and lora.family == "tiny" and not lora.unmapped
    for name, delta in expected.items():
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-6, name


def test_old_diffusers_attention_processor_keys(tmp_path):
    """diffusers <= 0.20 LoRAAttnProcessor files: `attn1.processor.to_q_lora.down.weight`, fp32, no alpha."""
    table = lf.module_table("tiny")
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
    lora = lf.read_lora(bare)
    assert set(lora.layers) == {n for n in expected if n.startswith("unet.")}


def _ldm_names(family="tiny") -> dict[str, str]:
    """canonical UNet name -> ldm module path, as diffusers' single-file converter sees it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(lf.FAMILY_CONFIGS[family] / "unet"))
    state = unet.state_dict()
    ldm = ldm_keys.unet_to_ldm(state, unet.config.layers_per_block, list(unet.config.up_block_types))
    by_storage = {t.data_ptr(): k for k, t in convert_ldm_unet_checkpoint(ldm, dict(unet.config)).items()}
    return {"unet." + by_storage[t.data_ptr()].removesuffix(".weight"): k.removeprefix(ldm_keys.UNET_PREFIX).removesuffix(".weight")
            for k, t in ldm.items() if k.endswith(".weight")}


def test_comfyui_lora_save_format(tmp_path):
    """comfy_extras/nodes_lora_extract.py LoraSave: `diffusion_model.<ldm>.lora_up.weight` fp16, no alpha,
    `.diff` for 1-D weights and `.diff_b` for biases; text encoder under `text_encoders.clip_l.transformer.`."""
    table, ldm = lf.module_table("tiny"), _ldm_names("tiny")
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
    info = lf.lora_info(path)
    assert "not mapped: 4 keys" in info and "token_embedding" in info


def test_comfyui_train_lora_node_format_bf16_flat_conv_down(tmp_path):
    """comfy_extras/nodes_train.py: bf16 `lora_up.weight`, `lora_down.weight` (2-D even for convs), 0-d `alpha` 1.0."""
    table, ldm = lf.module_table("tiny"), _ldm_names("tiny")
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


def _save(tmp_path, state, name="x.safetensors", metadata=None):
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("key,width,words", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, "SDXL"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 1024, "Stable Diffusion 2.x"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, "Stable Diffusion 2.x"),
])
def test_lora_for_another_base_is_refused_with_one_line(tmp_path, key, width, words):
    path = _save(tmp_path, {f"{key}.lora_down.weight": torch.zeros(4, width).half(), f"{key}.lora_up.weight": torch.zeros(320, 4).half()})
    with pytest.raises(UserError, match=words) as err:
        lf.read_lora(path)
    assert "\n" not in str(err.value) and "x.safetensors" in str(err.value)


def test_sdxl_by_second_text_encoder_or_metadata(tmp_path):
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    with pytest.raises(UserError, match="SDXL"):
        lf.read_lora(_save(tmp_path, {f"{key}.lora_down.weight": torch.zeros(4, 1280), f"{key}.lora_up.weight": torch.zeros(1280, 4)}))
    path, _ = kohya_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    with pytest.raises(UserError, match="SDXL"):
        lf.read_lora(_save(tmp_path, state, "meta.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"}))


@pytest.mark.parametrize("suffixes,kind", [
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"), "LoHa"),
    ((".lokr_w1", ".lokr_w2", ".alpha"), "LoKr"),
])
def test_lycoris_is_refused_not_dropped(tmp_path, suffixes, kind):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(UserError, match=kind):
        lf.read_lora(_save(tmp_path, {key + s: torch.ones(4, 4) for s in suffixes}))


def test_broken_files_are_refused_with_the_file_and_key(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = {f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.ones(32, 4)}
    bad[f"{key}.lora_up.weight"][3, 1] = float("nan")
    with pytest.raises(UserError, match=rf"nan_lora.safetensors.*{key}.lora_up.weight"):
        lf.read_lora(_save(tmp_path, bad, "nan_lora.safetensors"))
    with pytest.raises(UserError, match="no matching up"):
        lf.read_lora(_save(tmp_path, {f"{key}.lora_down.weight": torch.ones(4, 32)}))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable safetensors"):
        lf.read_lora(tmp_path / "junk.safetensors")
    checkpoint = _save(tmp_path, {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(32, 4, 3, 3)}, "base.safetensors")
    with pytest.raises(UserError, match="full model checkpoint"):
        lf.read_lora(checkpoint)
    (tmp_path / "old.ckpt").write_bytes(b"whatever")
    with pytest.raises(UserError, match="pickle"):
        lf.read_lora(tmp_path / "old.ckpt")


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    path, expected = kohya_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["lora_unet_not_a_module.lora_down.weight"] = torch.ones(4, 8)
    state["lora_unet_not_a_module.lora_up.weight"] = torch.ones(8, 4)
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 7)  # wrong width
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4)
    state["something_else"] = torch.ones(3)
    lora = lf.read_lora(_save(tmp_path, state, "extra.safetensors"))
    assert set(lora.layers) == set(expected)
    assert set(lora.unmapped) == {k for k in state if "not_a_module" in k or "down_blocks_0_attentions_0_proj_in" in k} | {"something_else"}
    assert "do not fit" in lora.unmapped["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]


# ---------------------------------------------------------------- resize


def _reference_truncation(layer: lf.LoraLayer, k: int) -> tuple[torch.Tensor, float]:
    full = layer.delta(torch.float64).reshape(layer.shape[0], -1)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(layer.shape), float((s[:k].square().sum() / s.square().sum()).sqrt())


def _layers_for_resize() -> lf.LoraFile:
    table = lf.module_table("tiny")
    layers = {}
    for i, name in enumerate([Q1, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                              "unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.0.proj",
                              "unet.down_blocks.0.resnets.0.conv1", f"text_encoder.{TE_PATH}"]):
        shape = table.shapes[name]
        decay = torch.exp(-torch.arange(16.0) / (1 + i))  # distinct singular values, like a trained LoRA
        up = randn(shape[0], 16, *([1] * (len(shape) - 2)), seed=i) * decay.reshape(1, 16, *([1] * (len(shape) - 2)))
        layers[name] = lf.LoraLayer(randn(16, *shape[1:], seed=40 + i).half(), up.half(), alpha=8.0 + i)
    return lf.LoraFile(layers, family="tiny")


def test_resize_to_fixed_rank_equals_truncated_svd_of_the_product():
    lora = _layers_for_resize()
    small, report = lf.resize(lora, rank=5)
    assert [r.name for r in report] == list(lora.layers)
    for rep in report:
        old, new = lora.layers[rep.name], small.layers[rep.name]
        reference, kept = _reference_truncation(old, 5)
        assert new.rank == rep.rank_after == 5 and rep.rank_before == 16
        assert rel_err(new.delta(torch.float64), reference) < 1e-5, rep.name
        assert new.alpha / new.rank == pytest.approx(old.alpha / old.rank)  # effective scale unchanged
        assert rep.kept == pytest.approx(kept, abs=1e-6)
        assert new.down.shape[1:] == old.down.shape[1:] and new.up.shape[2:] == old.up.shape[2:]


def test_resize_by_kept_energy_picks_the_smallest_rank_that_keeps_it():
    lora = _layers_for_resize()
    small, report = lf.resize(lora, keep_energy=0.95)
    ranks = set()
    for rep in report:
        old = lora.layers[rep.name]
        reference, kept = _reference_truncation(old, rep.rank_after)
        _, kept_one_less = _reference_truncation(old, rep.rank_after - 1)
        assert kept >= 0.95 > kept_one_less
        assert rel_err(small.layers[rep.name].delta(torch.float64), reference) < 1e-5
        ranks.add(rep.rank_after)
    assert len(ranks) > 1  # layers of different spectra keep different ranks
    capped, report = lf.resize(lora, rank=3, keep_energy=0.95)
    assert max(r.rank_after for r in report) == 3


def test_resize_needs_a_target():
    with pytest.raises(UserError, match="--rank"):
        lf.resize(_layers_for_resize())
    with pytest.raises(UserError, match="keep-energy"):
        lf.resize(_layers_for_resize(), keep_energy=1.5)


# ---------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def tuned_pair(tmp_path_factory):
    """tiny as base, and a copy with known rank-3 changes in two UNet layers and one text encoder layer."""
    folder = tmp_path_factory.mktemp("extract")
    tuned = build_tiny()
    save_single_file(tuned, folder / "base.safetensors", dtype=torch.float32)
    changes = {}
    for i, name in enumerate([Q1, "unet.up_blocks.2.attentions.1.proj_in", f"text_encoder.{TE_PATH}"]):
        component, path = name.split(".", 1)
        weight = getattr(tuned, component).get_submodule(path).weight
        shape = weight.shape
        delta = (randn(shape[0], 3, seed=i) @ randn(3, math.prod(shape[1:]), seed=9 + i) * 0.05).reshape(shape)
        with torch.no_grad():
            weight += delta
        changes[name] = delta.double()
    save_single_file(tuned, folder / "tuned.safetensors", dtype=torch.float32)
    return folder, tuned, changes


def test_extract_from_single_files_recovers_the_change(tuned_pair):
    folder, _, changes = tuned_pair
    events = []
    lora, report = lf.extract(folder / "base.safetensors", folder / "tuned.safetensors", rank=8,
                              text_encoder=True, progress=events.append)
    assert set(lora.layers) == set(changes) and lora.family == "tiny"
    for name, delta in changes.items():
        assert lora.layers[name].rank == 8
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-4
    assert events[-1].step == events[-1].total == len(lf.extraction_targets("tiny", text_encoder=True))
    assert any("did not change" in note for note in lora.notes)


def test_extract_from_loaded_models_by_kept_energy(tuned_pair):
    _, tuned, changes = tuned_pair
    lora, report = lf.extract(build_tiny(), tuned, keep_energy=0.999)
    unet_changes = {n: d for n, d in changes.items() if n.startswith("unet.")}
    assert set(lora.layers) == set(unet_changes)
    for rep in report:
        assert rep.rank_after <= 3 and rep.kept >= 0.999
        assert rel_err(lora.layers[rep.name].delta(torch.float64), unet_changes[rep.name]) < 0.05


# ---------------------------------------------------------------- consumers and the CLI


def test_diffusers_load_lora_weights_consumes_every_key_and_applies_our_delta(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    table = lf.module_table("tiny")
    layers = {}
    for i, name in enumerate(table.shapes):  # every LoRA-able layer, convs and text encoder included
        shape = table.shapes[name]
        layers[name] = lf.LoraLayer(randn(2, *shape[1:], seed=i, scale=0.3), randn(shape[0], 2, *([1] * (len(shape) - 2)), seed=999 - i, scale=0.3), 1.0)
    path = tmp_path / "ours.safetensors"
    lf.write_kohya(lf.LoraFile(layers, family="tiny"), path)

    model = build_tiny()
    pipe = StableDiffusionPipeline(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   scheduler=DDIMScheduler.from_pretrained(lf.FAMILY_CONFIGS["tiny"] / "scheduler"),
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


def test_cli_info_resize_convert_extract(tmp_path, tuned_pair, capsys):
    from training.cli import main

    path, _ = kohya_file(tmp_path)
    assert main(["lora", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:    kohya" in out and "tiny" in out and "ss_steps: 400" in out and "not mapped: none" in out

    small = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "2", "--out", str(small)]) == 0
    assert {layer.rank for layer in lf.read_lora(small).layers.values()} == {2}
    assert "kept Frobenius fraction" in capsys.readouterr().out

    assert main(["lora", "resize", str(path), "--out", str(tmp_path / "no.safetensors")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()

    folder, _, changes = tuned_pair
    out_file = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--base", str(folder / "base.safetensors"), "--tuned", str(folder / "tuned.safetensors"),
                 "--rank", "4", "--text-encoder", "--out", str(out_file)]) == 0
    extracted = lf.read_lora(out_file)
    assert set(extracted.layers) == set(changes)
    assert extracted.metadata["ss_new_sd_model_hash"] == extracted.metadata["dreambooth.base_sha256"]

    converted = tmp_path / "converted.safetensors"
    assert main(["lora", "convert", str(small), "--out", str(converted)]) == 0
    assert set(lf.read_lora(converted).layers) == set(lf.read_lora(small).layers)


def test_full_size_sd15_layers_are_recognised(tmp_path):
    """A few real SD1.5-size layers in kohya form read as `sd15`, not `tiny`."""
    table = lf.module_table("sd15")
    state = {}
    for name in ["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
                 "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k", "text_encoder.encoder.layers.11.mlp.fc2"]:
        out_dim, in_dim = table.shapes[name][:2]
        state[lf.kohya_name(name) + ".lora_down.weight"] = torch.full((2, in_dim), 0.01).half()
        state[lf.kohya_name(name) + ".lora_up.weight"] = torch.full((out_dim, 2), 0.01).half()
    lora = lf.read_lora(_save(tmp_path, state))
    assert lora.family == "sd15" and len(lora.layers) == 3 and not lora.unmapped
