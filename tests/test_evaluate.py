"""Tests for training/eval/ (scorers, run, report): dlib face identity on real photos, CLIP/DINO on tiny random
models built here, the report files and the folder helper behind `python -m training evaluate`."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.errors import UserError
from training.eval.run import EvalImage, describe_images, evaluate_images, prompt_without_token, run_evaluate
from training.eval.scorers import FACE_MATCH_THRESHOLD, face_distance, load_clip

REPO = Path(__file__).resolve().parents[1]
SUBJECT = sorted((REPO / "training" / "sample_data" / "subject").glob("*.jpg"))
OTHERS = sorted((REPO / "tests" / "fixtures" / "other_people").glob("*.jpg"))
TOKENIZER = REPO / "training" / "configs" / "clip_tokenizer"

DLIB_REASON = "dlib face identity needs: pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0"
HAS_DLIB = all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))
needs_dlib = pytest.mark.skipif(not HAS_DLIB, reason=DLIB_REASON)


def flat(color=(40, 140, 60), size=96) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def noise(seed: int, size=96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP (text + vision) with the real tokenizer, saved as a Hugging Face folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- prompts


def test_prompt_without_token_removes_only_the_token():
    assert prompt_without_token("portrait of sks man face, forest", "sks") == "portrait of man face, forest"
    assert prompt_without_token("a sks, smiling", "sks") == "a, smiling"
    assert prompt_without_token("a sksman and tasks", "sks") == "a sksman and tasks"
    assert prompt_without_token("a <tok> man", "<tok>") == "a man"
    assert prompt_without_token("a sks man", None) == "a sks man"


# ---------------------------------------------------------------- faces (dlib)


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("dlib", reason=DLIB_REASON)
    from training.eval.scorers import FaceEmbedder

    return FaceEmbedder("hog+cnn")


def roc_auc(positive_distances, negative_distances) -> float:
    """Probability that a different-person pair is farther apart than a same-person pair (ties: half)."""
    pos = np.asarray(positive_distances)[:, None]
    neg = np.asarray(negative_distances)[None, :]
    return float(((neg > pos) + 0.5 * (neg == pos)).mean())


@needs_dlib
def test_same_person_closer_than_other_people(embedder):
    assert len(SUBJECT) >= 5 and len(OTHERS) >= 4
    subject = [embedder.faces(Image.open(p)) for p in SUBJECT]
    others = [embedder.faces(Image.open(p)) for p in OTHERS]
    assert all(len(f) >= 1 for f in subject + others), "a face was missed in a fixture photo"
    s = [f[0].descriptor for f in subject]
    o = [f[0].descriptor for f in others]
    assert all(d.shape == (128,) for d in s + o)
    positives = [face_distance(s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))]
    negatives = [face_distance(a, b) for a in s for b in o]
    assert roc_auc(positives, negatives) > 0.9
    # dlib's threshold separates most pairs too
    assert np.mean(np.array(positives) < FACE_MATCH_THRESHOLD) > 0.8
    assert np.mean(np.array(negatives) >= FACE_MATCH_THRESHOLD) > 0.8


@needs_dlib
def test_no_face_is_reported(embedder):
    assert embedder.faces(flat()) == []
    assert embedder.faces(noise(0)) == []


@needs_dlib
def test_identity_scores_per_image(tmp_path):
    references = SUBJECT[:-1]  # the last subject photo is held out as a "generated" image
    images = [
        EvalImage(SUBJECT[-1], method="lora", rank=4, scene="forest"),
        EvalImage(Image.open(OTHERS[0]), method="lora", rank=4, scene="forest", label="other person"),
        EvalImage(flat(), method="lora", rank=4, scene="desert"),
        EvalImage(noise(1), method="lora", rank=4, scene="desert"),
    ]
    report = evaluate_images(images, references)
    rows = report.images
    assert [r.face_found for r in rows] == [True, True, False, False]
    assert [r.identity_match for r in rows] == [True, False, False, False]
    assert rows[0].identity_distance < FACE_MATCH_THRESHOLD <= rows[1].identity_distance
    assert rows[0].nearest_distance is not None and rows[2].identity_distance is None
    assert report.references["faces_found"] == len(references)
    by_scene = {row["scene"]: row for row in report.aggregates(by_scene=True)}
    assert by_scene["forest"]["presence"] == 1.0 and by_scene["desert"]["presence"] == 0.0
    (overall,) = report.aggregates(by_scene=False)
    assert overall["presence"] == 0.5 and overall["identity_match"] == 0.25
    # no CLIP/DINO given: their columns say so and name what is expected
    assert set(report.unavailable) == {"clip_i", "clip_t", "dino"}
    assert "clip_vision" in report.unavailable["clip_i"] and "dino-vits16" in report.unavailable["dino"]
    table = report.table()
    assert "not available" in table and "2/4" in table


@needs_dlib
def test_references_without_faces_make_identity_unavailable():
    report = evaluate_images([EvalImage(noise(2))], [flat(), noise(3)])
    assert "no face was found in the reference images" in report.unavailable["identity"]
    assert report.images[0].face_found is None


def test_missing_dlib_gives_install_line_and_other_metrics_run(monkeypatch, tiny_clip):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail as if not installed
    report = evaluate_images([EvalImage(noise(4), prompt="a photo of sks man")], [noise(5)], clip=tiny_clip)
    assert "pip install dlib-bin" in report.unavailable["identity"]
    assert report.images[0].face_found is None
    assert report.images[0].clip_i is not None and report.images[0].clip_t is not None
    assert "identity: not available" in report.table()


# ---------------------------------------------------------------- CLIP and DINO


def test_identical_images_score_one(tiny_clip, tiny_dino):
    image = noise(6, size=64)
    report = evaluate_images([EvalImage(image, prompt="a sks man")], [image.copy()],
                             clip=tiny_clip, dino=tiny_dino, face_detector="hog")
    (row,) = report.images
    assert row.clip_i == pytest.approx(1.0, abs=1e-5)
    assert row.dino == pytest.approx(1.0, abs=1e-5)
    assert not {"clip_i", "clip_t", "dino"} & set(report.unavailable)


def test_scores_lie_in_unit_range_and_differ_for_different_images(tiny_clip, tiny_dino):
    refs = [noise(10 + i, size=48) for i in range(3)]
    images = [EvalImage(noise(20 + i, size=80), prompt=f"a sks man number {i}") for i in range(3)]
    images.append(EvalImage(flat((250, 10, 10)), prompt="a red square"))
    report = evaluate_images(images, refs, clip=tiny_clip, dino=tiny_dino, face_detector="hog")
    for row in report.images:
        for value in (row.clip_i, row.clip_t, row.dino):
            assert -1.0 <= value <= 1.0
    assert report.images[-1].clip_i < 0.999 and report.images[-1].dino < 0.999
    assert len({round(r.clip_t, 6) for r in report.images}) > 1
    assert -1.0 <= report.references["clip_i"] <= 1.0


def test_clip_t_scores_the_prompt_without_the_token(tiny_clip):
    image = noise(7, size=48)
    scored = {}
    for name, prompt, token in (("with token", "a photo of sks man", "sks"),
                                ("no token", "a photo of man", "sks"),
                                ("token kept", "a photo of sks man", None)):
        report = evaluate_images([EvalImage(image, prompt=prompt)], [image], clip=tiny_clip,
                                 token=token, face_detector="hog")
        scored[name] = report.images[0].clip_t
    assert scored["with token"] == pytest.approx(scored["no token"], abs=1e-6)
    assert scored["token kept"] != pytest.approx(scored["no token"], abs=1e-4)


def test_missing_models_give_not_available_columns(tmp_path):
    missing = tmp_path / "no_such_clip"
    report = evaluate_images([EvalImage(noise(8), prompt="a sks man")], [noise(9)],
                             clip=missing, dino=None, face_detector="hog")
    assert str(missing) in report.unavailable["clip_i"] and "not available" in report.unavailable["clip_t"]
    assert "no DINO model given" in report.unavailable["dino"]
    assert report.images[0].clip_i is None and report.images[0].dino is None
    table = report.table()
    assert table.count("not available") >= 3
    assert str(missing) in table


def test_clip_vision_file_gives_clip_i_only(tmp_path):
    """A ComfyUI models/clip_vision file: its config is read from tensor shapes."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=1,
                              image_size=48, patch_size=16, projection_dim=24, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(config)
    folder = tmp_path / "hf_vision"
    model.save_pretrained(folder)
    file = tmp_path / "clip_vision_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))

    from_file, from_folder = load_clip(file), load_clip(folder)
    assert not from_file.has_text and from_file.image_size == 48
    images = [noise(30, size=70), flat()]
    assert torch.allclose(from_file.embed_images(images), from_folder.embed_images(images), atol=1e-5)

    report = evaluate_images([EvalImage(images[0], prompt="a sks man")], [images[1]], clip=file,
                             face_detector="hog")
    assert report.images[0].clip_i is not None and report.images[0].clip_t is None
    assert "needs the text tower" in report.unavailable["clip_t"]


