"""Security of the pack (issue 8): only safetensors are read, nothing that came inside a file is
executed or used as a path, output names stay in their folder, no server route reaches outside
ComfyUI's folders, and decompression bombs are refused with a clear reason."""
from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from PIL import Image

from fixture_paths import ROOT, SUBJECT_PHOTOS, load_pack
from test_bad_input import (cli, generated_images, hf_folder_with_only_bin, png_bomb, stderr_lines, write_lora,
                             write_pickle)

# ---------------------------------------------------------------- static: what the code may call


def pack_files(*suffixes: str) -> list[Path]:
    """The pack's own files, tracked or new (not ignored), tests excluded."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if name.endswith(suffixes) and not name.startswith("tests/")
            and (ROOT / name).is_file()]


UNSAFE = {
    "torch.load": r"\btorch\.(jit\.)?load\s*\(",
    "pickle": r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b|\b(c?pickle|dill|joblib|marshal)\.loads?\s*\(",
    "eval": r"(?<![\w.])eval\s*\(",
    "exec": r"(?<![\w.])exec\s*\(",
    "__import__": r"(?<![\w.])__import__\s*\(",
    "yaml.load": r"\byaml\.(unsafe_)?load\s*\(",
    "allow_pickle": r"allow_pickle\s*=\s*True",
    "weights_only=False": r"weights_only\s*=\s*False",
    "use_safetensors=False": r"use_safetensors\s*=\s*False",
    "PIL bomb limit off": r"MAX_IMAGE_PIXELS\s*=\s*None",
}


def test_no_unsafe_loader_or_eval_anywhere_in_the_pack():
    files = pack_files(".py")
    assert any(p.name == "extract.py" and p.parent.name == "lora" for p in files) and any(p.parent.name == "nodes" for p in files)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}"
                      for what, pattern in UNSAFE.items() if re.search(pattern, line)]
    for path in pack_files(".js"):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {what}" for what, pattern in
                  {"eval": r"(?<![\w.])eval\s*\(", "new Function": r"\bnew\s+Function\s*\("}.items()
                  if re.search(pattern, text)]
    assert not found, "\n".join(found)


WEIGHT_LOADERS = re.compile(r"(Model|ModelWithProjection|AutoencoderKL|UNet2DConditionModel)$")


def _keeps_safe_dict(value: ast.expr, safe_dicts: set[str]) -> bool:
    """`**kw` or `**kw | {...}` where kw holds use_safetensors=True and the update does not name it."""
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.BitOr) and isinstance(value.right, ast.Dict):
        if any(k is None or "use_safetensors" in ast.unparse(k) for k in value.right.keys):
            return False
        value = value.left
    return isinstance(value, ast.Name) and value.id in safe_dicts


def test_every_from_pretrained_of_weights_insists_on_safetensors():
    """transformers/diffusers fall back to pytorch_model.bin (a pickle) unless told use_safetensors=True."""
    missing = []
    for path in pack_files(".py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        safe_dicts = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                      and "use_safetensors=True" in ast.unparse(node.value).replace(" ", "")
                      for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            receiver = ast.unparse(node.func.value)
            if not WEIGHT_LOADERS.search(receiver.split("[")[0]) and "classes" not in receiver:
                continue  # tokenizers, configs and processors read JSON and text
            safe = any(k.arg == "use_safetensors" and ast.unparse(k.value) == "True" for k in node.keywords) or any(
                k.arg is None and _keeps_safe_dict(k.value, safe_dicts) for k in node.keywords)
            if not safe:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not missing, "\n".join(missing)


def test_the_engine_never_imports_the_host_or_a_web_server():
    bad = []
    for path in pack_files(".py"):
        if path.relative_to(ROOT).parts[0] != "training":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"\s*(import|from)\s+(comfy|folder_paths|server|aiohttp)\b", line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, bad


ROUTE = re.compile(r"\broutes\s*\.\s*(get|post|put|patch|delete|route|static)\s*\(|\badd_(get|post|route|static)\s*\("
                   r"|\bweb\.(get|post|static)\s*\(")


def test_no_server_route_is_added():
    """The pack adds no HTTP route to ComfyUI's server, so none can read or write outside its folders.
    A route added later must confine every path with folder_paths and get its own test here."""
    routes = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in pack_files(".py")
              for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ROUTE.search(line)]
    assert not routes, "new server routes need a confinement review and a test: " + "; ".join(routes)


# ---------------------------------------------------------------- pickles are never opened


def test_the_planted_pickle_would_run_if_unpickled(tmp_path):
    """The control for the tests below: unpickling the file does create its marker."""
    path = write_pickle(tmp_path / "x.ckpt", tmp_path / "PWNED")
    pickle.loads(path.read_bytes())
    assert (tmp_path / "PWNED").exists()


PICKLE_USES = {  # argv after `python -m training`, given (d, a maker of planted pickles, the marker)
    "info": lambda d, p, m: ["info", p(".pth")],
    "generate --base": lambda d, p, m: ["generate", "--base", p(".bin"), "--out", d / "img", "--steps", "1"],
    "generate --lora": lambda d, p, m: ["generate", "--base", "tiny", "--lora", p(".ckpt"), "--out", d / "img",
                                        "--steps", "1"],
    "lora info": lambda d, p, m: ["lora", "info", p(".pt")],
    "lora resize": lambda d, p, m: ["lora", "resize", p(".pt"), "--rank", "2", "--out", d / "r.safetensors"],
    "lora convert": lambda d, p, m: ["lora", "convert", p(".ckpt"), "--out", d / "c.safetensors"],
    "lora extract --base": lambda d, p, m: ["lora", "extract", "--base", p(".ckpt"), "--tuned", "tiny", "--rank", "2",
                                            "--out", d / "e.safetensors"],
    "lora extract --tuned": lambda d, p, m: ["lora", "extract", "--base", "tiny", "--tuned", p(".pth"), "--rank", "2",
                                             "--out", d / "e.safetensors"],
    "class-images --base": lambda d, p, m: ["class-images", "--base", p(".pt"), "--out", d / "cls", "--num", "1"],
    "train --base": lambda d, p, m: ["train", "--base", p(".ckpt"), "--instance-dir", SUBJECT_PHOTOS,
                                     "--output", d / "o.safetensors", "--steps", "1"],
    "evaluate --clip file": lambda d, p, m: ["evaluate", "--images", generated_images(d), "--references",
                                             generated_images(d), "--clip", p(".bin"), "--out", d / "ev",
                                             "--face-detector", "hog"],
}
# what each error line must say besides the file's name: the conversion hint, or why it is not read
SAYS = {"evaluate --clip folder": "model.safetensors", "pickle named .safetensors": "not a readable safetensors"}
PICKLE_USES |= {
    "evaluate --clip folder": lambda d, p, m: ["evaluate", "--images", generated_images(d), "--references",
                                               generated_images(d), "--clip",
                                               hf_folder_with_only_bin(d / "clip_bin", "clip_vision_model", m),
                                               "--out", d / "ev", "--face-detector", "hog"],
    "pickle named .safetensors": lambda d, p, m: ["lora", "info", p(".safetensors")],
}


def test_pickles_are_refused_everywhere_with_the_conversion_hint_and_never_unpickled(tmp_path, capsys):
    from training.cli import main

    marker = tmp_path / "PWNED"
    failures = []
    for use, build in PICKLE_USES.items():
        d = tmp_path / re.sub(r"\W+", "_", use)
        d.mkdir()
        made: list[Path] = []

        def planted(suffix: str, d=d, made=made) -> Path:
            made.append(write_pickle(d / f"weights{suffix}", marker))
            return made[-1]

        code = main([str(a) for a in build(d, planted, marker)])
        lines = stderr_lines(capsys.readouterr().err)
        line = lines[-1] if lines else ""
        named = made[0].name if made else "clip_bin"
        if code != 1 or not line.startswith("error: ") or named not in line or SAYS.get(use, "convert") not in line:
            failures.append(f"{use}: exit {code}: {line}")
    assert not marker.exists(), "a pickle was unpickled"
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- metadata is text


def test_lora_metadata_is_shown_as_text_never_run_or_used_as_a_path(tmp_path):
    tag = uuid.uuid4().hex[:8]
    escape = f"../../../../../../../../tmp/escaped_{tag}"
    hostile = {
        "ss_output_name": escape,
        "ss_tag_frequency": f"__import__('os').system('touch PWNED_{tag}')",
        "modelspec.title": "{token} {__import__('os').system('touch PWNED')} {0.__class__}",
        "dreambooth.token": f"$(touch PWNED_shell_{tag})",
        "dreambooth.class_word": "`touch PWNED_tick`",
        "dreambooth.training_config": json.dumps({"output": escape, "run_dir": "/etc"}),
        "ss_sd_model_name": "/etc/passwd",
    }
    lora = write_lora(tmp_path / "hostile.safetensors", metadata=hostile)
    work = tmp_path / "cwd"
    work.mkdir()
    info = cli(["lora", "info", lora], cwd=work)
    assert info.returncode == 0, info.stderr[-2000:]
    for key, value in hostile.items():
        assert f"{key}: {' '.join(value.split())[:100]}" in info.stdout, key
    generated = cli(["generate", "--base", "tiny", "--lora", lora, "--out", tmp_path / "images", "--steps", "1",
                     "--prompt", "a photo of {token} {class}"], cwd=work)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["prompt1_0.png", "prompts.json"]
    for folder in (tmp_path, work, Path("/tmp"), ROOT):
        assert not [p for p in folder.glob("*PWNED*")], f"something ran in {folder}"
    assert not Path(f"/tmp/escaped_{tag}").exists() and not Path(f"/tmp/escaped_{tag}.safetensors").exists()


# ---------------------------------------------------------------- output names stay in their folder


TOO_LONG = pytest.param("x" * 300, id="300-chars")
HOSTILE_NAMES = ["../x", "..\\x", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\x", "C:x", "\\\\server\\share\\x",
                 "a/../../b", "sub/x", "x\x00y", "..", ".", "~/x", "$HOME", "%APPDATA%\\x", "con", "x:ads",
                 "x\u2215..\u2215y", "．．/x", TOO_LONG,
                 pytest.param("name\n2", id="newline")]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_an_output_name_is_refused_or_stays_in_the_model_folder(name, tmp_path):
    from training.safe_io import file_name_problem

    load_pack()
    from pack_offline.nodes import host

    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    try:
        stem = host.check_output_name(name)
    except host.NodeError as refused:
        assert "\n" not in str(refused)
        return
    target = (folder / f"{stem}.safetensors").resolve()
    assert target.parent == folder.resolve(), f"{name!r} -> {target}"
    assert file_name_problem(f"{stem}.safetensors") is None, f"{name!r} is accepted but cannot be stored on Windows"


def test_file_name_problem_flags_what_windows_refuses():
    from training.safe_io import file_name_problem

    for bad in ["a<b", "a>b", 'a"b', "a:b", "a/b", "a\\b", "a|b", "a?b", "a*b", "CON", "nul.txt", "x.", "x ", "", "\x01"]:
        assert file_name_problem(bad), bad
    for good in ["subject_lora.safetensors", "Ünïcode name (2).png", "a.b-c_d"]:
        assert file_name_problem(good) is None, good
    assert file_name_problem("a\\b:c\n") == 'has characters that Windows does not allow in file names (\\n : \\)'


# ---------------------------------------------------------------- decompression bombs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def folder_of(folder: Path, *files: Path) -> Path:
    """`folder`, made, with copies of `files` in it."""
    folder.mkdir()
    for file in files:
        shutil.copy(file, folder)
    return folder


def test_a_decompression_bomb_is_skipped_by_prepare_with_a_reason(bomb, tmp_path):
    src = folder_of(tmp_path / "photos", bomb, SUBJECT_PHOTOS / "input__foreground__01.jpg")
    assert bomb.stat().st_size < 5_000_000
    width, height = struct.unpack(">II", bomb.read_bytes()[16:24])  # what its IHDR claims
    assert width * height > 2 * Image.MAX_IMAGE_PIXELS
    run = cli(["prepare", src, "--out", tmp_path / "ds", "--resolution", "64", "--crop", "center"])
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "bomb.png: too many pixels to decode safely" in run.stdout and "Prepared 1 of 2" in run.stdout


def test_a_decompression_bomb_among_references_is_one_line(bomb, tmp_path):
    refs = folder_of(tmp_path / "refs", bomb)
    images = folder_of(tmp_path / "images")
    Image.new("RGB", (64, 64)).save(images / "lora_r4_forest_0.png")
    run = cli(["evaluate", "--images", images, "--references", refs, "--out", tmp_path / "ev", "--face-detector", "hog"])
    lines = stderr_lines(run.stderr)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "bomb.png" in lines[-1] and "remove it" in lines[-1], lines[-1]


def test_a_decompression_bomb_among_class_images_is_one_line(bomb, tmp_path):
    classes = folder_of(tmp_path / "classes", bomb)
    photos = folder_of(tmp_path / "photos", SUBJECT_PHOTOS / "input__foreground__01.jpg")
    run = cli(["train", "--base", "tiny", "--instance-dir", photos, "--output", tmp_path / "o.safetensors", "--steps", "1",
               "--rank", "4", "--prior-preservation", "--class-dir", classes, "--num-class-images", "1"])
    lines = stderr_lines(run.stderr)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "bomb.png" in lines[-1]
