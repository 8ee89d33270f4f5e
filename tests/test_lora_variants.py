"""LoRA variants in kohya files: DoRA (`.dora_scale`) patches to peft's merged weight under ComfyUI's
formula; rsLoRA's alpha / sqrt(r) survives as a plain alpha; what diffusers does with each."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from training.errors import UserError
from training.lora import kohya_name, peft_state_to_lora, read_lora, resize, write_kohya
from training.models import FAMILY_CONFIGS, build_tiny

from fixture_paths import SUBJECT_PHOTOS
from lora_helpers import one_torch_thread, rel_err  # noqa: F401 (a fixture)

TARGETS = ["to_q", "to_v", "ff.net.2", "proj_in", "conv1"]  # linear, 1x1 conv (proj_in), 3x3 conv


def comfyui_patched_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float,
                           dora_scale: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's LoraLoader on one weight, re-implemented from its source (v0.3.64):
    comfy/weight_adapter/lora.py `LoRAAdapter.calculate_weight` (alpha / rank, lora_diff = up @ down)
    and comfy/weight_adapter/base.py `weight_decompose` (function = identity, fp32)."""
    weight = weight.clone().float()
    alpha = alpha / down.shape[0]
    lora_diff = torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(weight.shape)
    if dora_scale is None:
        return weight + strength * alpha * lora_diff
    dora_scale = dora_scale.float()
    lora_diff *= alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: normalised by the *base* weight
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= dora_scale / weight_norm
    if strength != 1.0:
        weight_calc -= weight
        return weight + strength * weight_calc
    return weight_calc


