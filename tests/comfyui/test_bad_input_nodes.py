"""The bad-input matrix of the nodes (issue 8), in the real host; the CLI half is tests/test_bad_input.py.

Every case queues one API prompt and must end in one of two ways:

- the node fails while the prompt runs: the prompt's status is "error", the error is on the
  case's node, it is our NodeError (a user mistake, not a programming error), and its message is
  one line that names the input and says what to do, with no traceback text;
- ComfyUI's own validation refuses the prompt (400) before anything runs: a widget's min, or our
  VALIDATE_INPUTS (whose text must then read like the above).

Then the server still answers, every file that was in models/, input/ and output/ before the
prompt is unchanged, no *.tmp and no new .safetensors is left, and no planted pickle was ever
unpickled. A case is `Case(id, node, build, names)`: `build(server)` writes the case's inputs
under the server's folders (removed again after the case) and returns the prompt. A case that
still fails is marked xfail(strict=True), its reason naming the file and function to change.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from host_helpers import CHECKPOINT, SUBJECT_PHOTOS, ensure_test_inputs, post_prompt_raw
from test_bad_input import (BAD_HEADER, HEIC, INSTRUCTION, SDXL_KEY, half_jpeg, hf_folder_with_only_bin, png_bomb,
                            write_base_stub, write_lora, write_pickle)

PHOTO = sorted(SUBJECT_PHOTOS.glob("*.jpg"))[0]
BIG = 16 * 2**20  # files above this (the test checkpoint) are compared by size and mtime, not hashed
CASE_FOLDERS = ("models/checkpoints", "models/loras", "models/clip_vision", "input")


# ---------------------------------------------------------------- prompts (API format)


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def prepare_node(folder: str = "subject", **inputs) -> dict:
    return node("DreamBoothPrepareSubjectDataset", **{"folder": folder, "token": "sks", "class_word": "man",
                                                      "resolution": 64, "crop": "center", "flip": False} | inputs)


def prepare_prompt(folder: str = "subject", **inputs) -> dict:
    return {"1": prepare_node(folder, **inputs), "2": node("PreviewAny", source=["1", 2])}


TRAIN = {"checkpoint": CHECKPOINT, "dataset": ["1", 0], "method": "lora", "rank": 4, "alpha": 0.0,
         "learning_rate": 0.0, "lr_scheduler": "constant", "optimizer": "adamw", "steps": 1, "batch_size": 1,
         "train_text_encoder": False, "prior_loss_weight": 1.0, "seed": 0, "precision": "auto",
         "gradient_checkpointing": False, "output_name": "bad_input_case", "validation_every": 0, "overwrite": False}


def train_prompt(folder: str = "subject", **inputs) -> dict:
    return {"1": prepare_node(folder), "2": node("DreamBoothTrainSubject", **TRAIN | inputs)}


def class_images_prompt(**inputs) -> dict:
    return {"1": node("DreamBoothClassImages", **{"checkpoint": CHECKPOINT, "class_word": "man",
                                                  "class_prompt": "a photo of a {class}", "negative_prompt": "",
                                                  "count": 1, "seed": 0, "resolution": 64, "steps": 1} | inputs),
            "2": node("PreviewImage", images=["1", 1])}


def lora_prompt(lora_name: str, rank: int = 0, lora_file: str | None = None) -> dict:
    prompt = {"1": node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
              "2": node("DreamBoothLoadSubjectLoRA", model=["1", 0], clip=["1", 1], lora_name=lora_name,
                        strength_model=1.0, strength_clip=1.0, rank=rank, keep_energy=0.0),
              "3": node("PreviewAny", source=["2", 2])}
    if lora_file is not None:
        prompt["4"] = node("PrimitiveString", value=lora_file)
        prompt["2"]["inputs"]["lora_file"] = ["4", 0]
    return prompt


def checkpoint_prompt(name: str) -> dict:
    return {"1": node("PrimitiveString", value=name), "2": node("DreamBoothLoadSubjectCheckpoint", ckpt_name=["1", 0]),
            "3": node("PreviewAny", source=["2", 0])}


def extract_prompt(base: str, tuned: str, output_name: str = "") -> dict:
    return {"1": node("PrimitiveString", value=tuned),
            "2": node("DreamBoothExtractSubjectLoRA", base_checkpoint=base, tuned_checkpoint=["1", 0], rank=2,
                      output_name=output_name),
            "3": node("PreviewAny", source=["2", 1])}


def scenes_prompt(scenes: str) -> dict:
    return {"1": node("DreamBoothScenePrompts", token="sks", class_word="man", scenes=scenes, negative="blurry"),
            "2": node("PreviewAny", source=["1", 0])}


def fidelity_prompt(folder: str = "subject", **inputs) -> dict:
    return {"1": prepare_node(folder), "2": node("EmptyImage", width=64, height=64, batch_size=1, color=0),
            "3": node("DreamBoothSubjectFidelity", **{"images": ["2", 0], "dataset": ["1", 0], "row_labels": "",
                                                      "face_detector": "hog"} | inputs)}


# ---------------------------------------------------------------- inputs


def models(server, kind: str) -> Path:
    folder = server.base_dir / "models" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def written(path: Path, data: bytes) -> str:
    """Write `data` to `path`; the file's name (what a combo lists)."""
    path.write_bytes(data)
    return path.name


