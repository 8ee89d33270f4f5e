"""The pack's nodes in the real host: how they are listed, and their refusals of bad input."""
import shutil

import pytest
import torch
from host_helpers import CHECKPOINT, ensure_test_inputs, error_message, post_prompt_raw
from safetensors.torch import save_file

PACK_IDS = {
    "DreamBoothPrepareSubjectDataset", "DreamBoothClassImages", "DreamBoothTrainSubject", "DreamBoothLoadSubjectLoRA",
    "DreamBoothLoadSubjectCheckpoint", "DreamBoothExtractSubjectLoRA", "DreamBoothScenePrompts",
    "DreamBoothSubjectGrid", "DreamBoothSubjectFidelity",
}
# The first transformer block of the SD1.5 UNet (320 wide): the test checkpoint has it too.
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_every_node_is_described_and_every_input_has_a_tooltip(object_info):
    ours = {node_id: info for node_id, info in object_info.items() if node_id in PACK_IDS}
    assert set(ours) == PACK_IDS
    for node_id, info in ours.items():
        assert info["category"] == "DreamBooth", node_id
        assert len(info["description"]) > 40, node_id
        assert info["display_name"] and not info["display_name"].startswith("DreamBooth"), node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(info.get("output_tooltips") or []) == len(info["output"]), node_id


def test_seed_inputs_are_not_randomized_by_the_page(object_info):
    """The page would add 'randomize' to an INT named seed: training would then never be reused."""
    for node_id in ("DreamBoothTrainSubject", "DreamBoothClassImages"):
        assert object_info[node_id]["input"]["required"]["seed"][1]["control_after_generate"] is False


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a:b", "what?", "CON", "trailing."])
def test_train_refuses_a_bad_output_name_when_queued(comfy_server, name):
    prompt = {
        "1": {"class_type": "DreamBoothPrepareSubjectDataset", "inputs": {
            "folder": "subject", "token": "sks", "class_word": "man", "resolution": 64, "crop": "center",
            "flip": False}},
        "2": {"class_type": "DreamBoothTrainSubject", "inputs": {
            "checkpoint": "x", "dataset": ["1", 0], "method": "lora", "rank": 4, "alpha": 0.0, "learning_rate": 0.0,
            "lr_scheduler": "constant", "optimizer": "adamw", "steps": 1, "batch_size": 1, "train_text_encoder": False,
            "prior_loss_weight": 1.0, "seed": 0, "precision": "auto", "gradient_checkpointing": False,
            "output_name": name, "validation_every": 0, "overwrite": False}},
    }
    status, answer = post_prompt_raw(comfy_server, prompt)
    assert status == 400
    errors = answer["node_errors"]["2"]["errors"]
    messages = [e["details"] for e in errors if e["type"] == "custom_validation_failed"]
    assert messages and messages[0].startswith("output_name")
    assert "\n" not in messages[0]


def _lora_prompt(lora_name: str, rank: int = 0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "DreamBoothLoadSubjectLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0,
            "strength_clip": 1.0, "rank": rank, "keep_energy": 0.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


def _write_lora(path, modules: dict[str, tuple[int, int]], rank: int, keys: str = "peft") -> None:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for module, (out_features, in_features) in modules.items():
        down = torch.randn(rank, in_features, generator=gen) * 0.01
        up = torch.randn(out_features, rank, generator=gen) * 0.01
        if keys == "peft":
            state[f"unet.{module}.lora_A.weight"], state[f"unet.{module}.lora_B.weight"] = down, up
        else:
            name = "lora_unet_" + module.replace(".", "_")
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
    save_file(state, str(path))


def test_load_subject_lora_reads_peft_keys_resizes_and_applies_every_layer(comfy_server):
    ensure_test_inputs(comfy_server)
    modules = {f"{BLOCK}.attn1.to_q": (320, 320), f"{BLOCK}.attn2.to_k": (320, 768)}
    _write_lora(comfy_server.base_dir / "models" / "loras" / "peft_keys.safetensors", modules, rank=8)
    before = comfy_server.log_text().count("lora key not loaded")
    entry = comfy_server.wait(comfy_server.post_prompt(_lora_prompt("peft_keys.safetensors", rank=2)))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    info = "\n".join(entry["outputs"]["3"]["text"])
    assert "trained rank 8" in info and "used rank 2" in info
    assert comfy_server.log_text().count("lora key not loaded") == before


def test_load_subject_lora_refuses_layers_comfyui_would_not_load(comfy_server):
    """A LoRA for the full SD1.5 UNet on the smaller test checkpoint: its 640-wide layers have no
    place there, which must be an error naming them, not "lora key not loaded" lines."""
    ensure_test_inputs(comfy_server)
    modules = {f"{BLOCK}.attn1.to_q": (320, 320),
               "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)}
    _write_lora(comfy_server.base_dir / "models" / "loras" / "other_base.safetensors", modules, rank=4, keys="kohya")
    entry = comfy_server.wait(comfy_server.post_prompt(_lora_prompt("other_base.safetensors")))
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in message, message
    assert message.count("\n") <= 1  # one line (ComfyUI appends a newline)


def test_a_missing_photo_folder_is_one_line(comfy_server):
    prompt = {
        "1": {"class_type": "DreamBoothPrepareSubjectDataset", "inputs": {
            "folder": "no_such_folder", "token": "sks", "class_word": "man", "resolution": 64, "crop": "center",
            "flip": False}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    }
    entry = comfy_server.wait(comfy_server.post_prompt(prompt))
    message = error_message(entry)
    assert "no_such_folder" in message and "does not exist" in message
    assert message.rstrip("\n").count("\n") == 0


def test_prepare_and_class_images_take_image_batches(comfy_server):
    """Photos from Load Image instead of a folder; class images made by other nodes instead of generated."""
    ensure_test_inputs(comfy_server)
    photo = next((comfy_server.base_dir / "input" / "subject").glob("*.jpg"))
    shutil.copy2(photo, comfy_server.base_dir / "input" / photo.name)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo.name}},
        "2": {"class_type": "DreamBoothPrepareSubjectDataset", "inputs": {
            "folder": "", "token": "sks", "class_word": "man", "resolution": 64, "crop": "center", "flip": True,
            "images": ["1", 0]}},
        "3": {"class_type": "DreamBoothClassImages", "inputs": {
            "checkpoint": CHECKPOINT, "class_word": "man", "class_prompt": "a photo of a {class}",
            "negative_prompt": "", "count": 5, "seed": 0, "resolution": 64, "steps": 1, "images": ["1", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    entry = comfy_server.wait(comfy_server.post_prompt(prompt))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    report = "\n".join(entry["outputs"]["4"]["text"])
    assert "a batch of 1 images" in report and "flip=on" in report
    assert len(entry["outputs"]["6"]["images"]) == 1  # the crop; its mirror copy is for training only
    assert len(entry["outputs"]["5"]["images"]) == 1  # the given image, nothing generated
    made = list((comfy_server.base_dir / "output" / "dreambooth" / "class_images").glob("from_images_*/class_*.png"))
    assert len(made) == 1
