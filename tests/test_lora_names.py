"""Module tables: every LoRA-able SD1.5 module, its kohya name and its ldm spelling, checked against
diffusers itself; the shipped module_table.json files equal freshly built ones."""
from __future__ import annotations

import pytest

from training import ldm_keys
from training.lora import FAMILIES, MODULE_TABLE_FILE, kohya_name, module_rows, module_table
from training.models import FAMILY_CONFIGS

from lora_helpers import Q1


def test_name_tables_cover_sd15_and_map_kohya_names_both_ways():
    table = module_table("sd15")
    unet = [n for n in table.shapes if n.startswith("unet.")]
    te = [n for n in table.shapes if n.startswith("text_encoder.")]
    assert len(te) == 72 and len(unet) == 282  # CLIP-L: 12 layers x 6 linears
    assert sum(".transformer_blocks." in n and n.endswith(("to_q", "ff.net.2")) for n in unet) == 16 * 3
    # kohya names: one per module, each maps back to it
    kohya = {kohya_name(n): n for n in table.shapes}
    assert len(kohya) == len(table.shapes)
    assert all(table.aliases[k] == n for k, n in kohya.items())
    assert kohya_name(Q1) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("text_encoder.encoder.layers.11.mlp.fc2") == "lora_te_text_model_encoder_layers_11_mlp_fc2"
    assert table.shapes["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"] == (10240, 1280)


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_module_tables_equal_tables_built_from_the_installed_diffusers(family):
    """module_table.json is read instead of building meta models; rebuild with scripts/build_module_tables.py."""
    import json

    shipped = json.loads((FAMILY_CONFIGS[family] / MODULE_TABLE_FILE).read_text())
    assert shipped == json.loads(json.dumps(module_rows(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_module_names_agree_with_diffusers_single_file_converter(family):
    """ComfyUI's own files use ldm names; diffusers' ldm -> diffusers converter is the referee."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = dict(UNet2DConditionModel.load_config(FAMILY_CONFIGS[family] / "unet"))
    if config["block_out_channels"][0] >= 320:  # the layout at toy widths (that still differ where the real ones do)
        config.update(block_out_channels=[w // 20 for w in config["block_out_channels"]], cross_attention_dim=32,
                      norm_num_groups=8, attention_head_dim=2)
    unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    ldm = ldm_keys.unet_to_ldm(state, config["layers_per_block"], config["up_block_types"])
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    by_storage = {t.data_ptr(): k for k, t in converted.items()}
    table = module_table(family)
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
