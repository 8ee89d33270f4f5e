"""training/data/class_images.py: the keyed cache of class images for prior preservation."""
import json

import numpy as np
import pytest
from PIL import Image

from training.data.class_images import (CLASS_JSON, ClassImageConfig, class_image_folder, ensure_class_images,
                                   list_images)
from training.errors import UserError
from training.progress import Progress


class CountingGenerator:
    """Solid-colour images whose colour comes from the seed; records every call."""

    def __init__(self):
        self.calls = []

    @property
    def images_made(self) -> int:
        return sum(len(c["seeds"]) for c in self.calls)

    def __call__(self, prompts, negative, seeds, resolution, steps, guidance):
        self.calls.append({"prompts": list(prompts), "negative": negative, "seeds": list(seeds),
                           "resolution": resolution, "steps": steps, "guidance": guidance})
        return [Image.new("RGB", (resolution, resolution), (s * 37 % 256, s * 91 % 256, s * 53 % 256)) for s in seeds]


def _cfg(**kw):
    base = dict(class_word="dog", num=5, resolution=64, steps=3, batch_size=2, seed=100, negative="blurry")
    return ClassImageConfig(**{**base, **kw})


def test_first_run_generates_batched_seeded_images(tmp_path):
    gen = CountingGenerator()
    events = []
    report = ensure_class_images(gen, "base-a", tmp_path, _cfg(), progress=events.append)
    assert (report.generated, report.total) == (5, 5)
    assert [len(c["seeds"]) for c in gen.calls] == [2, 2, 1]
    assert [s for c in gen.calls for s in c["seeds"]] == [100, 101, 102, 103, 104]
    call = gen.calls[0]
    assert call["prompts"] == ["a photo of a dog"] * 2 and call["negative"] == "blurry"
    assert (call["resolution"], call["steps"], call["guidance"]) == (64, 3, 7.5)
    assert [p.name for p in report.images] == [f"class_{i:05d}.png" for i in range(5)]
    assert all(Image.open(p).size == (64, 64) for p in report.images)
    assert events[-1] == Progress("class images", 5, 5, events[-1].info)
    state = json.loads((report.folder / CLASS_JSON).read_text())
    assert state["key"]["base"] == "base-a" and state["key"]["prompt"] == "a photo of a dog"
    assert state["next_index"] == 5
    assert not list(report.folder.glob(".*.tmp"))


def test_second_run_generates_nothing_and_deleted_ones_are_refilled(tmp_path):
    gen = CountingGenerator()
    first = ensure_class_images(gen, "base-a", tmp_path, _cfg())
    made = gen.images_made

    again = ensure_class_images(gen, "base-a", tmp_path, _cfg())
    assert gen.images_made == made and again.generated == 0 and again.total == 5

    bad = first.images[1:3]
    for p in bad:
        p.unlink()
    refill = ensure_class_images(gen, "base-a", tmp_path, _cfg())
    assert refill.generated == 2 and gen.images_made == made + 2 and refill.total == 5
    # fresh indices and seeds: the deleted (bad) images do not come back
    assert gen.calls[-1]["seeds"] == [105, 106]
    assert not any(p.exists() for p in bad)
    assert ensure_class_images(gen, "base-a", tmp_path, _cfg()).generated == 0


def test_users_own_images_count(tmp_path):
    gen = CountingGenerator()
    folder = class_image_folder(tmp_path, "base-a", _cfg())
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (80, 80), (i, i, i)).save(folder / f"mine_{i}.JPG")
    (folder / "notes.txt").write_text("not an image")
    report = ensure_class_images(gen, "base-a", tmp_path, _cfg())
    assert report.generated == 2 and gen.images_made == 2 and report.total == 5
    assert len(list_images(folder)) == 5