def peft_unet(**variant):
    """tiny's UNet with a peft LoRA (rank 4, alpha 8) of the given variant, adapters and magnitudes randomized."""
    from peft import LoraConfig, get_peft_model

    unet = build_tiny().unet
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **variant)
    model = get_peft_model(unet, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # B is zero at init; DoRA's magnitude starts at |W0| per row: move both
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(param * (1 + 0.2 * noise) if "magnitude" in name else noise * 0.1)
    return model, config


def peft_layers(model) -> dict[str, torch.nn.Module]:
    return {f"unet.{path.removeprefix('base_model.model.')}": module for path, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def merged_weights(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight merged by peft itself, on a copy: merge_and_unload for a PeftModel,
    each tuner layer's merge() (what merge_and_unload calls) for a diffusers model with an adapter."""
    if hasattr(model, "merge_and_unload"):
        merged = copy.deepcopy(model).merge_and_unload()
        return {name: merged.get_submodule(name.split(".", 1)[1]).weight.detach().double() for name in peft_layers(model)}
    layers = peft_layers(copy.deepcopy(model))
    for layer in layers.values():
        layer.merge()
    return {name: layer.base_layer.weight.detach().double() for name, layer in layers.items()}


def to_lora(model, config):
    from peft import get_peft_model_state_dict

    layers = peft_layers(model)
    return peft_state_to_lora(get_peft_model_state_dict(model), alpha=config.to_dict(),
                              base_weight=lambda name: layers[name].base_layer.weight.detach())


def test_dora_file_patched_by_comfyui_formula_equals_peft_merged_weight(tmp_path):
    model, config = peft_unet(use_dora=True)
    merged = merged_weights(model)
    path = write_kohya(to_lora(model, config), tmp_path / "dora.safetensors", dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert meta["dreambooth.lora_variant"] == "dora"
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    layers = peft_layers(model)
    assert {k for k in tensors if k.endswith(".dora_scale")} == {kohya_name(n) + ".dora_scale" for n in layers}
    kinds = set()
    for name, module in layers.items():
        key = kohya_name(name)
        base = module.base_layer.weight.detach()
        scale = tensors[f"{key}.dora_scale"]
        assert scale.shape == (base.shape[0], *[1] * (base.ndim - 1))  # output axis, 2-D or 4-D, never 1-D
        patched = comfyui_patched_weight(base, tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"],
                                         float(tensors[f"{key}.alpha"]), scale)
        assert (patched.double() - merged[name]).abs().max() < 1e-4, name
        assert rel_err(patched - base, merged[name] - base.double()) < 1e-4, name
        kinds.add(base.ndim)
    assert kinds == {2, 4}
    # our reader gives the same weight (ComfyUI's convention kept), and at strength 0.5 ComfyUI interpolates
    back = read_lora(path)
    for name, module in layers.items():
        base = module.base_layer.weight.detach()
        layer = back.layers[name]
        assert layer.magnitude_norm == "base"
        assert (base.double() + layer.weight_change(base).double() - merged[name]).abs().max() < 1e-4, name
        key = kohya_name(name)
        half = comfyui_patched_weight(base, layer.up, layer.down, layer.alpha, tensors[f"{key}.dora_scale"], 0.5)
        assert rel_err(half - base, 0.5 * layer.weight_change(base)) < 1e-5


def test_peft_dora_adapter_reads_with_adapted_norm_and_refuses_kohya_without_its_base(tmp_path):
    from peft import get_peft_model_state_dict

    model, config = peft_unet(use_dora=True)
    merged = merged_weights(model)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in state)
    lora = read_lora(state, peft_config=config.to_dict())
    for name, module in peft_layers(model).items():
        base = module.base_layer.weight.detach()
        assert lora.layers[name].magnitude_norm == "adapted"
        assert (base.double() + lora.layers[name].weight_change(base).double() - merged[name]).abs().max() < 1e-4
    with pytest.raises(UserError, match="peft DoRA layer") as err:
        write_kohya(lora, tmp_path / "x.safetensors")
    assert "\n" not in str(err.value) and not (tmp_path / "x.safetensors").exists()


def test_dora_resize_is_refused_and_input_axis_dora_scale_is_refused(tmp_path):
    model, config = peft_unet(use_dora=True)
    lora = to_lora(model, config)
    with pytest.raises(UserError, match="DoRA") as err:
        resize(lora, rank=2)
    assert "\n" not in str(err.value)
    path = write_kohya(lora, tmp_path / "dora.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("attn1_to_q.dora_scale"))
    tensors[key] = torch.ones(1, tensors[key].shape[0])  # LyCORIS' default: one value per input channel
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "input_axis.safetensors"))
    with pytest.raises(UserError, match="input-axis DoRA"):
        read_lora(tmp_path / "input_axis.safetensors")


def test_rslora_alpha_in_the_file_gives_peft_scale_everywhere(tmp_path):
    model, config = peft_unet(use_rslora=True)
    layers = peft_layers(model)
    lora = to_lora(model, config)
    path = write_kohya(lora, tmp_path / "rslora.safetensors", dtype=torch.float32)
    back = read_lora(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        alpha = float(f.get_tensor(kohya_name(next(iter(layers))) + ".alpha"))
    assert meta["dreambooth.lora_variant"] == "rslora" and json.loads(meta["ss_network_args"])["rs_lora"] == "True"
    assert alpha == pytest.approx(8 * 4 ** 0.5)  # alpha_file / r == alpha / sqrt(r): the rsLoRA scale in any loader
    for name, module in layers.items():
        assert back.layers[name].scale == pytest.approx(module.scaling["default"]) == pytest.approx(8 / 4 ** 0.5)
        assert rel_err(back.layers[name].delta(torch.float64), module.get_delta_weight("default").double()) < 1e-5


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_diffusers_load_lora_weights_on_variant_files(tmp_path, variant, caplog):
    """rsLoRA: diffusers applies exactly our delta. DoRA: diffusers 0.42's SD1.5 loader drops kohya
    `dora_scale` keys with a warning and applies the plain low-rank part only."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model, config = peft_unet(**{f"use_{variant}": True})
    path = write_kohya(to_lora(model, config), tmp_path / f"{variant}.safetensors", dtype=torch.float32)
    lora = read_lora(path)
    tiny = build_tiny()
    pipe = StableDiffusionPipeline(unet=tiny.unet, vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   scheduler=DDIMScheduler.from_pretrained(FAMILY_CONFIGS["tiny"] / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = tiny.unet.state_dict()
    for name, layer in lora.layers.items():
        key = name.split(".", 1)[1] + ".weight"
        applied = (after[key] - before[key]).double()
        assert rel_err(applied, layer.delta(torch.float64)) < 1e-4, name  # the plain part, in both cases
        if variant == "dora":
            assert rel_err(applied, layer.weight_change(before[key]).double()) > 1e-2  # not DoRA's weight
    if variant == "dora":
        assert "dora_scale" in caplog.text or "DoRA" in caplog.text


# ---------------------------------------------------------------- training each variant on tiny


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training.data import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("dataset")
    prepare_dataset(SUBJECT_PHOTOS, out, PrepareConfig(resolution=64))
    return out


def train_variant(dataset, out, **variant):
    """Two steps on tiny with a model we keep, so the trained peft layers can be compared with the file."""
    from training.train import train
    from training.train_config import TrainConfig

    model = build_tiny()
    cfg = TrainConfig(instance_dir=str(dataset), output=str(out), steps=2, rank=4, alpha=8, seed=3, lr=1e-2,
                      prior_preservation=False, **variant)
    train(cfg, model=model)
    return model, read_lora(out)


def test_dora_trains_and_its_file_patches_to_the_trained_peft_weight(dataset, tmp_path, one_torch_thread):
    model, lora = train_variant(dataset, tmp_path / "dora.safetensors", dora=True)
    layers = peft_layers(model.unet)
    assert set(lora.layers) == set(layers) and lora.metadata["dreambooth.lora_variant"] == "dora"
    merged = merged_weights(model.unet)
    moved = 0
    for name, module in layers.items():
        base = module.base_layer.weight.detach().float()
        layer = lora.layers[name]
        assert layer.magnitude is not None and layer.magnitude_norm == "base"
        patched = comfyui_patched_weight(base, layer.up, layer.down, layer.alpha, layer.magnitude.reshape(-1, 1))
        assert rel_err(patched - base, merged[name] - base.double()) < 2e-3, name  # fp16 file
        moved += float((module.lora_magnitude_vector["default"].weight - base.reshape(base.shape[0], -1).norm(dim=1)).abs().max()) > 0
    assert moved  # the magnitudes trained (and started at |W0|: our seeded re-init left them alone)


def test_rslora_and_loraplus_train_and_record_their_variant(dataset, tmp_path, one_torch_thread):
    model, lora = train_variant(dataset, tmp_path / "rs.safetensors", rslora=True, loraplus_ratio=16.0)
    for name, module in peft_layers(model.unet).items():
        assert lora.layers[name].scale == pytest.approx(module.scaling["default"]) == pytest.approx(8 / 2)
        assert rel_err(lora.layers[name].delta(torch.float64), module.get_delta_weight("default").double()) < 2e-3
    with safe_open(str(tmp_path / "rs.safetensors"), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert lora.metadata["dreambooth.lora_variant"] == "rslora"
    assert args["rs_lora"] == "True" and float(args["loraplus_lr_ratio"]) == 16.0


def test_loraplus_gives_up_weights_ratio_times_the_learning_rate(one_torch_thread):
    from training.trainable import make_optimizer, setup_trainable
    from training.train_config import TrainConfig

    for ratio in (0.0, 16.0):
        cfg = TrainConfig(rank=4, lr=1e-4, loraplus_ratio=ratio, dora=True)
        trainable = setup_trainable(cfg, build_tiny())
        optimizer = make_optimizer(cfg, trainable)
        names = {id(p): n for n, p in trainable.named().items()}
        lrs = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert len(lrs) == len(names)  # every trained parameter, once
        for name, lr in lrs.items():
            fast = ratio > 1 and "lora_B" in name
            assert lr == pytest.approx(1e-4 * (ratio if fast else 1)), name
