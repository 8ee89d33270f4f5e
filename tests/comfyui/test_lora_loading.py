"""Issue 5's checks in the real host: a LoRA we write loads through the core LoraLoader with no
"lora key not loaded" line and changes the picture; our loader at rank 0 gives the same picture
as the core LoraLoader, and at rank r the same as the core loader on the file `lora resize` wrote."""
import hashlib

import cli_runner
import numpy as np
import pytest
import torch
from host_helpers import CHECKPOINT, ROOT, ensure_test_inputs, error_message
from PIL import Image

from training.lora import LoraFile, LoraLayer, module_table, write_kohya


@pytest.fixture(scope="module")
def loras(comfy_server):
    """A rank-8 kohya LoRA over every attention linear of the test checkpoint, and its rank-2 resize."""
    ensure_test_inputs(comfy_server)
    folder = comfy_server.base_dir / "models" / "loras"
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, shape in module_table("sd15-mini").shapes.items():
        if name.startswith("unet.") and ".attentions." in name and ".transformer_blocks." in name and len(shape) == 2:
            out_features, in_features = shape
            layers[name] = LoraLayer(torch.randn(8, in_features, generator=gen) * 0.05,
                                     torch.randn(out_features, 8, generator=gen) * 0.05, 8.0)
    trained = write_kohya(LoraFile(layers, family="sd15-mini"), folder / "ours_r8.safetensors")
    resized = folder / "ours_r2.safetensors"
    run = cli_runner.run(["lora", "resize", trained, "--rank", "2", "--out", resized], cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return trained.name, resized.name, len(layers)


_SAMPLED: dict[tuple, np.ndarray] = {}  # (server url, prompt) -> picture: the tests compare some pictures twice


def sample(server, lora_nodes: dict, model_from: tuple[str, int], clip_from: tuple[str, int]) -> np.ndarray:
    """One 64 px picture, 2 steps, fixed seed, through the given LoRA nodes (sampled once per server)."""
    key = (server.url, repr((lora_nodes, model_from, clip_from)))
    if key not in _SAMPLED:
        _SAMPLED[key] = _sample(server, lora_nodes, model_from, clip_from)
    return _SAMPLED[key].copy()


def _sample(server, lora_nodes: dict, model_from: tuple[str, int], clip_from: tuple[str, int]) -> np.ndarray:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        **lora_nodes,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks man", "clip": list(clip_from)}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": list(clip_from)}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": list(model_from), "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0],
                                                    "filename_prefix": hashlib.md5(str(lora_nodes).encode()).hexdigest()}},
    }
    entry = server.wait(server.post_prompt(prompt))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    saved = entry["outputs"]["8"]["images"][0]
    return np.asarray(Image.open(server.base_dir / "output" / saved["subfolder"] / saved["filename"]), dtype=np.int16)


def core(name: str) -> dict:
    return {"2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}


def ours(name: str, rank: int) -> dict:
    return {"2": {"class_type": "DreamBoothLoadSubjectLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": 1.0, "strength_clip": 1.0,
        "rank": rank, "keep_energy": 0.0}}}


def test_core_loader_takes_every_key_and_the_picture_changes(comfy_server, loras):
    trained, _, _ = loras
    before = comfy_server.log_text().count("lora key not loaded")
    plain = sample(comfy_server, {}, ("1", 0), ("1", 1))
    with_lora = sample(comfy_server, core(trained), ("2", 0), ("2", 1))
    assert comfy_server.log_text().count("lora key not loaded") == before
    assert np.abs(with_lora - plain).max() > 0


def test_our_loader_at_rank_0_patches_what_the_core_loader_patches(comfy_server, loras):
    trained, _, count = loras
    assert np.array_equal(sample(comfy_server, core(trained), ("2", 0), ("2", 1)),
                          sample(comfy_server, ours(trained, 0), ("2", 0), ("2", 1)))


def test_our_loader_at_rank_r_equals_the_file_lora_resize_wrote(comfy_server, loras):
    trained, resized, _ = loras
    from_file = sample(comfy_server, core(resized), ("2", 0), ("2", 1))
    at_load = sample(comfy_server, ours(trained, 2), ("2", 0), ("2", 1))
    assert np.abs(from_file - at_load).max() <= 1  # fp16 factors in the file, fp32 in memory: one level at most
    assert np.abs(at_load - sample(comfy_server, ours(trained, 0), ("2", 0), ("2", 1))).max() > 0
