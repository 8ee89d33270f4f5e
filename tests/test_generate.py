"""training/generate.py: the files it writes, and never over an earlier run's images without overwrite."""
from pathlib import Path

import pytest
from PIL import Image

from training import generate
from training.errors import UserError
from training.generate import GenerateRequest, output_paths, run_generate


def _plant(path: Path) -> bytes:
    """An image of the user's (or an earlier run's) where generate would write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path.read_bytes()


def test_output_names_are_scene_or_prompt_and_seed(tmp_path):
    assert [p.name for p in output_paths(GenerateRequest(out=tmp_path, seed=7))] == \
        ["forest_7.png", "desert_7.png", "mountains_7.png"]
    assert output_paths(GenerateRequest(out=tmp_path, prompts=["a", "b"])) == [tmp_path / "prompt1_0.png",
                                                                               tmp_path / "prompt2_0.png"]


def test_existing_images_are_refused_before_any_model_or_lora_is_read(tmp_path, monkeypatch):
    kept = _plant(tmp_path / "out" / "desert_0.png")
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    req = GenerateRequest(out=tmp_path / "out", lora=str(tmp_path / "not_read.safetensors"))
    with pytest.raises(UserError, match=r"--out .*out already holds desert_0.png; pick another --out folder, "
                                        r"or pass --overwrite"):
        run_generate(req)
    assert (tmp_path / "out" / "desert_0.png").read_bytes() == kept
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pick a folder"):
        run_generate(GenerateRequest(out=tmp_path / "file"))


def test_cli_overwrite_replaces_only_the_names_it_writes(tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "images"
    other_seed, ours = _plant(out / "forest_1.png"), _plant(out / "forest_0.png")
    argv = ["generate", "--base", "tiny", "--out", str(out), "--steps", "1", "--resolution", "64"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "forest_0.png" in err and "--overwrite" in err
    assert (out / "forest_0.png").read_bytes() == ours

    assert main([*argv, "--overwrite"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(p) for p in output_paths(GenerateRequest(out=out))]
    assert (out / "forest_0.png").read_bytes() != ours  # replaced, as asked
    assert (out / "forest_1.png").read_bytes() == other_seed  # another seed's image: not ours to touch
    assert sorted(p.name for p in out.iterdir()) == ["desert_0.png", "forest_0.png", "forest_1.png", "mountains_0.png"]
