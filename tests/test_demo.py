"""The demo end to end on `tiny` (trimmed), and the `evaluate` / `demo` commands."""
import json
import re
import shutil

import pytest
import torch

from PIL import Image

import cli_runner
from fixture_paths import OTHER_PEOPLE, ROOT, SUBJECT_PHOTOS
from training.demo import DemoConfig, run_demo
from training.drawing import MIN_TILE, font, font_size
from training.errors import UserError
from training.eval.report import EvalReport, ImageScores, group_key, group_name
from training.prompts import SEED_NEGATIVE, SEED_SCENES

SCENES = list(SEED_SCENES)
# The one order of the demo's models everywhere (report, grid, tables): the control, then methods by name,
# higher rank first, the trained LoRA before the one resized to its rank.
MODELS = [("base", None), ("dreambooth", None), ("lora", 16), ("lora", 4), ("lora-resized", 4)]
LABELS = [group_name(*m) for m in MODELS]


def cli(*args, timeout=300):
    """`python -m training ARGS`, through tests/cli_runner.py (a fork of a preloaded interpreter)."""
    return cli_runner.run(list(args), cwd=ROOT, timeout=timeout)


def linked_files(report_md):
    """Every relative link target of a Markdown report, as paths."""
    text = report_md.read_text(encoding="utf-8")
    return [report_md.parent / target for target in re.findall(r"\]\(([^)]+)\)", text)]


