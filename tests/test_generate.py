"""training/generate.py: the files it writes (images and the prompts.json `evaluate` reads), and never over an
earlier run's images without overwrite."""
from pathlib import Path

import pytest
from PIL import Image

from training import generate
from training.cli.train import flag
from training.errors import UserError, inputs_named_by
from training.generate import GenerateRequest, output_paths, run_generate

from test_evaluate import tiny_clip  # noqa: F401 (a fixture: a random CLIP folder)


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
    with inputs_named_by(flag), pytest.raises(UserError, match=r"--out .*out already holds desert_0.png; pick "
                                                                r"another --out folder, or pass --overwrite"):
        run_generate(req)  # as the CLI names the inputs
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
    assert sorted(p.name for p in out.iterdir()) == ["desert_0.png", "forest_0.png", "forest_1.png", "mountains_0.png",
                                                     "prompts.json"]


def test_generate_writes_what_evaluate_reads(tmp_path, capsys, tiny_clip):
    """`generate` then `evaluate` on its folder: method, rank, scene and prompt come from prompts.json, and
    prompt fidelity (CLIP-T) is scored with a CLIP given (issue 17 item 4)."""
    import json

    from test_bad_input import write_lora

    from fixture_paths import SUBJECT_PHOTOS
    from training.cli import main
    from training.prompts import SEED_NEGATIVE

    lora = write_lora(tmp_path / "subject_r4.safetensors", rank=4)
    out = tmp_path / "images"
    assert main(["generate", "--base", "tiny", "--lora", str(lora), "--rank", "2", "--strength", "0.8",
                 "--out", str(out), "--steps", "1", "--resolution", "64", "--seed", "5"]) == 0
    record = json.loads((out / "prompts.json").read_text())
    assert sorted(record) == ["desert_5.png", "forest_5.png", "mountains_5.png"]
    forest = record["forest_5.png"]
    assert forest["scene"] == "forest" and "sks man" in forest["prompt"] and "forest" in forest["prompt"]
    assert (forest["method"], forest["rank"], forest["strength"], forest["seed"]) == ("lora", 2, 0.8, 5)
    assert forest["model"] == "subject_r4.safetensors" and forest["negative"] == SEED_NEGATIVE

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", "--images", str(out), "--references", str(SUBJECT_PHOTOS), "--out", str(evaluation),
                 "--face-detector", "hog", "--clip", str(tiny_clip)]) == 0
    capsys.readouterr()
    rows = {Path(row["path"]).name: row for row in json.loads((evaluation / "report.json").read_text())["images"]}
    assert set(rows) == set(record)
    for name, row in rows.items():
        assert (row["method"], row["rank"], row["scene"], row["prompt"]) == \
            ("lora", 2, record[name]["scene"], record[name]["prompt"])
        assert row["clip_t"] is not None


def test_a_prompts_json_generate_did_not_write_is_not_replaced(tmp_path):
    (tmp_path / "prompts.json").write_text("my own notes")
    with pytest.raises(UserError, match="already holds prompts.json"):
        run_generate(GenerateRequest(out=tmp_path))
    assert (tmp_path / "prompts.json").read_text() == "my own notes"
