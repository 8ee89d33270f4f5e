"""The bad-input matrix of `python -m training` (issue 8): every case below runs the real CLI
in a subprocess and must end with

- exit status 1 and, as the last line of stderr, one line `error: ...` that names the input
  (file, folder, flag or field) and says what to do; no traceback anywhere in stderr;
- every file that existed before the command (the case's own inputs and the shared ones)
  byte-for-byte unchanged, no `*.tmp` left behind, and no new `.safetensors` file.

A case is `Case(id, build, names)`: `build(d, s)` writes the case's inputs into its own folder
`d` (the shared inputs `s` are built once per module) and returns the argv after
`python -m training`. A case that still fails is marked xfail(strict=True), its reason naming
the file and function to change; the fix removes the mark. An output that already exists is
checked below the matrix (refused, reused by the same run); resuming a killed run of the same
config is in test_crash_safety.py.

The node cases (the same kinds of bad input reaching the ComfyUI nodes, in the real host) are in
tests/comfyui/test_bad_input_nodes.py.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cli_runner
from fixture_paths import ROOT, SUBJECT_PHOTOS

UNET = "model.diffusion_model."
# What a message says to do: an imperative, or the rule the value must follow.
INSTRUCTION = re.compile(r"\b(give|pass|pick|choose|use|add|run|delete|remove|download|copy|convert|turn on|lower|"
                         r"fix|free|install|rename|check|must|prepare|replace|save|export|re-export|load|leave)\b", re.I)
# what only a ComfyUI user can do: the CLI names its flags instead (issue 17 item 7)
NODE_SPEAK = re.compile(r"\b(node|widget|Load Subject \w+|in the loader|turn on)\b", re.I)
PHOTO = SUBJECT_PHOTOS / "input__foreground__01.jpg"


# ---------------------------------------------------------------- running the CLI


def cli(argv: list, cwd: Path = ROOT, drop_dac: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m training *argv` (tests/cli_runner.py: a fork of a preloaded interpreter); with drop_dac,
    a root caller loses its power to read any file, so `chmod 000` means unreadable as it does for a user."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    try:
        return cli_runner.run(argv, cwd=cwd, env=env, timeout=timeout, drop_dac=drop_dac)
    except subprocess.SubprocessError as exc:
        if isinstance(exc, subprocess.TimeoutExpired):
            raise
        # dropping the capability failed: no way to make a file unreadable to root here
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE ({exc}), so root reads every file")


def stderr_lines(stderr: str) -> list[str]:
    """What a terminal would show last on each line (tqdm redraws with \\r)."""
    return [shown for line in stderr.split("\n") if (shown := line.split("\r")[-1].strip())]


def assert_one_line_error(run: subprocess.CompletedProcess, names: tuple[str, ...]) -> str:
    lines = stderr_lines(run.stderr)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 1, f"exit {run.returncode}\nstdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-1500:]}"
    assert lines and lines[-1].startswith("error: "), run.stderr[-1500:]
    assert sum(line.startswith("error:") for line in lines) == 1, run.stderr[-1500:]
    message = lines[-1]
    for name in names:
        assert name.lower() in message.lower(), f"{name!r} not in: {message}"
    assert INSTRUCTION.search(message.removeprefix("error: ")), f"no instruction in: {message}"
    assert not NODE_SPEAK.search(message), f"a command-line message that speaks of ComfyUI: {message}"
    return message


def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under roots."""
    found = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:  # a chmod 000 input when not root: its size must stay
                found[path] = f"size {path.stat().st_size}"
    return found


def assert_intact(before: dict[Path, str], *roots: Path) -> None:
    after = snapshot(*roots)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"changed or removed by a failed command: {changed}"
    new = set(after) - set(before)
    leftovers = [str(p) for p in new if p.name.endswith(".tmp") or p.suffix == ".safetensors"]
    assert not leftovers, f"a failed command left these behind: {leftovers}"