def photo_folder(server, name: str, files: dict[str, Callable[[Path], object]]) -> str:
    """input/<name> holding one file per entry, each made by its function; the folder's name."""
    folder = server.base_dir / "input" / name
    folder.mkdir()
    for file_name, make in files.items():
        make(folder / file_name)
    return name


def copy_photo(path: Path) -> None:
    shutil.copy(PHOTO, path)


def truncated_stub(path: Path) -> str:
    data = Path(write_base_stub(path)).read_bytes()
    return written(path, data[: len(data) // 2])


def run_ok(server, prompt: dict) -> None:
    entry = server.wait(server.post_prompt(prompt), timeout=120)
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def damaged_reference(server, name: str, damage: Callable[[Path], object]) -> dict:
    """A dataset prepared by the node, then one of its crops (the fidelity references) damaged."""
    folder = photo_folder(server, name, {"a.jpg": copy_photo})
    run_ok(server, prepare_prompt(folder))
    dataset = next((server.base_dir / "output" / "dreambooth" / "datasets").glob(f"{name}_*"))
    damage(next(p for p in sorted(dataset.glob("*.png")) if p.name != "contact_sheet.png"))
    return fidelity_prompt(folder)


def dino_folder_with_only_bin(server) -> dict:
    folder = hf_folder_with_only_bin(server.base_dir / "input" / "dino_bin", "vit", server.base_dir / "PWNED_dino")
    return fidelity_prompt(dino_folder=str(folder))


# ---------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    node: str  # the class_type that must show the error
    build: Callable[[object], dict]  # writes the case's inputs under the server's folders, returns the prompt
    names: tuple[str, ...]  # the message must contain each (case-insensitive)
    refused: str | None = None  # ComfyUI's validation refuses the prompt with this error type
    never_created: tuple[str, ...] = ()  # marker files (in the base folder) that unpickling would create
    xfail: str | None = None


PREPARE, TRAIN_NODE = "DreamBoothPrepareSubjectDataset", "DreamBoothTrainSubject"
LORA, CKPT, EXTRACT = "DreamBoothLoadSubjectLoRA", "DreamBoothLoadSubjectCheckpoint", "DreamBoothExtractSubjectLoRA"
SCENES, FIDELITY, CLASS = "DreamBoothScenePrompts", "DreamBoothSubjectFidelity", "DreamBoothClassImages"


def _only(name: str, make: Callable[[Path], object], reason: str) -> Case:
    """A photo folder whose only file is one kind the dataset cannot use."""
    folder = f"only_{Path(name).stem}"
    return Case(f"prepare/only-{name}", PREPARE, lambda s: prepare_prompt(photo_folder(s, folder, {name: make})),
                (name, reason, "add photos"))


def _output_name(name: str, *names: str) -> Case:
    return Case(f"train/output-name-{name}", TRAIN_NODE, lambda s: train_prompt(output_name=name),
                ("output_name", *names), refused="custom_validation_failed")


def _base(case_id: str, make: Callable[[object], str], *names: str, node: str = TRAIN_NODE,
          never_created: tuple[str, ...] = ()) -> Case:
    """A bad file picked as the checkpoint of Train Subject (or of another node)."""
    prompt = {TRAIN_NODE: lambda name: train_prompt(checkpoint=name), CKPT: checkpoint_prompt,
              CLASS: lambda name: class_images_prompt(checkpoint=name),
              EXTRACT: lambda name: extract_prompt(name, CHECKPOINT)}[node]
    return Case(case_id, node, lambda s: prompt(make(s)), names, never_created=never_created)


def sdxl(s) -> str:
    return write_base_stub(models(s, "checkpoints") / "sdxl_base.safetensors", extra={SDXL_KEY: (768,)}).name


def pickled_ckpt(s) -> str:
    return write_pickle(models(s, "checkpoints") / "model.ckpt", s.base_dir / "PWNED_ckpt").name


CASES = [
    # ---- Prepare Subject Dataset
    Case("prepare/missing-folder", PREPARE, lambda s: prepare_prompt("no_such_photos"),
         ("no_such_photos", "does not exist")),
    Case("prepare/empty-folder", PREPARE, lambda s: prepare_prompt(photo_folder(s, "empty_photos", {})),
         ("empty_photos", "add photos")),
    Case("prepare/folder-is-a-file", PREPARE, lambda s: prepare_prompt(written(s.base_dir / "input" / "photo.jpg",
                                                                               PHOTO.read_bytes())),
         ("photo.jpg", "not a folder")),
    Case("prepare/folder-empty-no-images", PREPARE, lambda s: prepare_prompt(""), ("folder", "connect images")),
    _only("notes.jpg", lambda p: p.write_text("this is not a picture\n"), "not an image"),
    _only("broken.jpg", half_jpeg, "truncated"),
    _only("empty.png", lambda p: p.write_bytes(b""), "0 bytes"),
    _only("photo.heic", lambda p: p.write_bytes(HEIC), "not a supported image type"),
    _only("bomb.png", png_bomb, "too many pixels"),
    Case("prepare/resolution-not-multiple-of-8", PREPARE, lambda s: prepare_prompt(resolution=100),
         ("resolution", "multiple of 8")),
    Case("prepare/token-with-braces", PREPARE, lambda s: prepare_prompt(token="{sks}"), ("token", "{sks}")),
    # ---- Class Images
    Case("class-images/prompt-stray-braces", CLASS, lambda s: class_images_prompt(class_prompt="a photo of a {clss}"),
         ("class prompt", "{clss}")),
    Case("class-images/negative-stray-braces", CLASS, lambda s: class_images_prompt(negative_prompt="blurry {bad}"),
         ("negative prompt", "{bad}")),
    _base("class-images/base-sdxl", sdxl, "sdxl_base.safetensors", "SDXL", node=CLASS),
    # ---- Train Subject: the base checkpoint
    _base("train/base-sdxl", sdxl, "sdxl_base.safetensors", "SDXL", "SD1.5"),
    _base("train/base-sd2", lambda s: write_base_stub(models(s, "checkpoints") / "sd2.safetensors", context=1024).name,
          "sd2.safetensors", "2.x", "SD1.5"),
    _base("train/base-inpainting",
          lambda s: write_base_stub(models(s, "checkpoints") / "inpaint.safetensors", in_channels=9).name,
          "inpaint.safetensors", "inpainting"),
    _base("train/base-is-a-lora", lambda s: write_lora(models(s, "checkpoints") / "a_lora.safetensors").name,
          "a_lora.safetensors", "LoRA", "apply the LoRA on top"),
    _base("train/base-ckpt-pickle", pickled_ckpt, "model.ckpt", "pickle", "convert", never_created=("PWNED_ckpt",)),
    _base("train/base-truncated", lambda s: truncated_stub(models(s, "checkpoints") / "cut.safetensors"),
          "cut.safetensors", "truncated"),
    _base("train/base-zero-bytes", lambda s: written(models(s, "checkpoints") / "zero.safetensors", b""),
          "zero.safetensors", "0 bytes"),
    # ---- Train Subject: numbers (steps 0 and learning_rate 0 mean the method's default, so they are not errors)
    Case("train/rank-0", TRAIN_NODE, lambda s: train_prompt(rank=0), ("rank",), refused="value_smaller_than_min"),
    Case("train/steps-negative", TRAIN_NODE, lambda s: train_prompt(steps=-1), ("steps",),
         refused="value_smaller_than_min"),
    Case("train/learning-rate-negative", TRAIN_NODE, lambda s: train_prompt(learning_rate=-1e-4), ("learning_rate",),
         refused="value_smaller_than_min"),
    Case("train/batch-size-larger-than-dataset", TRAIN_NODE, lambda s: train_prompt(batch_size=8),
         ("batch_size 8", "images")),
    Case("train/one-usable-image-batch-2", TRAIN_NODE,
         lambda s: train_prompt(photo_folder(s, "one_usable", {"only.jpg": copy_photo,
                                                               "notes.jpg": lambda p: p.write_text("no picture")}),
                                batch_size=2),
         ("batch_size 2", "1 images", "add photos")),
    # ---- Train Subject: the output (../, /abs, a:b, what?, CON, trailing. are in test_nodes.py)
    _output_name("C:\\models\\x", "'C:\\models\\x'"),
    _output_name("subject<1>", "subject<1>"),
    _output_name('a|b*"c"', "a|b*"),
    _output_name("NUL", "NUL"),
    _output_name("..\\up", "'..\\up'"),
    Case("train/output-exists-from-another-config", TRAIN_NODE,
         lambda s: train_prompt(output_name=Path(write_lora(models(s, "loras") / "taken.safetensors")).stem),
         ("taken.safetensors", "already exists", "overwrite")),
    # ---- Load Subject LoRA
    Case("lora/for-sdxl", LORA, lambda s: lora_prompt(write_lora(
        models(s, "loras") / "sdxl_lora.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"}).name),
         ("sdxl_lora.safetensors", "SDXL")),
    Case("lora/for-sd2", LORA, lambda s: lora_prompt(write_lora(
        models(s, "loras") / "sd2_lora.safetensors", metadata={"ss_base_model_version": "sd_v2"}).name),
         ("sd2_lora.safetensors", "2.x")),
    Case("lora/malformed-header", LORA, lambda s: lora_prompt(written(models(s, "loras") / "bad.safetensors", BAD_HEADER)),
         ("bad.safetensors", "not a readable safetensors")),
    Case("lora/garbage-bytes", LORA,
         lambda s: lora_prompt(written(models(s, "loras") / "garbage.safetensors", bytes(range(256)) * 8)),
         ("garbage.safetensors", "safetensors")),
    Case("lora/nan-weights", LORA, lambda s: lora_prompt(write_lora(models(s, "loras") / "nan_lora.safetensors",
                                                                    nan=True).name),
         ("nan_lora.safetensors", "NaN")),
    Case("lora/pickle-pt", LORA, lambda s: lora_prompt(write_pickle(models(s, "loras") / "adapter.pt",
                                                                    s.base_dir / "PWNED_pt").name),
         ("adapter.pt", "convert"), never_created=("PWNED_pt",)),
    Case("lora/rank-above-trained", LORA,
         lambda s: lora_prompt(write_lora(models(s, "loras") / "r4.safetensors", rank=4).name, rank=8),
         ("rank: 8", "4")),
    Case("lora/none-chosen", LORA, lambda s: lora_prompt("(none)"), ("models/loras", "pick")),
    Case("lora/file-not-in-folder", LORA, lambda s: lora_prompt("(none)", lora_file="gone.safetensors"),
         ("gone.safetensors", "models/loras")),
    # ---- Load Subject Checkpoint
    _base("checkpoint/sdxl", sdxl, "sdxl_base.safetensors", "SDXL", node=CKPT),
    _base("checkpoint/truncated", lambda s: truncated_stub(models(s, "checkpoints") / "cut.safetensors"),
          "cut.safetensors", "truncated", node=CKPT),
    _base("checkpoint/pickle-ckpt", pickled_ckpt, "model.ckpt", "convert", node=CKPT,
          never_created=("PWNED_ckpt",)),
    Case("checkpoint/not-in-folder", CKPT, lambda s: checkpoint_prompt("gone.safetensors"),
         ("gone.safetensors", "models/checkpoints")),
    # ---- Extract Subject LoRA
    _base("extract/base-sdxl", sdxl, "sdxl_base.safetensors", "SDXL", node=EXTRACT),
    Case("extract/tuned-truncated", EXTRACT,
         lambda s: extract_prompt(CHECKPOINT, truncated_stub(models(s, "checkpoints") / "cut.safetensors")),
         ("cut.safetensors", "truncated")),
    Case("extract/tuned-pickle-ckpt", EXTRACT, lambda s: extract_prompt(CHECKPOINT, pickled_ckpt(s)),
         ("model.ckpt", "convert"), never_created=("PWNED_ckpt",)),
    Case("extract/output-exists", EXTRACT,
         lambda s: extract_prompt(CHECKPOINT, CHECKPOINT, write_lora(models(s, "loras") / "mine.safetensors").stem),
         ("mine.safetensors", "output_name")),
    # ---- Subject Scene Prompts
    Case("scenes/stray-braces", SCENES, lambda s: scenes_prompt("forest: portrait of {token} {clas} in a forest"),
         ("{clas}",)),
    Case("scenes/empty", SCENES, lambda s: scenes_prompt(""), ("scenes", "name: prompt")),
    Case("scenes/line-without-name", SCENES, lambda s: scenes_prompt("portrait of {token} {class}"),
         ("scenes line 1", "name: prompt")),
    # ---- Subject Fidelity: the references are the dataset's crops; the models are files or folders
    Case("fidelity/reference-unreadable", FIDELITY,
         lambda s: damaged_reference(s, "fid_text", lambda p: p.write_text("not a picture")),
         ("fid_text", "a.png", "delete the folder")),
    Case("fidelity/reference-bomb", FIDELITY, lambda s: damaged_reference(s, "fid_bomb", png_bomb),
         ("fid_bomb", "a.png", "delete the folder")),
    Case("fidelity/clip-vision-bin", FIDELITY,
         lambda s: fidelity_prompt(clip_vision=write_pickle(models(s, "clip_vision") / "clip.bin",
                                                            s.base_dir / "PWNED_clip").name),
         ("clip.bin", ".safetensors"), never_created=("PWNED_clip",)),
    Case("fidelity/dino-folder-with-only-bin", FIDELITY, dino_folder_with_only_bin, ("dino_bin", "safetensors"),
         never_created=("PWNED_dino",)),
]


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.node for c in CASES} >= {PREPARE, TRAIN_NODE, LORA, CKPT, EXTRACT, SCENES, FIDELITY}


