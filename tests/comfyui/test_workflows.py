"""The example workflows: UI files well formed, API twins equal to the frontend's conversion,
and the twins run in the real host on a small random SD1.5-layout checkpoint."""
import json
import time

import pytest
from host_helpers import (CHECKPOINT, EXAMPLES, WebSocket, ensure_test_inputs, error_message, load_workflow, nodes_of,
                          post, small_prompt)
from ui_to_api import VIRTUAL_TYPES, convert, widget_names

CANCEL_STEPS = 8
MINI_ATTENTION_LAYERS = 32  # 4 transformer blocks x (attn1, attn2) x (q, k, v, out)


def lora_package_reads_the_test_layout() -> bool:
    """training/lora/ knows the sd15-mini layout of the test checkpoint (see the report)."""
    from training.lora import module_table

    try:
        module_table("sd15-mini")
    except Exception:  # noqa: BLE001 - any failure means: not known
        return False
    return True


@pytest.fixture(scope="module")
def server(comfy_server):
    ensure_test_inputs(comfy_server)
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def run(server, prompt: dict, timeout: float = 400) -> dict:
    entry = server.wait(server.post_prompt(prompt), timeout=timeout)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return entry


def text_of(entry: dict, node_id: str) -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


# ---------------------------------------------------------------- the files


@pytest.mark.parametrize("name", EXAMPLES)
def test_api_twin_is_what_the_frontend_queues(name, object_info):
    assert load_workflow(name, api=True) == convert(load_workflow(name), object_info)


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_file_is_consistent(name, object_info):
    """Links agree with both ends, socket types with the node types, widget counts with INPUT_TYPES."""
    workflow = load_workflow(name)
    assert workflow["version"] == 0.4
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == max(l[0] for l in workflow["links"])
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        output = nodes[origin]["outputs"][slot]
        assert link_id in output["links"] and output["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        info = object_info[nodes[origin]["type"]]
        assert info["output"][slot] == kind
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_TYPES:
            continue
        info = object_info[node["type"]]
        expected = sum(2 if control else 1 for _, control in widget_names(info))
        assert len(node["widgets_values"]) == expected, node["type"]
        declared = {**info["input"]["required"], **info["input"].get("optional", {})}
        for slot in node["inputs"]:
            assert slot["name"] in declared, (node["type"], slot["name"])
        for slot in node["outputs"]:
            for link_id in slot["links"] or []:
                assert any(l[0] == link_id and l[1] == node["id"] for l in workflow["links"])


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_defaults_are_real_use_values(name):
    api = load_workflow(name, api=True)
    for node in api.values():
        inputs = node["inputs"]
        for key in ("ckpt_name", "checkpoint", "base_checkpoint"):
            if isinstance(inputs.get(key), str):
                assert inputs[key] == "v1-5-pruned-emaonly.safetensors"
        if node["class_type"] == "DreamBoothPrepareSubjectDataset":
            assert inputs["folder"] == "subject" and inputs["resolution"] == 512
        if node["class_type"] == "DreamBoothTrainSubject":
            assert inputs["steps"] == {"lora": 800, "dreambooth": 400}[inputs["method"]]
        if node["class_type"] == "EmptyLatentImage":
            assert inputs["width"] == inputs["height"] == 512


# ---------------------------------------------------------------- running them


def test_three_scene_lora_runs_and_is_not_trained_again(server):
    api = load_workflow("three_scene_lora", api=True)
    prompt = small_prompt(api)
    train_id = nodes_of(api, "DreamBoothTrainSubject")[0]
    entry = run(server, prompt)
    report = text_of(entry, train_id)
    assert report.startswith("Trained LoRA"), report
    lora = server.base_dir / "models" / "loras" / "subject_lora.safetensors"
    written = lora.stat().st_mtime_ns
    assert "lora key not loaded" not in server.log_text()
    info = text_of(entry, nodes_of(api, "DreamBoothLoadSubjectLoRA")[0])
    assert "trained rank 16" in info and "trigger: sks man" in info, info
    if lora_package_reads_the_test_layout():  # every attention layer of the test UNet was trained and applied
        assert f"{MINI_ATTENTION_LAYERS} layers" in info, info
    saved = entry["outputs"][nodes_of(api, "SaveImage")[0]]["images"]
    assert len(saved) == 1 and (server.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]).is_file()
    run_dir = server.base_dir / "output" / "dreambooth" / "runs" / "subject_lora"
    assert (run_dir / "loss.png").is_file() and not list((server.base_dir / "models").rglob("step_*"))

    # The same graph again: nothing runs (ComfyUI's cache; Train Subject's IS_CHANGED is unchanged).
    again = run(server, prompt)
    cached = next(data["nodes"] for event, data in again["status"]["messages"] if event == "execution_cached")
    assert train_id in cached
    # Train Subject alone with a setting that does not change the weights: it runs, the trainer reuses the file.
    alone = {node_id: prompt[node_id] for node_id in nodes_of(api, "DreamBoothPrepareSubjectDataset")
             + nodes_of(api, "DreamBoothClassImages") + [train_id]}
    alone[train_id]["inputs"]["validation_every"] = 1000
    report = text_of(run(server, alone), train_id)
    assert report.startswith("Reused"), report
    assert lora.stat().st_mtime_ns == written


