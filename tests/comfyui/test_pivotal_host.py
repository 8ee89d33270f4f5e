"""Pivotal tuning in the real host (issue 13): Train Subject writes a LoRA that bundles the learned embedding
and the standalone embedding file; after Load Subject LoRA the plain trigger word reads the learned vectors
in any CLIPTextEncode through the CLIP it returns (equal to `embedding:<file>`), other prompts and other CLIPs
in the graph are unchanged; the core LoraLoader applies the LoRA weights and logs no "lora key not loaded".

Runs on the session server, as its own LoRA "pivotal_lora" (the three-scene test writes "subject_lora" there).
Conditioning is read out by a test-only node (save_conditioning.py, which conftest puts in every test server's
custom_nodes)."""
import numpy as np
import pytest
import torch
from host_helpers import CHECKPOINT, ensure_test_inputs, error_message, load_workflow, nodes_of, small_prompt
from PIL import Image
from safetensors.torch import load_file

OUTPUT_NAME = "pivotal_lora"
LORA = f"{OUTPUT_NAME}.safetensors"
EMBEDDING = f"{OUTPUT_NAME}_embedding"  # Train Subject's standalone file in models/embeddings
NOT_LOADED = "lora key not loaded"


@pytest.fixture(scope="module")
def server(comfy_server):
    ensure_test_inputs(comfy_server)
    return comfy_server


def run(server, prompt: dict, timeout: float = 900) -> dict:
    entry = server.wait(server.post_prompt(prompt), timeout=timeout)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return entry


@pytest.fixture(scope="module")
def trained(server):
    """The three-scene LoRA example with pivotal_tokens 2, end to end (small): trains, loads, draws, scores;
    and the server's log from this run on."""
    api = load_workflow("three_scene_lora", api=True)
    train = nodes_of(api, "DreamBoothTrainSubject")[0]
    log_before = server.log_text()
    # lr 1e-3: three Adam steps move the LoRA far enough to change a 64 px picture (the core-loader check)
    entry = run(server, small_prompt(api, **{train: {"pivotal_tokens": 2, "learning_rate": 1e-3,
                                                     "output_name": OUTPUT_NAME}}))
    return api, entry, log_before


def test_the_pivotal_example_runs_and_writes_both_files(server, trained):
    api, entry, log_before = trained
    lora = server.base_dir / "models" / "loras" / LORA
    embedding = server.base_dir / "models" / "embeddings" / f"{EMBEDDING}.safetensors"
    bundled = {k: v for k, v in load_file(str(lora)).items() if k.startswith("bundle_emb.")}
    assert list(bundled) == ["bundle_emb.sks.string_to_param.*"] and bundled[next(iter(bundled))].shape == (2, 768)
    assert torch.equal(load_file(str(embedding))["emb_params"], next(iter(bundled.values())))
    loader = nodes_of(api, "DreamBoothLoadSubjectLoRA")[0]
    info = "\n".join(entry["outputs"][loader]["text"])
    assert "learned embedding: sks (2 vectors of 768" in info, info
    assert NOT_LOADED not in server.log_text()[len(log_before):]
    print(f"\nLoad Subject LoRA info:\n{info}")


def encode(texts: dict[str, tuple[str, list]], lora_node: dict | None = None) -> dict:
    """A graph: the test checkpoint, optionally node "2", one CLIPTextEncode + save per (name: text, clip)."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}
    if lora_node:
        prompt["2"] = lora_node
    for i, (name, (text, clip)) in enumerate(texts.items()):
        prompt[f"e{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}
        prompt[f"s{i}"] = {"class_type": "TestSaveConditioning", "inputs": {"conditioning": [f"e{i}", 0], "name": name}}
    return prompt


def subject_lora(lora_name: str = LORA) -> dict:
    return {"class_type": "DreamBoothLoadSubjectLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0,
        "rank": 0, "keep_energy": 0.0}}


def read(server, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(server.base_dir / "output" / f"{name}.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_trigger_word_reads_the_learned_vectors_only_through_the_loaders_clip(server, trained):
    base, lora = ["1", 1], ["2", 1]
    # Before any Load Subject LoRA ran in this graph's CLIP: the base encodings (spaces differ only to miss the
    # host's cache of an equal node; CLIP's tokenizer collapses whitespace)
    run(server, encode({"base_sks": ("a  photo of sks man", base), "base_plain": ("a  photo of a man", base)}))
    run(server, encode({
        "lora_sks": ("a photo of sks man", lora),
        "lora_file": (f"a photo of embedding:{EMBEDDING} man", lora),
        "lora_plain": ("a photo of a man", lora),
        "lora_weighted": ("a photo of (sks:1.2), man", lora),
        "same_graph_base_sks": ("a photo of sks man", base),
    }, subject_lora()))
    # after the loader's node ran (cached now): the base CLIP again, fresh
    run(server, encode({"after_base_sks": ("a photo of sks   man", base)}, subject_lora()))
    lora_sks = read(server, "lora_sks")
    assert not same(lora_sks, read(server, "base_sks"))
    assert same(lora_sks, read(server, "lora_file"))
    assert same(read(server, "lora_plain"), read(server, "base_plain"))
    assert same(read(server, "same_graph_base_sks"), read(server, "base_sks"))
    assert same(read(server, "after_base_sks"), read(server, "base_sks"))
    assert not same(read(server, "lora_weighted"), lora_sks)  # the host's (word:weight) syntax still applies
    diff = (lora_sks["cond"] - read(server, "base_sks")["cond"]).abs().max().item()
    print(f"\nmax |cond(sks, Load Subject LoRA) - cond(sks, base CLIP)| = {diff:.4f}")


def sample(server, lora_nodes: dict, model: list, clip: list, prefix: str) -> np.ndarray:
    """One 64 px picture, 2 steps, fixed seed."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        **lora_nodes,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    saved = run(server, prompt)["outputs"]["8"]["images"][0]
    return np.asarray(Image.open(server.base_dir / "output" / saved["subfolder"] / saved["filename"]), dtype=np.int16)


def test_the_core_lora_loader_applies_the_weights_and_reports_no_unloaded_key(server, trained):
    log_before = server.log_text()
    core = {"2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}}
    with_core = sample(server, core, ["2", 0], ["2", 1], "core")
    with_ours = sample(server, {"2": subject_lora()}, ["2", 0], ["2", 1], "ours")
    plain = sample(server, {}, ["1", 0], ["1", 1], "plain")
    new_log = server.log_text()[len(log_before):]
    assert NOT_LOADED not in new_log, new_log[-3000:]
    assert new_log.count("This LoRA bundles a learned embedding for 'sks'") == 1, new_log[-3000:]
    assert np.array_equal(with_core, with_ours)  # no trigger word in the prompt: the same patched UNet
    assert np.abs(with_core - plain).max() > 0
