"""The ComfyUI server killed (SIGKILL) while Train Subject runs: another server on the same folders, queued
the same graph, resumes from the last checkpoint and writes the LoRA an uninterrupted run writes, tensor for
tensor; nothing half-written is left in models/ or output/.

The killed server runs on the session server's folders (its own database and temp folder), so the session
server, which lists LoRAs and reads checkpoints from disk per prompt, is the one that resumes."""
from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import new_server
from host_helpers import ensure_test_inputs, error_message, load_workflow, nodes_of, small_prompt

STEPS = 4  # save_every 1: checkpoints at steps 1..3; the kill lands after the first


def train_prompt(output_name: str) -> tuple[dict, str]:
    api = load_workflow("three_scene_lora", api=True)
    prep, train = nodes_of(api, "DreamBoothPrepareSubjectDataset")[0], nodes_of(api, "DreamBoothTrainSubject")[0]
    prompt = {node_id: small_prompt(api)[node_id] for node_id in (prep, train)}
    prompt[train]["inputs"].update(steps=STEPS, save_every=1, rank=4, output_name=output_name, validation_every=0)
    del prompt[train]["inputs"]["class_images"]
    return prompt, train


def finished(server, prompt: dict, train: str) -> str:
    entry = server.wait(server.post_prompt(prompt), timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return "\n".join(entry["outputs"][train]["text"])


def half_written(base) -> list[str]:
    """Temp files, and .safetensors files that do not open, under models/ and output/."""
    from safetensors import safe_open

    bad = []
    for folder in (base / "models", base / "output"):
        for path in folder.rglob("*"):
            if path.is_file() and (".tmp" in path.name or path.name.endswith(".partial")):
                bad.append(str(path))
            elif path.suffix == ".safetensors" and path.stat().st_size < 2**30:
                try:
                    with safe_open(str(path), "pt") as f:
                        list(f.keys())
                except Exception as exc:  # noqa: BLE001 - any failure is a damaged file
                    bad.append(f"{path} ({exc})")
    return bad


def test_a_killed_server_resumes_and_matches_an_uninterrupted_run(tmp_path_factory, comfy_server):
    from safetensors.torch import load_file

    ensure_test_inputs(comfy_server)
    first = new_server(tmp_path_factory.mktemp("crash_first"), base_dir=comfy_server.base_dir)
    prompt, train = train_prompt("crash_test")
    base = first.base_dir
    checkpoints = base / "output" / "dreambooth" / "runs" / "crash_test" / "checkpoints"
    lora = base / "models" / "loras" / "crash_test.safetensors"
    first.start()
    try:
        first.post_prompt(prompt)
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("step_*.safetensors")) and time.monotonic() < deadline:
            assert first.process.poll() is None, first.log_tail()
            time.sleep(0.1)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
    finally:
        first.stop()
    saved = sorted(int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.safetensors"))
    assert saved, f"no checkpoint within 600 s:\n{first.log_tail()}"
    assert not lora.exists() and saved[-1] < STEPS, "training finished before the kill; raise STEPS"

    second = comfy_server  # on the same folders, started before the kill
    report = finished(second, prompt, train)
    assert f"Resumed from step {saved[-1]}" in report, report
    reference_prompt, _ = train_prompt("crash_reference")
    reference_report = finished(second, reference_prompt, train)
    assert "Resumed" not in reference_report, reference_report
    resumed, reference = load_file(lora), load_file(base / "models" / "loras" / "crash_reference.safetensors")
    assert resumed.keys() == reference.keys()
    different = [key for key in resumed if not resumed[key].equal(reference[key])]
    assert different == [], f"{len(different)} of {len(resumed)} tensors differ, e.g. {different[:3]}"
    assert half_written(base) == []