def test_three_scene_dreambooth_runs(server):
    api = load_workflow("three_scene_dreambooth", api=True)
    entry = run(server, small_prompt(api))
    assert text_of(entry, nodes_of(api, "DreamBoothTrainSubject")[0]).startswith("Trained DreamBooth")
    assert (server.base_dir / "models" / "checkpoints" / "subject_dreambooth.safetensors").is_file()
    fidelity = text_of(entry, nodes_of(api, "DreamBoothSubjectFidelity")[0])
    assert "dreambooth" in fidelity and "mountains" in fidelity


def test_rank_sweep_runs(server):
    if not lora_package_reads_the_test_layout():
        pytest.skip("training/lora/ cannot extract from the sd15-mini test checkpoint "
                    "(module_table('sd15-mini') fails)")
    api = load_workflow("rank_sweep", api=True)
    prompt = small_prompt(api)
    scenes = nodes_of(api, "DreamBoothScenePrompts")[0]
    prompt[scenes]["inputs"]["scenes"] = "forest: {token} {class} in a forest\ndesert: {token} {class} in a desert"
    entry = run(server, prompt)  # DreamBooth is reused from the three-scene test when it ran first
    assert "lora key not loaded" not in server.log_text()
    saved = entry["outputs"][nodes_of(api, "SaveImage")[0]]["images"][0]
    from PIL import Image

    with Image.open(server.base_dir / "output" / saved["subfolder"] / saved["filename"]) as grid:
        # six models (rows: dreambooth, extracted r64/r16/r4, lora r4, lora r4 pivotal) below the labels
        assert 6 * 64 <= grid.height < 7 * 64 and grid.width >= 2 * 64
    fidelity = text_of(entry, nodes_of(api, "DreamBoothSubjectFidelity")[0])
    assert all(word in fidelity for word in ("dreambooth", "extracted", "lora", "pivotal", "desert"))
    assert "mountains" not in fidelity  # the two scenes given here, not the default three
    infos = [text_of(entry, node_id) for node_id in nodes_of(api, "DreamBoothLoadSubjectLoRA")]
    assert sum("used rank 4;" in info for info in infos) == 1 and any("used rank 16;" in i for i in infos)
    assert (server.base_dir / "models" / "loras" / "subject_dreambooth_r64.safetensors").is_file()


def test_cancel_keeps_a_checkpoint_and_the_next_queue_resumes(server):
    """POST /interrupt while Train Subject runs: the trainer saves a checkpoint; queueing again resumes."""
    api = load_workflow("three_scene_lora", api=True)
    prep, train = nodes_of(api, "DreamBoothPrepareSubjectDataset")[0], nodes_of(api, "DreamBoothTrainSubject")[0]
    prompt = {node_id: small_prompt(api)[node_id] for node_id in (prep, train)}
    prompt[train]["inputs"].update(steps=CANCEL_STEPS, output_name="cancel_test", prior_loss_weight=1.0)
    del prompt[train]["inputs"]["class_images"]
    run_dir = server.base_dir / "output" / "dreambooth" / "runs" / "cancel_test"
    socket = WebSocket(server.url, "pytest")
    try:
        prompt_id = server.post_prompt(prompt)
        step = 0
        deadline = time.monotonic() + 300
        while step < 2 and time.monotonic() < deadline:
            message = socket.receive()
            if message and message["type"] == "dreambooth.train.progress":
                data = message["data"]
                assert data["node"] == train and data["total"] == CANCEL_STEPS and data["loss"] is not None
                step = data["step"]
        post(server, "/interrupt")
    finally:
        socket.close()
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(event == "execution_interrupted" for event, _ in entry["status"]["messages"])
    saved = sorted((run_dir / "checkpoints").glob("step_*.safetensors"))
    assert saved, f"no checkpoint in {run_dir}"
    stopped_at = int(saved[-1].stem.split("_")[1])
    assert 2 <= stopped_at < CANCEL_STEPS

    entry = run(server, prompt)
    report = text_of(entry, train)
    assert f"Resumed from step {stopped_at}" in report, report
    assert f"{CANCEL_STEPS} steps" in report
    assert json.loads((run_dir / "loss.jsonl").read_text().splitlines()[-1])["step"] == CANCEL_STEPS
    assert CHECKPOINT in report