# ---------------------------------------------------------------- inputs


@dataclass
class Shared:
    root: Path
    dataset: Path  # prepared from the sample photos at 64 px (tiny's size): conftest's tiny_dataset
    lora: Path  # a rank-4 kohya LoRA for tiny
    tiny_file: Path  # tiny as a single-file checkpoint

    @property
    def roots(self) -> tuple[Path, Path]:
        """The folders every shared input is in: a failed command must leave them as they were."""
        return self.root, self.dataset


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_file, tiny_dataset) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    lora = write_lora(root / "lora_r4.safetensors", rank=4)
    return Shared(root, Path(tiny_dataset), lora, Path(tiny_file))


def write_lora(path: Path, rank: int = 4, metadata: dict | None = None, nan: bool = False) -> Path:
    """A kohya LoRA on four attention layers of tiny."""
    from training.lora import LoraFile, LoraLayer, kohya_state_dict, module_table

    shapes = module_table("tiny").shapes
    names = [n for n in shapes if n.endswith((".attn1.to_q", ".attn2.to_v"))][:4]
    g = torch.Generator().manual_seed(rank)
    layers = {n: LoraLayer(torch.randn(rank, shapes[n][1], generator=g) * 0.1,
                           torch.randn(shapes[n][0], rank, generator=g) * 0.1, float(rank)) for n in names}
    state = kohya_state_dict(LoraFile(layers, family="tiny"), torch.float32)
    if nan:
        key = next(k for k in state if k.endswith("lora_up.weight"))
        state[key][0, 0] = float("nan")
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)}
    save_file(state, str(path), metadata=meta | (metadata or {}))
    return path


def write_base_stub(path: Path, in_channels: int = 4, context: int = 768, extra: dict | None = None) -> Path:
    """Just the keys and shapes the base-model detection reads, in a real safetensors file."""
    shapes = {f"{UNET}input_blocks.0.0.weight": (320, in_channels, 3, 3),
              f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context)} | (extra or {})
    tensors = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}
    save_file(tensors, str(path))
    return path


class Plant:
    """Unpickling this creates `marker`: a pickle that shows whether anything ever unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {"w": Plant(marker)}}))
    return path


def hf_folder_with_only_bin(folder: Path, model_type: str, marker: Path) -> Path:
    """A Hugging Face model folder whose only weights are a planted pytorch_model.bin (no model.safetensors)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    write_pickle(folder / "pytorch_model.bin", marker)
    return folder


def png_bomb(path: Path, side: int = 30000) -> Path:
    """A valid PNG of side x side black pixels (900 Mpx decoded), 4 MB on disk: zeros compress well."""
    path.write_bytes(_png_bomb_bytes(side))
    return path


