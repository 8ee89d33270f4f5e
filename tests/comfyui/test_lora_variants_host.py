"""Issue 14's host check: a DoRA and an rsLoRA file we write load through the core LoraLoader with no
"lora key not loaded" line, and the weights ComfyUI patches equal W0 + our reader's weight change,
on every Linear and Conv2d of the sd15-mini test checkpoint (UNet and text encoder).

The files come from peft-layout state dicts with random factors (what training hands the writer),
through `peft_state_to_lora` and `write_kohya`. The patched weights are read out with the core
CheckpointSave node, which saves the model with its patches applied, under the checkpoint's own keys."""
import math

import pytest
import torch
from host_helpers import CHECKPOINT, ensure_test_inputs, error_message
from safetensors.torch import load_file

from training import ldm_keys
from training.lora import module_table, peft_state_to_lora, read_lora, write_kohya

RANK = 4
NOT_LOADED = "lora key not loaded"
TABLE = module_table("sd15-mini")


def ldm_weight_key(name: str) -> str:
    """The checkpoint key of a canonical module's weight."""
    component, path = name.split(".", 1)
    if component == "unet":
        return f"{ldm_keys.UNET_PREFIX}{TABLE.ldm[name]}.weight"
    return f"{ldm_keys.TEXT_PREFIX}{path}.weight"


def peft_key(name: str) -> str:
    """The module's key in `get_peft_model_state_dict(unet)` / `(text_encoder)`."""
    component, path = name.split(".", 1)
    return path if component == "unet" else f"text_model.{path}"


def random_peft_states(base: dict[str, torch.Tensor], dora: bool, seed: int):
    """peft factors for every module: delta W about 0.2 of each W0 row (scale 1 for the factors as drawn),
    for DoRA a magnitude within 25 % of |W0 + delta W| (peft's norm)."""
    gen = torch.Generator().manual_seed(seed)
    states: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for name, shape in TABLE.shapes.items():
        out_features, fan_in = shape[0], math.prod(shape[1:])
        down = torch.randn(RANK, *shape[1:], generator=gen) / math.sqrt(fan_in)
        up = torch.randn(out_features, RANK, *[1] * (len(shape) - 2), generator=gen) * 0.2 / math.sqrt(RANK)
        key = peft_key(name)
        state = states[name.split(".", 1)[0]]
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        if dora:
            adapted = base[name] + (up.reshape(out_features, RANK) @ down.reshape(RANK, -1)).reshape(shape)
            norm = adapted.reshape(out_features, -1).norm(dim=1)
            spread = 2 * torch.rand(out_features, generator=gen) - 1
            state[f"{key}.lora_magnitude_vector"] = norm * (1 + 0.25 * spread)
    return states


def peft_merged(name: str, states: dict, base: torch.Tensor, scale: float, dora: bool) -> torch.Tensor:
    """peft's merged weight, from the peft factors (not from our reader)."""
    state = states[name.split(".", 1)[0]]
    key, shape = peft_key(name), base.shape
    delta = (state[f"{key}.lora_B.weight"].reshape(shape[0], RANK)
             @ state[f"{key}.lora_A.weight"].reshape(RANK, -1)).reshape(shape) * scale
    adapted = base + delta
    if not dora:
        return adapted
    norm = adapted.reshape(shape[0], -1).norm(dim=1)
    return adapted * (state[f"{key}.lora_magnitude_vector"] / norm).reshape(-1, *[1] * (base.ndim - 1))


@pytest.fixture(scope="module")
def base(comfy_server):
    """W0 of every LoRA-able module of the test checkpoint, float32."""
    ensure_test_inputs(comfy_server)
    checkpoint = load_file(str(comfy_server.base_dir / "models" / "checkpoints" / CHECKPOINT))
    return {name: checkpoint[ldm_weight_key(name)].float() for name in TABLE.shapes}


VARIANTS = {  # name: (peft config, scale peft applies)
    "dora": ({"lora_alpha": float(RANK), "use_dora": True}, 1.0),
    "rslora": ({"lora_alpha": 8.0, "use_rslora": True}, 8.0 / math.sqrt(RANK)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def patched(request, comfy_server, base):
    """(variant, our file read back, peft states, the weights ComfyUI patched, its "not loaded" line count)."""
    variant = request.param
    config, _ = VARIANTS[variant]
    dora = variant == "dora"
    states = random_peft_states(base, dora, seed=len(variant))
    lora = peft_state_to_lora(states["unet"], states["text_encoder"], config, base_weight=base.__getitem__)
    path = write_kohya(lora, comfy_server.base_dir / "models" / "loras" / f"variant_{variant}.safetensors")
    before = comfy_server.log_text().count(NOT_LOADED)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": path.name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CheckpointSave", "inputs": {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2],
                                                         "filename_prefix": f"checkpoints/patched_{variant}"}},
    }
    entry = comfy_server.wait(comfy_server.post_prompt(prompt))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    not_loaded = comfy_server.log_text().count(NOT_LOADED) - before
    saved = sorted((comfy_server.base_dir / "output" / "checkpoints").glob(f"patched_{variant}_*.safetensors"))[-1]
    state = load_file(str(saved))
    weights = {name: state[ldm_weight_key(name)].float() for name in TABLE.shapes}
    saved.unlink()  # hundreds of MB of fp32
    return variant, read_lora(path), states, weights, not_loaded


def assert_fp16_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    """Equal within fp16 precision of the weight: 2e-3 of the layer's largest |value|; the error found."""
    error = float((actual - expected).abs().max())
    bound = 2e-3 * float(expected.abs().max())
    assert error <= bound, f"{name}: max |difference| {error:.3g} > {bound:.3g}"
    return error


def test_the_core_loader_takes_every_key(patched):
    variant, lora, _, _, not_loaded = patched
    assert not_loaded == 0
    assert len(lora.layers) == len(TABLE.shapes), sorted(set(TABLE.shapes) - set(lora.layers))[:5]
    assert lora.metadata["dreambooth.lora_variant"] == variant
    assert all((layer.magnitude is not None) == (variant == "dora") for layer in lora.layers.values())


def test_the_patched_weights_equal_w0_plus_our_weight_change(patched, base):
    variant, lora, _, weights, _ = patched
    kinds, worst = set(), 0.0
    for name, layer in lora.layers.items():
        change = layer.weight_change(base[name])
        assert float(change.abs().max()) > 0.05 * float(base[name].abs().max()), name  # the LoRA changes it
        worst = max(worst, assert_fp16_close(weights[name], base[name] + change, name) / float(change.abs().max()))
        kinds.add(layer.kind)
    assert kinds == {"linear", "conv"}
    print(f"\n{variant}: {len(lora.layers)} layers, host vs W0 + our change: max error {worst:.2g} of max |change|")


def test_the_patched_weights_equal_peft_merged_weights(patched, base):
    variant, _, states, weights, _ = patched
    _, scale = VARIANTS[variant]
    worst = 0.0
    for name in TABLE.shapes:
        expected = peft_merged(name, states, base[name], scale, variant == "dora")
        worst = max(worst, assert_fp16_close(weights[name], expected, name) / float(expected.abs().max()))
    print(f"\n{variant}: host vs peft's merged weight: max error {worst:.2g} of max |W|")