# ---------------------------------------------------------------- checks


def execution_error(entry: dict) -> dict | None:
    """The execution_error event of a finished prompt's history entry."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return data
    return None


def shown_error(server, prompt: dict, case: Case) -> tuple[str, str]:
    """(error type, message) that the page shows for the case's node."""
    node_id = next(i for i, n in prompt.items() if n["class_type"] == case.node)
    status, answer = post_prompt_raw(server, prompt)
    if status == 400:
        errors = answer.get("node_errors", {}).get(node_id, {}).get("errors")
        assert errors, f"refused, but not on {case.node}: {answer}"
        return errors[0]["type"], f"{errors[0]['message']}: {errors[0]['details']}"
    assert status == 200, answer
    assert case.refused is None, f"expected ComfyUI to refuse the prompt ({case.refused}); it was queued"
    entry = server.wait(answer["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error", f"the prompt succeeded: {entry.get('outputs')}"
    error = execution_error(entry)
    assert error["node_type"] == case.node, error
    assert error["exception_type"].endswith(".NodeError"), f"not a user error: {error['exception_type']}: " \
                                                           f"{error['exception_message']}"
    return "execution_error", error["exception_message"]


def case_inputs(base: Path) -> set[Path]:
    return {p for folder in CASE_FOLDERS if (base / folder).is_dir() for p in (base / folder).iterdir()}


def fingerprints(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under roots; size and mtime for big ones (the checkpoint), which any write changes."""
    found = {}
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            st = path.stat()
            found[path] = (f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > BIG
                           else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def assert_intact(before: dict[Path, str], *roots: Path) -> None:
    after = fingerprints(*roots)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"changed or removed by a failed prompt: {changed}"
    leftovers = [str(p) for p in set(after) - set(before) if p.name.endswith(".tmp") or p.suffix == ".safetensors"]
    assert not leftovers, f"a failed prompt left these behind: {leftovers}"


@pytest.fixture(scope="module")
def server(comfy_server):
    """The host with the test checkpoint and the subject photos, and the photos prepared once (every
    training case reuses that dataset)."""
    ensure_test_inputs(comfy_server)
    run_ok(comfy_server, prepare_prompt())
    return comfy_server


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input_is_one_line_on_the_node_and_touches_nothing(case: Case, server):
    base = server.base_dir
    roots = [base / "models", base / "input", base / "output"]
    existing = case_inputs(base)
    try:
        prompt = case.build(server)
        before = fingerprints(*roots)
        kind, message = shown_error(server, prompt, case)
        assert server.process.poll() is None and server.get("/system_stats")["system"], "the server died"
        assert_intact(before, *roots)
        for marker in case.never_created:
            assert not (base / marker).exists(), f"{marker} appeared: a pickle was unpickled"
        text = message.removesuffix("\n")  # ComfyUI appends a newline to an exception's message
        assert "\n" not in text and "Traceback" not in text and 'File "' not in text, message
        for name in case.names:
            assert name.lower() in text.lower(), f"{name!r} not in: {text}"
        assert kind == (case.refused or "execution_error"), text
        if kind != "value_smaller_than_min":  # ComfyUI's own wording names the input, not what to do
            assert INSTRUCTION.search(text), f"no instruction in: {text}"
    finally:
        for path in case_inputs(base) - existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_a_deleted_dataset_folder_is_prepared_again(server):
    """What a damaged crop's message says to do works: the dataset folder deleted, the next queue prepares
    it anew instead of passing on ComfyUI's cached result."""
    folder = photo_folder(server, "redo_photos", {"a.jpg": copy_photo})
    try:
        run_ok(server, prepare_prompt(folder))
        dataset = next((server.base_dir / "output" / "dreambooth" / "datasets").glob(f"{folder}_*"))
        shutil.rmtree(dataset)
        run_ok(server, prepare_prompt(folder))
        assert (dataset / "dataset.json").is_file()
    finally:
        shutil.rmtree(server.base_dir / "input" / folder)