def test_any_key_change_is_another_folder(tmp_path):
    gen = CountingGenerator()
    folders = {ensure_class_images(gen, "base-a", tmp_path, _cfg()).folder}
    for base, change in [("base-b", {}), ("base-a", {"prompt": "a {class_word} outdoors"}),
                         ("base-a", {"negative": ""}), ("base-a", {"resolution": 128}), ("base-a", {"steps": 4}),
                         ("base-a", {"sampler": "euler"}), ("base-a", {"seed": 1}), ("base-a", {"guidance": 5.0})]:
        folders.add(ensure_class_images(gen, base, tmp_path, _cfg(**change)).folder)
    assert len(folders) == 9 and gen.images_made == 45
    # batch size and num are not part of the key: more images top up the same folder
    report = ensure_class_images(gen, "base-a", tmp_path, _cfg(num=7, batch_size=5))
    assert report.folder in folders and report.generated == 2


def test_lost_json_keeps_indices_fresh(tmp_path):
    gen = CountingGenerator()
    report = ensure_class_images(gen, "base-a", tmp_path, _cfg(num=3))
    (report.folder / CLASS_JSON).unlink()
    report.images[0].unlink()
    ensure_class_images(gen, "base-a", tmp_path, _cfg(num=3))
    assert gen.calls[-1]["seeds"] == [103]  # after the highest index on disk, not a reuse of index 0


@pytest.mark.parametrize("change,match", [({"num": -1}, "num"), ({"resolution": 60}, "resolution"),
                                          ({"class_word": " "}, "class_word"), ({"steps": 0}, "steps"),
                                          ({"guidance": "high"}, "guidance"), ({"prompt": ""}, "prompt")])
def test_bad_config_names_the_field(change, match):
    with pytest.raises(UserError, match=match):
        _cfg(**change).validate()


@pytest.mark.parametrize("change,match", [({"prompt": "a photo of a {clss}"}, r"class prompt has \{clss\}"),
                                          ({"prompt": "{token} {class}"}, r"class prompt has \{token\}"),
                                          ({"negative": "blurry }"}, r"negative prompt has \}")])
def test_braces_that_would_reach_the_model_are_refused(change, match):
    with pytest.raises(UserError, match=match + ".*remove"):
        _cfg(**change).validate()


def test_class_is_filled_in_the_negative_too(tmp_path):
    gen = CountingGenerator()
    ensure_class_images(gen, "base-a", tmp_path, _cfg(num=1, negative="a drawing of a {class}"))
    assert gen.calls[0]["negative"] == "a drawing of a dog"


def test_real_tiny_pipeline_cache(tmp_path, tiny):
    """The lead's sampler on `tiny`: images at the asked size, deterministic, and cached."""
    from training.sampling import make_generator

    real = make_generator(tiny, "ddim")
    calls = []

    def counted(*args):
        calls.append(len(args[0]))
        return real(*args)

    cfg = ClassImageConfig(class_word="man", num=3, resolution=64, steps=2, batch_size=2, seed=7)
    report = ensure_class_images(counted, tiny.sha256, tmp_path, cfg)
    assert calls == [2, 1] and report.total == 3
    first = [np.asarray(Image.open(p)) for p in report.images]
    assert all(a.shape == (64, 64, 3) for a in first)
    assert ensure_class_images(counted, tiny.sha256, tmp_path, cfg).generated == 0 and calls == [2, 1]
    report.images[0].unlink()
    again = ensure_class_images(counted, tiny.sha256, tmp_path, cfg)
    assert again.generated == 1 and calls == [2, 1, 1]
    # image i depends on its seed alone (not on its batch): redone alone, index 1 matches up to rounding
    redo = np.asarray(real(["a photo of a man"], "", [7 + 1], 64, 2, 7.5)[0]).astype(int)
    assert np.abs(redo - first[1]).max() <= 3 < np.abs(redo - first[0]).max()


def test_cli_class_images_on_tiny(tmp_path, capsys):
    from training.cli import main

    argv = ["class-images", "--base", "tiny", "--class-word", "man", "--num", "2", "--out", str(tmp_path),
            "--steps", "2", "--seed", "3", "--negative", "blurry"]
    assert main(argv) == 0
    assert "generated 2; 2 in" in capsys.readouterr().out
    assert main(argv) == 0
    assert "generated none" in capsys.readouterr().out
    assert main(argv[:-2] + ["--sampler", "magic"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--sampler" in err and "\n" not in err