def test_demo_cli_quick_writes_a_report_of_the_three_scenes(tmp_path):
    out = tmp_path / "demo"
    run = cli("demo", "--quick", "--steps", 3, "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "random weights" in run.stdout and "--base path/to/v1-5-pruned-emaonly.safetensors" in run.stdout
    assert f"report: {out / 'report.md'}" in run.stdout
    # progress shown, numbered by demo step, its label not doubled ("[3/7] train lora: train" was)
    assert re.search(r"^\[3/8\] train lora r16: \d+/3 ", run.stderr, re.M), run.stderr[-2000:]
    assert re.search(r"^\[4/8\] train lora r4: \d+/3 ", run.stderr, re.M), run.stderr[-2000:]
    report = out / "report.md"
    text = report.read_text(encoding="utf-8")
    assert text.index("random weights") < text.index("## Subject photos")  # said at the top
    assert "no face is expected" in text
    for scene in SCENES:
        assert f"## Scene: {scene}" in text
        assert SEED_SCENES[scene].format(token="sks", **{"class": "man"}) in text
    assert SEED_NEGATIVE in text
    links = linked_files(report)
    assert {p.name for p in links} >= {"contact_sheet.png", "loss.png", "grid.png", "chart.png",
                                       "lora_r16_forest_0.png", "lora_r4_mountains_0.png", "base_desert_0.png",
                                       "lora-resized_r4_forest_0.png", "lora_r4_tiny_3steps.safetensors",
                                       "lora_r16_tiny_3steps_resized_r4.safetensors"}
    assert all(p.is_file() for p in links), [str(p) for p in links if not p.is_file()]


def test_demo_compares_methods_and_ranks_and_reuses_finished_work(tmp_path):
    cfg = DemoConfig(steps=4, class_images=2, sample_steps=3, face_detector="hog")
    events = []
    threads = torch.get_num_threads()
    first = run_demo(tmp_path, config=cfg, progress=events.append)
    assert torch.get_num_threads() == threads  # tiny runs single-threaded, then the setting is given back

    prompts = json.loads((tmp_path / "images" / "prompts.json").read_text())
    groups = {(e["method"], e["rank"]) for e in prompts.values()}
    assert groups == set(MODELS)  # the LoRA trained at rank 4 beside the rank-16 one resized to 4
    assert sorted(prompts) == sorted(p.name for p in first.images) == sorted(
        f"{g}_{s}_0.png" for g in ("base", "lora_r16", "lora_r4", "lora-resized_r4", "dreambooth") for s in SCENES)
    # evaluate read method, rank and scene back from the files
    assert {(r.method, r.rank, r.scene) for r in first.evaluation.images} == {
        (m, r, s) for m, r in groups for s in SCENES}
    assert all(r.face_found is False for r in first.evaluation.images)  # tiny draws noise
    assert first.evaluation.references["faces_found"] >= 5  # ... but the photos have faces (hog misses one)
    stages = [e.stage for e in events]
    assert stages[0].startswith("[1/9] load base") and stages[-1].startswith("[9/9] report")
    assert any(s.startswith("[5/9] train dreambooth: train") for s in stages)
    assert [r.label for r in first.runs] == LABELS[1:]
    assert first.runs[-1].path.name == "lora_r16_tiny_4steps_resized_r4.safetensors"

    text = first.report.read_text(encoding="utf-8")
    assert "LoRA vs DreamBooth" in text and "the r16 LoRA resized (no training)" in text
    assert "LoRA, trained at rank 4" in text
    # one order in the report's training table, its scene columns and the score tables
    training = text.split("## Training")[1].split("## All pictures")[0]
    assert [line.split(" | ")[0].strip("| ") for line in training.splitlines() if line.startswith("| ")][1:] == \
        LABELS[1:]
    assert text.count("| " + " | ".join(LABELS) + " |") == len(SCENES)
    table = (tmp_path / "evaluation" / "table.txt").read_text().split("per method / rank\n")[1].splitlines()
    assert [line.split()[:2] for line in table[1:len(MODELS) + 1]] == [[m, str(r) if r else "-"] for m, r in MODELS]

    class_images = sorted((tmp_path / "class_images").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in class_images]
    again = run_demo(tmp_path, config=cfg)
    trained = [r for r in again.runs if r.resized_from is None]
    assert [r.label for r in trained] == ["dreambooth", "lora r16", "lora r4"] and all(r.reused for r in trained)
    assert [p.stat().st_mtime_ns for p in class_images] == stamps
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == sorted(prompts)

    quick = run_demo(tmp_path, config=DemoConfig.quick(steps=4, class_images=2, sample_steps=3,
                                                       face_detector="hog"))
    assert not any(p.name.startswith("dreambooth") for p in (tmp_path / "images").iterdir())  # no stale pictures
    assert len(quick.evaluation.images) == 12  # base, lora r16, lora r4, lora-resized r4


def _scores(models, size=64):
    """An EvalReport of one solid-coloured picture per (model, scene), given in a shuffled order."""
    colours = {m: (40 * n, 255 - 40 * n, 128) for n, m in enumerate(MODELS)}
    rows = [(m, s) for s in SCENES for m in models]
    rows = rows[3::2] + rows[::2] + rows[1:3:2]  # no order to inherit
    report = EvalReport(images=[ImageScores(label=f"{m[0]}_{s}", method=m[0], rank=m[1], scene=s, prompt=None)
                                for m, s in rows])
    report.thumbnails = [Image.new("RGB", (size, size), colours[m]) for m, _ in rows]
    return report, colours


def test_models_have_one_order_in_grid_and_tables():
    assert sorted(reversed(MODELS), key=lambda m: group_key(*m)) == MODELS
    report, colours = _scores(list(reversed(MODELS)))
    assert [(a["method"], a["rank"]) for a in report.aggregates(by_scene=False)] == MODELS
    per_model = report.table().split("per method / rank\n")[1].splitlines()[1:len(MODELS) + 1]
    assert [line.split()[:2] for line in per_model] == [[m, str(r) if r else "-"] for m, r in MODELS]
    grid = report.grid()
    cell_h = grid.height // len(MODELS)
    assert [grid.getpixel((5, n * cell_h + 5)) for n in range(len(MODELS))] == [colours[m] for m in MODELS]


def test_grid_cells_fit_small_pictures():
    caption_h = 2 * (font_size(font(10)) + 3) + 6  # two lines under each picture: its name, "face: n/a"
    report, colours = _scores(MODELS[:2], size=64)
    grid = report.grid()
    # tiny's 64 px pictures are enlarged (nearest neighbour) to 128 px cells, not centred in 224 px ones
    assert grid.size == (len(SCENES) * MIN_TILE, 2 * (MIN_TILE + caption_h))
    assert grid.getpixel((1, 1)) == grid.getpixel((MIN_TILE - 2, MIN_TILE - 2)) == colours[MODELS[0]]
    assert grid.getpixel((MIN_TILE + 2, MIN_TILE + 2)) == (255, 255, 255)  # the caption band
    large, _ = _scores(MODELS[:2], size=256)
    assert large.grid().width == len(SCENES) * 224  # a large picture is shrunk to the tile, as before


def test_demo_refuses_bad_settings(tmp_path):
    with pytest.raises(UserError, match="steps"):
        run_demo(tmp_path, steps=0)
    with pytest.raises(UserError, match="is not a folder"):
        run_demo(tmp_path, config=DemoConfig(photos=str(tmp_path / "missing")))


def test_evaluate_cli_scores_a_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SUBJECT_PHOTOS / "input__foreground__03.jpg", images / "lora_r4_forest_0.jpg")
    shutil.copy(OTHER_PEOPLE / "examples_obama2.jpg", images / "lora_r4_desert_0.jpg")
    out = tmp_path / "scores"
    run = cli("evaluate", "--images", images, "--references", SUBJECT_PHOTOS, "--out", out, "--face-detector", "hog")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "per method / rank / scene" in run.stdout and f"to {out}" in run.stdout
    assert {"report.json", "table.txt", "grid.png"} <= {p.name for p in out.iterdir()}
    scores = {r["scene"]: r for r in json.loads((out / "report.json").read_text())["images"]}
    assert scores["forest"]["identity_match"] is True  # the subject's own photo
    assert scores["desert"]["face_found"] is True and scores["desert"]["identity_match"] is False  # someone else
    assert {r["method"] for r in scores.values()} == {"lora"} and {r["rank"] for r in scores.values()} == {4}


@pytest.mark.parametrize("args, named", [
    (["evaluate", "--images", "no/such/folder", "--references", SUBJECT_PHOTOS, "--out", "x"], "no/such/folder"),
    (["demo", "--steps", "0", "--out", "unused"], "--steps 0"),
])
def test_cli_bad_input_is_one_line(args, named, tmp_path):
    run = cli(*args)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], run.stderr
    assert "Traceback" not in run.stderr