@functools.lru_cache(maxsize=None)
def _png_bomb_bytes(side: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer, row = zlib.compressobj(1), b"\0" * (side + 1)  # filter byte 0, then the row
    parts = [packer.compress(row * 1000) for _ in range(side // 1000)]
    parts += [packer.compress(row * (side % 1000)), packer.flush()]
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def folder_with(d: Path, name: str, make: Callable[[Path], object]) -> Path:
    """A photo folder `d/photos` holding one file made by `make(path)`."""
    folder = d / "photos"
    folder.mkdir()
    make(folder / name)
    return folder


def half_jpeg(path: Path) -> None:
    data = PHOTO.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def locked(path: Path) -> Path:
    path.chmod(0)
    return path


def read_only(path: Path) -> Path:
    path.chmod(0o555)
    return path


def train_argv(d: Path, s: Shared, *extra) -> list:
    """A quick LoRA run on tiny; extra flags override."""
    return ["train", "--base", "tiny", "--instance-dir", s.dataset, "--out", d / "out.safetensors", "--no-prior-preservation",
            "--steps", "2", "--rank", "4", *extra]


def generate_argv(d: Path, *extra) -> list:
    return ["generate", "--base", "tiny", "--out", d / "images", "--steps", "1", *extra]


# ---------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    build: Callable[[Path, Shared], list]  # writes inputs into d, returns argv after `python -m training`
    names: tuple[str, ...]  # the error line must contain each (case-insensitive)
    drop_dac: bool = False  # needs `chmod 000` to mean unreadable
    never_created: tuple[str, ...] = ()  # files (relative to d) that must not appear: pickle markers
    xfail: str | None = None


def _odd(name: str, make: Callable[[Path], object], reason: str) -> Case:
    """A photo folder whose only file is one odd kind the dataset cannot use."""
    return Case(f"prepare/only-{Path(name).stem}",
                lambda d, s: ["prepare", folder_with(d, name, make), "--out", d / "ds"],
                (name, reason, "add photos"), drop_dac=name == "locked.jpg")


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _copy_photo(path: Path) -> Path:
    return Path(shutil.copy(PHOTO, path))


def _one_usable(d: Path) -> Path:
    folder = _empty(d / "photos")
    _copy_photo(folder / "only.jpg")
    (folder / "notes.jpg").write_text("not a picture")
    return folder


def _damaged_dataset(d: Path, s: Shared) -> Path:
    copy = d / "dataset"
    shutil.copytree(s.dataset, copy)
    next(p for p in sorted(copy.glob("*.png")) if p.name != "contact_sheet.png").unlink()
    return copy


def _corrupt_checkpoint(d: Path, s: Shared) -> list:
    folder = d / "out.safetensors.run" / "checkpoints"
    folder.mkdir(parents=True)
    _write(folder / "step_0000002.safetensors", b"\x20\x00\x00\x00\x00\x00\x00\x00{garbage that is not a header")
    return train_argv(d, s)


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    return _write(path, data[: len(data) // 2])


def _alpha_of_two(path: Path) -> Path:
    state = load_file(str(write_lora(path)))
    state[next(k for k in state if k.endswith(".alpha"))] = torch.tensor([4.0, 4.0])
    save_file(state, str(path))
    return path


def _bin_only_folder(d: Path) -> Path:
    folder = d / "diffusers_model"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        write_pickle(folder / part / "diffusion_pytorch_model.bin", d / "PWNED")
    return folder


def generated_images(d: Path) -> Path:
    """A folder holding one generated-looking picture, for `evaluate --images/--references`."""
    folder = d / "generated"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (120, 90, 60)).save(folder / "lora_r4_forest_0.png")
    return folder


def _generate_over_earlier_images(d: Path, s: Shared) -> list:
    """`generate` into `d/images` as an earlier run left it (seed 0), with an image of another seed."""
    folder = _empty(d / "images")
    for name in ("forest_0.png", "mountains_0.png", "forest_1.png"):
        Image.new("RGB", (64, 64), (120, 90, 60)).save(folder / name)
    return generate_argv(d)


def _foreign_out(d: Path) -> list:
    """A photo `me.jpg`, and an --out folder of the user's own files (no dataset.json) holding `me.png`/`me.txt`."""
    photos = folder_with(d, "me.jpg", _copy_photo)
    theirs = _empty(d / "my_set")
    Image.new("RGB", (64, 64), (120, 90, 60)).save(theirs / "me.png")
    (theirs / "me.txt").write_text("my own caption")
    return ["prepare", photos, "--out", theirs, "--resolution", "64", "--crop", "center"]


SDXL_KEY = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
HEIC = b"\0\0\0\x18ftypheic" + bytes(64)
BAD_HEADER = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"
ODD_ALPHA = {"lora_adapter_metadata": '{"unet.lora_alpha": "__import__(1)"}'}

CASES = [
    # ---- photo folders and the odd image kinds of the dataset issue
    Case("prepare/missing-folder", lambda d, s: ["prepare", d / "no_such_photos", "--out", d / "ds"],
         ("no_such_photos", "does not exist")),
    Case("prepare/empty-folder", lambda d, s: ["prepare", _empty(d / "empty_photos"), "--out", d / "ds"],
         ("empty_photos", "add photos")),
    Case("prepare/unreadable-folder",
         lambda d, s: ["prepare", locked(folder_with(d, "a.jpg", _copy_photo)), "--out", d / "ds"],
         ("photos", "cannot be read", "permissions"), drop_dac=True),
    Case("prepare/out-not-writable",
         lambda d, s: ["prepare", SUBJECT_PHOTOS, "--out", read_only(_empty(d / "locked_out")) / "ds"],
         ("locked_out", "choose a folder you can write to"), drop_dac=True),
    Case("evaluate/out-not-writable",
         lambda d, s: ["evaluate", "--images", generated_images(d), "--references", generated_images(d),
                       "--face-detector", "hog", "--out", read_only(_empty(d / "locked_out")) / "scores"],
         ("locked_out", "choose a folder you can write to"), drop_dac=True),
    Case("prepare/folder-is-a-file", lambda d, s: ["prepare", _copy_photo(d / "photo.jpg"), "--out", d / "ds"],
         ("photo.jpg", "not a folder")),
    _odd("notes.jpg", lambda p: p.write_text("this is not a picture\n"), "not an image"),
    _odd("broken.jpg", half_jpeg, "truncated"),
    _odd("empty.png", lambda p: p.write_bytes(b""), "0 bytes"),
    _odd("photo.heic", lambda p: p.write_bytes(HEIC), "not a supported image type"),
    _odd("bomb.png", png_bomb, "too many pixels"),
    _odd("locked.jpg", lambda p: locked(_copy_photo(p)), "cannot be read"),
    Case("prepare/resolution-not-multiple-of-8",
         lambda d, s: ["prepare", SUBJECT_PHOTOS, "--out", d / "ds", "--resolution", "100"],
         ("--resolution", "multiple of 8")),
    Case("prepare/caption-template-stray-braces",
         lambda d, s: ["prepare", SUBJECT_PHOTOS, "--out", d / "ds", "--caption-template", "photo of {token} {name}"],
         ("--caption-template", "{name}")),
    Case("train/instance-dir-missing", lambda d, s: [*train_argv(d, s), "--instance-dir", d / "no_such_photos"],
         ("--instance-dir:", "no_such_photos", "is not a folder")),
    Case("train/instance-dir-empty", lambda d, s: [*train_argv(d, s), "--instance-dir", _empty(d / "empty")],
         ("empty", "add photos")),
    Case("train/one-usable-image-batch-2",
         lambda d, s: [*train_argv(d, s), "--instance-dir", _one_usable(d), "--batch-size", "2"],
         ("--batch-size 2", "1 images", "add photos")),
    Case("train/batch-size-larger-than-dataset", lambda d, s: train_argv(d, s, "--batch-size", "8"),
         ("--batch-size 8", "6 images")),
    Case("train/dataset-damaged", lambda d, s: [*train_argv(d, s), "--instance-dir", _damaged_dataset(d, s)],
         ("dataset.json", "missing", "run prepare")),
    # ---- bases
    Case("train/base-sdxl",
         lambda d, s: train_argv(d, s, "--base", write_base_stub(d / "sdxl_base.safetensors", extra={SDXL_KEY: (768,)})),
         ("sdxl_base.safetensors", "SDXL", "SD1.5")),
    Case("train/base-sd2", lambda d, s: train_argv(d, s, "--base", write_base_stub(d / "sd2.safetensors", context=1024)),
         ("sd2.safetensors", "2.x", "SD1.5")),
    Case("train/base-inpainting",
         lambda d, s: train_argv(d, s, "--base", write_base_stub(d / "inpaint.safetensors", in_channels=9)),
         ("inpaint.safetensors", "inpainting")),
    Case("generate/base-is-a-lora", lambda d, s: generate_argv(d, "--base", s.lora), ("lora_r4.safetensors", "LoRA")),
    Case("train/base-ckpt-pickle", lambda d, s: train_argv(d, s, "--base", write_pickle(d / "model.ckpt", d / "PWNED")),
         ("model.ckpt", "pickle", "convert"), never_created=("PWNED",)),
    Case("lora-extract/base-truncated",
         lambda d, s: ["lora", "extract", "--base", _truncated(s.tiny_file, d / "cut.safetensors"), "--tuned", "tiny",
                       "--rank", "2", "--out", d / "extracted.safetensors"],
         ("cut.safetensors", "truncated")),
    Case("info/base-zero-bytes", lambda d, s: ["info", _write(d / "zero.safetensors", b"")],
         ("zero.safetensors", "0 bytes")),
    Case("info/diffusers-folder-with-only-bin", lambda d, s: ["info", _bin_only_folder(d)],
         ("unet", ".safetensors"), never_created=("PWNED",)),
    # ---- LoRAs
    Case("generate/lora-for-sdxl",
         lambda d, s: generate_argv(d, "--lora", write_lora(d / "sdxl_lora.safetensors",
                                                            metadata={"ss_base_model_version": "sdxl_base_v1-0"})),
         ("sdxl_lora.safetensors", "SDXL")),
    Case("generate/lora-malformed", lambda d, s: generate_argv(d, "--lora", _write(d / "bad.safetensors", BAD_HEADER)),
         ("bad.safetensors", "not a readable safetensors")),
    Case("generate/lora-nan", lambda d, s: generate_argv(d, "--lora", write_lora(d / "nan_lora.safetensors", nan=True)),
         ("nan_lora.safetensors", "NaN")),
    Case("lora-info/malformed-adapter-metadata",
         lambda d, s: ["lora", "info", write_lora(d / "odd_meta.safetensors", metadata=ODD_ALPHA)],
         ("odd_meta.safetensors", "lora_adapter_metadata")),
    Case("generate/lora-alpha-not-a-scalar",
         lambda d, s: generate_argv(d, "--lora", _alpha_of_two(d / "alpha2.safetensors")),
         ("alpha2.safetensors", "alpha")),
    Case("lora-info/pickle-pt", lambda d, s: ["lora", "info", write_pickle(d / "adapter.pt", d / "PWNED")],
         ("adapter.pt", "convert"), never_created=("PWNED",)),
    Case("lora-extract/tuned-ckpt",
         lambda d, s: ["lora", "extract", "--base", "tiny", "--tuned", write_pickle(d / "tuned.ckpt", d / "PWNED"),
                       "--rank", "2", "--out", d / "x.safetensors"],
         ("tuned.ckpt", "convert"), never_created=("PWNED",)),
    # ---- ranks
    Case("train/rank-0", lambda d, s: train_argv(d, s, "--rank", "0"), ("--rank: 0", "at least 1")),
    Case("generate/rank-negative", lambda d, s: generate_argv(d, "--lora", s.lora, "--rank", "-1"), ("--rank: -1", "0 (the LoRA as trained)")),
    Case("generate/rank-above-trained", lambda d, s: generate_argv(d, "--lora", s.lora, "--rank", "8"),
         ("--rank: 8", "trained rank 4")),
    Case("lora-resize/rank-0", lambda d, s: ["lora", "resize", s.lora, "--rank", "0", "--out", d / "r0.safetensors"],
         ("--rank: 0", "at least 1")),
    Case("lora-resize/rank-above-trained",
         lambda d, s: ["lora", "resize", s.lora, "--rank", "8", "--out", d / "r8.safetensors"],
         ("--rank: 8", "trained rank 4")),
    # ---- numbers
    Case("train/resolution-not-multiple-of-8", lambda d, s: train_argv(d, s, "--resolution", "100"),
         ("--resolution: 100", "multiple of 8")),
    Case("generate/resolution-not-multiple-of-8", lambda d, s: generate_argv(d, "--resolution", "100"),
         ("--resolution: 100", "multiple of 8")),
    Case("train/steps-0", lambda d, s: train_argv(d, s, "--steps", "0"), ("--steps: 0", "at least 1")),
    Case("generate/steps-0", lambda d, s: [*generate_argv(d), "--steps", "0"], ("--steps: 0", "at least 1")),
    Case("train/lr-0", lambda d, s: train_argv(d, s, "--lr", "0"), ("--lr: 0", "greater than 0")),
    Case("train/lr-negative", lambda d, s: train_argv(d, s, "--lr", "-0.0001"), ("--lr: -0.0001", "greater than 0")),
    # ---- outputs ("--lr -1" makes a case that is still accepted fail fast instead of training)
    Case("train/output-invalid-on-windows",
         lambda d, s: train_argv(d, s, "--output", d / "subject<1>?.safetensors", "--lr", "-1"),
         ("subject<1>?", "Windows")),
    Case("train/output-exists-from-another-config",
         lambda d, s: train_argv(d, s, "--output", write_lora(d / "mine.safetensors")),
         ("mine.safetensors", "already exists", "another --out file", "pass --overwrite")),
    Case("lora-resize/output-exists",
         lambda d, s: ["lora", "resize", s.lora, "--rank", "2", "--out", write_lora(d / "keep.safetensors", rank=2)],
         ("keep.safetensors", "already exists")),
    Case("generate/out-holds-earlier-images", _generate_over_earlier_images,
         ("images", "forest_0.png, mountains_0.png", "--overwrite")),
    Case("generate/out-is-a-file", lambda d, s: [*generate_argv(d), "--out", _write(d / "out.png", b"x")],
         ("out.png", "is a file", "folder")),
    Case("prepare/out-is-a-foreign-folder", lambda d, s: _foreign_out(d),
         ("my_set", "no dataset.json", "me.png", "--overwrite"),
         never_created=("my_set/dataset.json", "my_set/.prepare_unfinished", "my_set/contact_sheet.png")),
    Case("train/corrupt-checkpoint-on-resume", _corrupt_checkpoint,
         ("step_0000002.safetensors", "unreadable", "delete")),
    # ---- prompts
    Case("generate/prompt-stray-braces", lambda d, s: generate_argv(d, "--prompt", "portrait of {token} {clas}"),
         ("{clas}", "remove")),
    Case("train/class-prompt-stray-braces",
         lambda d, s: train_argv(d, s, "--prior-preservation", "--class-prompt", "a photo of a {clss}", "--lr", "-1"),
         ("--class-prompt:", "{clss}")),
    Case("class-images/prompt-stray-braces",
         lambda d, s: ["class-images", "--base", "tiny", "--out", d / "class", "--num", "1", "--prompt",
                       "a photo of a {clss}"],
         ("class prompt", "{clss}")),
    # ---- evaluation inputs
    Case("evaluate/references-unreadable",
         lambda d, s: ["evaluate", "--images", generated_images(d),
                       "--references", locked(folder_with(d, "ref.jpg", _copy_photo)),
                       "--out", d / "scores"],
         ("photos", "cannot be read"), drop_dac=True),
]


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case: Case, shared: Shared, tmp_path: Path):
    d = tmp_path / "case"
    d.mkdir()
    try:
        argv = case.build(d, shared)
        before = snapshot(d, *shared.roots)
        run = cli(argv, drop_dac=case.drop_dac)
        assert_one_line_error(run, case.names)
        assert_intact(before, d, *shared.roots)
        for name in case.never_created:
            assert not (d / name).exists(), f"{name} appeared: a pickle was unpickled"
    finally:
        for path in [d, *d.rglob("*")]:  # undo chmod 000, so the folder can be cleaned up
            if not path.is_symlink():
                path.chmod(0o755)


# ---------------------------------------------------------------- outputs that already exist


def _quick_run(shared: Shared, out: Path, *extra) -> list:
    return ["train", "--base", "tiny", "--instance-dir", shared.dataset, "--out", out, "--no-prior-preservation", "--steps", "2",
            "--rank", "4", "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def finished(shared: Shared, tmp_path_factory) -> Path:
    """A finished 2-step run on tiny."""
    out = tmp_path_factory.mktemp("finished") / "subject.safetensors"
    first = cli(_quick_run(shared, out))
    assert first.returncode == 0, first.stderr[-3000:]
    return out


def test_an_existing_output_is_reused_by_the_same_run_and_refused_to_another(shared: Shared, finished: Path):
    written = finished.read_bytes()
    again = cli(_quick_run(shared, finished))  # the same run: nothing to do, nothing rewritten
    assert again.returncode == 0 and "already holds this exact training run" in again.stdout, again.stderr[-2000:]
    assert finished.read_bytes() == written
    before = snapshot(finished.parent)
    other = cli(_quick_run(shared, finished, "--steps", "3"))  # another config: refused, the finished result kept
    assert_one_line_error(other, ("subject.safetensors", "already exists", "pass --overwrite"))
    assert_intact(before, finished.parent)


def test_overwrite_replaces_an_output_made_by_another_config(shared: Shared, finished: Path, tmp_path: Path):
    shutil.copytree(finished.parent, tmp_path / "models")
    out = tmp_path / "models" / finished.name
    written = out.read_bytes()
    replaced = cli(_quick_run(shared, out, "--steps", "3", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert load_file(str(out)).keys() == load_file_bytes(written).keys() and out.read_bytes() != written


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


# ---------------------------------------------------------------- odd images that are usable


def test_odd_images_are_kept_or_skipped_with_a_reason(tmp_path: Path):
    """Every odd kind together: the usable ones are kept, the rest listed with a reason; exit 0."""
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("CMYK", (96, 96), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    Image.new("I;16", (96, 96), 30000).save(src / "gray16.png")
    Image.new("RGBA", (96, 96), (0, 128, 0, 100)).save(src / "alpha.png")
    Image.new("RGB", (96, 96), (10, 20, 200)).convert("P").save(src / "palette.png")
    frames = [Image.new("RGB", (96, 96), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(src / "pages.tif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1)).save(src / "dot.bmp")
    shutil.copy(PHOTO, src / "UPPER.JPEG")
    (src / "notes.jpg").write_text("not a picture")
    half_jpeg(src / "broken.jpg")
    (src / "empty.png").write_bytes(b"")
    (src / "clip.mp4").write_bytes(b"\0" * 64)
    png_bomb(src / "bomb.png")
    run = cli(["prepare", src, "--out", tmp_path / "ds", "--resolution", "64", "--crop", "center"])
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "Prepared 8 of 13 files" in run.stdout, run.stdout
    for name, reason in {"notes.jpg": "not an image", "broken.jpg": "truncated", "empty.png": "empty file (0 bytes)",
                         "clip.mp4": "not a supported image type", "bomb.png": "too many pixels"}.items():
        assert f"{name}: {reason}" in run.stdout, (name, run.stdout)


def test_one_usable_photo_is_prepared_with_a_warning(tmp_path: Path):
    """One usable photo trains (a warning, exit 0); none usable is refused (prepare/only-* above)."""
    run = cli(["prepare", _one_usable(tmp_path), "--out", tmp_path / "ds", "--resolution", "64", "--crop", "center"])
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "Prepared 1 of 2 files" in run.stdout and "warning: only one usable photo" in run.stdout, run.stdout
    assert "10-20 varied photos" in run.stdout
    doc = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert len(doc["items"]) == 1 and any("only one usable photo" in w for w in doc["warnings"])