def test_broken_clip_file_is_a_user_error(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "not_clip.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(UserError, match="not a CLIP vision model"):
        load_clip(file)
    pickle_file = tmp_path / "model.bin"
    pickle_file.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match="only safetensors"):
        load_clip(pickle_file)


# ---------------------------------------------------------------- folders and report files


def test_describe_images_from_names_and_prompts(tmp_path):
    names = ["lora_r4_forest_0.png", "lora_r16_desert_1.png", "dreambooth_mountains_0.png"]
    files = [tmp_path / n for n in names]
    described = describe_images(files, {"lora_r4_forest_0.png": {"prompt": "a sks man", "scene": "woods"}})
    assert [(d.method, d.rank, d.scene) for d in described] == [
        ("lora", 4, "woods"), ("lora", 16, "desert"), ("dreambooth", None, "mountains")]
    assert described[0].prompt == "a sks man" and described[1].prompt is None
    # one name that does not fit: no name is trusted
    mixed = describe_images(files + [tmp_path / "ComfyUI_00001_.png"])
    assert {(d.method, d.rank, d.scene) for d in mixed} == {("images", None, "")}


def test_run_evaluate_writes_report_files(tmp_path, tiny_clip, tiny_dino):
    images_dir, refs_dir, out_dir = tmp_path / "generated", tmp_path / "refs", tmp_path / "out"
    images_dir.mkdir(), refs_dir.mkdir()
    for p in SUBJECT[:3]:
        shutil.copy(p, refs_dir / p.name)
    shutil.copy(SUBJECT[3], images_dir / "lora_r4_forest_0.jpg")
    noise(40).save(images_dir / "lora_r4_desert_0.png")
    noise(41).save(images_dir / "lora_r8_forest_0.png")
    flat().save(images_dir / "dreambooth_forest_0.png")
    (images_dir / "notes.txt").write_text("not an image")
    (images_dir / "prompts.json").write_text(json.dumps(
        {"lora_r4_forest_0.jpg": {"prompt": "portrait of sks man, in the forest"}}))

    events = []
    report = run_evaluate(images_dir, refs_dir, out_dir, clip=tiny_clip, dino=tiny_dino,
                          face_detector="hog", progress=events.append)
    assert sorted(p.name for p in out_dir.iterdir()) == ["chart.png", "grid.png", "report.json", "table.txt"]
    data = json.loads((out_dir / "report.json").read_text())
    groups = {(a["method"], a["rank"]): a for a in data["aggregates"]["by_method_rank"]}
    assert set(groups) == {("dreambooth", None), ("lora", 4), ("lora", 8)}
    assert groups[("lora", 4)]["n"] == 2
    assert len(data["images"]) == 4 and len(data["aggregates"]["by_method_rank_scene"]) == 4
    with_prompt = [r for r in data["images"] if r["prompt"]]
    assert len(with_prompt) == 1 and with_prompt[0]["clip_t"] is not None
    assert "lora" in (out_dir / "table.txt").read_text()
    with Image.open(out_dir / "grid.png") as grid:
        assert grid.width == 2 * 224 and grid.height > 3 * 224  # 3 rows (dreambooth, lora r4, lora r8), 2 columns
    with Image.open(out_dir / "chart.png") as chart:
        assert chart.width > 100
    assert events and events[-1].step == events[-1].total
    if HAS_DLIB:
        assert groups[("lora", 4)]["presence"] == 0.5 and groups[("lora", 4)]["identity_match"] == 0.5
    assert report.images[0].method == "dreambooth"


def test_run_evaluate_rejects_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no images"):
        run_evaluate(empty, empty, tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        run_evaluate(tmp_path / "missing", empty, tmp_path / "out")
    images = tmp_path / "images"
    images.mkdir()
    flat().save(images / "a.png")
    bad = tmp_path / "prompts.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        run_evaluate(images, images, tmp_path / "out", prompts_file=bad)
    bad.write_text(json.dumps({"a.png": {"rank": "four"}}))
    with pytest.raises(UserError, match="not a whole number"):
        run_evaluate(images, images, tmp_path / "out", prompts_file=bad)
    assert not (tmp_path / "out").exists()
