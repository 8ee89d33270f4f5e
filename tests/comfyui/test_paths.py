"""Which folders a server may read (nodes/host.py typed_folder): Prepare Subject Dataset's `folder` and
Subject Fidelity's `dino_folder` are names under ComfyUI's input/ and models/dino; an absolute path or a
`..` escape is read only when the server listens on loopback (or with DREAMBOOTH_ALLOW_ANY_PATH=1).

One extra server here listens on 0.0.0.0 (requests still go to 127.0.0.1); the session's loopback
server shows that today's behaviour stays there.
"""
from __future__ import annotations

import shutil

import pytest
from conftest import new_server
from host_helpers import SUBJECT_PHOTOS, error_message

ENV = "DREAMBOOTH_ALLOW_ANY_PATH"


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def prepare_prompt(folder: str) -> dict:
    return {"1": node("DreamBoothPrepareSubjectDataset", folder=folder, token="sks", class_word="man", resolution=64,
                      crop="center", flip=False),
            "2": node("PreviewAny", source=["1", 2])}


def fidelity_prompt(dino_folder: str) -> dict:
    return {**prepare_prompt("subject"),
            "3": node("EmptyImage", width=64, height=64, batch_size=1, color=0),
            "4": node("DreamBoothSubjectFidelity", images=["3", 0], dataset=["1", 0], row_labels="",
                      face_detector="hog", dino_folder=dino_folder)}


def photos_into(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(SUBJECT_PHOTOS.glob("*.jpg"))[:3]:
        shutil.copy2(path, folder / path.name)


def outcome(server, prompt: dict) -> tuple[str, str | None]:
    entry = server.wait(server.post_prompt(prompt), timeout=300)
    return entry["status"]["status_str"], error_message(entry)


def datasets(server) -> list[str]:
    folder = server.base_dir / "output" / "dreambooth" / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def public_server(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv(ENV, raising=False)
    server = new_server(tmp_path_factory.mktemp("comfyui_public"), listen="0.0.0.0")
    photos_into(server.base_dir / "input" / "subject")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A photo folder outside every ComfyUI folder, and a DINO-looking folder beside it."""
    root = tmp_path_factory.mktemp("outside")
    photos_into(root / "photos")
    (root / "dino").mkdir()
    (root / "dino" / "config.json").write_text('{"model_type": "vit"}')
    return root


def test_a_public_server_refuses_photo_folders_outside_input(public_server, outside):
    escape = "../" * 12 + str(outside / "photos").lstrip("/")
    for folder in (str(outside / "photos"), escape, str(outside / "no_such_folder")):
        status, message = outcome(public_server, prepare_prompt(folder))
        assert status == "error", folder
        assert "outside ComfyUI's input folder" in message and f"{ENV}=1" in message, message
        assert "0.0.0.0" in message and message.rstrip("\n").count("\n") == 0, message
    assert datasets(public_server) == [], "a refused folder was prepared"


def test_a_public_server_reads_photo_folders_under_input(public_server):
    status, message = outcome(public_server, prepare_prompt("subject"))
    assert status == "success", message
    assert len(datasets(public_server)) == 1


def test_a_public_server_refuses_dino_folders_outside_models(public_server, outside):
    for dino in (str(outside / "dino"), "../../../" + str(outside / "dino").lstrip("/"), "../checkpoints"):
        status, message = outcome(public_server, fidelity_prompt(dino))
        assert status == "error", dino
        assert "dino_folder" in message and "outside models/dino" in message and f"{ENV}=1" in message, message


def test_a_public_server_reads_dino_folders_by_name_under_models_dino(public_server):
    folder = public_server.base_dir / "models" / "dino" / "not_a_model"
    folder.mkdir(parents=True)
    status, message = outcome(public_server, fidelity_prompt("not_a_model"))
    assert status == "success", message  # found and tried: DINO is reported "not available", with the reason


def test_a_loopback_server_still_reads_absolute_folders(comfy_server, outside):
    if not (comfy_server.base_dir / "input" / "subject").is_dir():
        photos_into(comfy_server.base_dir / "input" / "subject")
    before = set(datasets(comfy_server))
    status, message = outcome(comfy_server, prepare_prompt(str(outside / "photos")))
    assert status == "success", message
    assert len(set(datasets(comfy_server)) - before) == 1
    status, message = outcome(comfy_server, fidelity_prompt(str(outside / "dino")))
    # the folder is read: it has no model.safetensors, which the DINO loader says
    assert status == "error" and "DINO folder" in message and "model.safetensors" in message, message
