"""training/data/prepare.py and the `prepare` command: real photos, the cache, foreign folders, errors."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import PHOTOS, SUBJECT, photo_like
from training.data import dataset, prepare
from training.data.crop import Box, detect_faces
from training.data.dataset import PrepareConfig, load_dataset
from training.data.prepare import prepare_dataset, prepare_from_images
from training.errors import UserError
from training.progress import Cancelled


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("face") / "out"
    return prepare_dataset(SUBJECT, out, PrepareConfig()), out


# ---------------------------------------------------------------- real photos, face crops


def test_every_face_crop_holds_the_whole_detected_face(face_run):
    report, out = face_run
    assert len(PHOTOS) == 6 and report.kept == 6
    assert report.faces_found == 6
    for item in report.items:
        crop, face = Box(*item.crop_box), Box(*item.face_box)
        assert crop.width == pytest.approx(crop.height)
        assert crop.contains(face, tolerance=0.01), item
        # the face sits in the upper-middle of the square unless the photo's edge forced it lower
        centre_y = ((face.y0 + face.y1) / 2 - crop.y0) / crop.height
        assert 0.2 < centre_y < 0.65, (item.source, centre_y)
        # the detector is independent of our bookkeeping: it finds the face on the crop itself
        with Image.open(out / item.image) as im:
            assert im.size == (512, 512) and im.mode == "RGB"
            assert detect_faces(im.convert("RGB")), f"no face in the crop of {item.source}"


def test_face_run_writes_captions_sheet_and_json(face_run):
    report, out = face_run
    doc = json.loads((out / "dataset.json").read_text())
    assert [i["source"] for i in doc["items"]] == [p.name for p in PHOTOS]
    assert all(len(i["sha256"]) == 64 and i["face_found"] for i in doc["items"])
    assert (out / "input__foreground__01.txt").read_text() == "a photo of sks man"
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width >= 3 * 128 and sheet.height >= 2 * 128
    # the two licence/source texts are reported, not silently dropped
    assert {s.source for s in report.skipped} == {"LICENSE.MIT.txt", "SOURCE.txt"}
    text = report.text()
    assert "faces found: 6 of 6" in text and "SOURCE.txt" in text and len(text.splitlines()) <= 24
    assert not list(out.glob(".*tmp*"))


def test_load_dataset_gives_the_trainer_items_and_repeats(tmp_path):
    report = prepare_dataset(SUBJECT, tmp_path / "o", PrepareConfig(crop="center", flip=True, repeats=3, token="ohwx",
                                                                    class_word="person"))
    ds = load_dataset(tmp_path / "o")
    assert len(ds) == 12 and sum(i.flipped for i in ds.items) == 6
    assert len(ds.training_items()) == 36
    assert ds.instance_prompt == "a photo of ohwx person" and ds.items[0].caption == "a photo of ohwx person"
    first, mirror = ds.items[0], ds.items[1]
    assert mirror.flipped and mirror.image.name == Path(first.image).stem + "_flip.png"
    a, b = np.asarray(Image.open(first.image)), np.asarray(Image.open(mirror.image))
    assert np.array_equal(a[:, ::-1], b)
    assert report.faces_found == 0  # center mode does not look for faces


# ---------------------------------------------------------------- cache, atomicity, errors


def test_rerun_reuses_everything_and_detects_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(SUBJECT, src)
    out = tmp_path / "o"
    prepare_dataset(src, out, PrepareConfig())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = []
    monkeypatch.setattr("training.data.crop.detect_faces", lambda *a, **k: calls.append(1) or [])
    t0 = time.perf_counter()
    report = prepare_dataset(src, out, PrepareConfig())
    assert time.perf_counter() - t0 < 1.5
    assert report.reused == 6 and calls == [] and report.faces_found == 6
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten

    # a new caption only rewrites that caption; a changed photo redoes that photo only
    (src / "input__half_body__01.txt").write_text("sks hiking")
    Image.open(PHOTOS[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / PHOTOS[2].name)
    report = prepare_dataset(src, out, PrepareConfig())
    assert report.reused == 5 and len(calls) == 1
    assert (out / "input__half_body__01.txt").read_text() == "sks hiking"
    assert (out / "input__half_body__01.png").stat().st_mtime_ns == stamps["input__half_body__01.png"]

    # a removed photo's outputs go; another resolution redoes every crop
    (src / PHOTOS[0].name).unlink()
    report = prepare_dataset(src, out, PrepareConfig(resolution=256, crop="center"))
    assert report.reused == 0 and not (out / "input__foreground__01.png").exists()
    assert Image.open(out / "input__foreground__03.png").size == (256, 256)


def test_interrupted_run_never_looks_finished(tmp_path):
    out = tmp_path / "o"
    prepare_dataset(SUBJECT, out, PrepareConfig(crop="center"))

    def stop_at_third(event):
        if event.step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        prepare_dataset(SUBJECT, out, PrepareConfig(crop="pad"), progress=stop_at_third)
    with pytest.raises(UserError, match="did not finish"):
        load_dataset(out)
    assert not list(out.glob(".*.tmp"))
    assert (out / dataset.UNFINISHED).is_file()  # the crops there are ours: the re-run may replace them
    report = prepare_dataset(SUBJECT, out, PrepareConfig(crop="pad"))
    assert report.kept == 6 and load_dataset(out).config.crop == "pad"
    assert not (out / dataset.UNFINISHED).exists()


@pytest.mark.parametrize("change,match", [
    ({"resolution": 500}, "resolution"), ({"resolution": 32}, "resolution"), ({"crop": "square"}, "crop"),
    ({"token": ""}, "token"), ({"repeats": 0}, "repeats"), ({"caption_template": "a photo"}, "caption_template"),
    ({"caption_template": "{token} {name}"}, "caption_template"),
])
def test_bad_config_names_the_field(change, match):
    with pytest.raises(UserError, match=match):
        PrepareConfig(**change).validate()


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "o", PrepareConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=str(empty)):
        prepare_dataset(empty, tmp_path / "o", PrepareConfig())
    (empty / "x.jpg").write_text("no")
    with pytest.raises(UserError, match="x.jpg: not an image"):
        prepare_dataset(empty, tmp_path / "o", PrepareConfig())
    assert not (tmp_path / "o").exists()  # nothing written for a failed run
    with pytest.raises(UserError, match="photo folder itself"):
        prepare_dataset(SUBJECT, SUBJECT, PrepareConfig())
    with pytest.raises(UserError, match="no dataset.json"):
        load_dataset(empty)


def _foreign_folder(root: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A photo folder (one photo, `me.jpg`) and a folder of the user's own kohya-style files: a pair
    with the stem of that photo (`me.png`, `me.txt`) and an unrelated file."""
    src, theirs = root / "photos", root / "my_set"
    src.mkdir()
    theirs.mkdir()
    shutil.copy(PHOTOS[0], src / "me.jpg")
    photo_like((80, 80)).save(theirs / "me.png")
    (theirs / "me.txt").write_text("my own caption")
    (theirs / "notes.md").write_text("mine")
    return src, theirs, _contents(theirs)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_foreign_folder_is_never_overwritten_without_overwrite(tmp_path):
    src, theirs, before = _foreign_folder(tmp_path)
    cfg = PrepareConfig(resolution=64, crop="center")
    taken = r"my_set has no dataset.json from prepare but already holds me\.png, me\.txt,"
    with pytest.raises(UserError, match=taken) as refused:
        prepare_dataset(src, theirs, cfg)
    assert "choose an empty or new folder for --out, or pass --overwrite" in str(refused.value)
    assert _contents(theirs) == before  # nothing written, not even the unfinished marker

    report = prepare_dataset(src, theirs, cfg, overwrite=True)
    assert report.items[0].image == "me.png" and (theirs / "me.txt").read_text() == "a photo of sks man"
    assert (theirs / "notes.md").read_bytes() == before["notes.md"]  # not one of our names: left alone
    # now it is ours (it has our dataset.json): a re-run needs no flag and reuses the crop
    assert prepare_dataset(src, theirs, cfg).reused == 1


def test_a_foreign_folder_is_written_into_when_no_name_is_taken(tmp_path):
    src, theirs, before = _foreign_folder(tmp_path)
    for name in ("me.png", "me.txt"):
        (theirs / name).unlink()
    (theirs / "me_flip.txt").write_text("mine too")
    with pytest.raises(UserError, match="me_flip.txt"):  # with flip, the mirror's names are ours too
        prepare_dataset(src, theirs, PrepareConfig(resolution=64, crop="center", flip=True))
    report = prepare_dataset(src, theirs, PrepareConfig(resolution=64, crop="center"))
    assert report.kept == 1 and (theirs / "dataset.json").is_file()
    assert (theirs / "notes.md").read_bytes() == before["notes.md"]
    assert (theirs / "me_flip.txt").read_text() == "mine too"


def test_one_usable_photo_is_prepared_with_a_warning(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(PHOTOS[0], src / "only.jpg")
    (src / "notes.jpg").write_text("not a picture")
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert report.kept == 1 and report.warnings == [prepare.ONE_PHOTO_WARNING]
    assert "only one usable photo" in report.text() and "10-20 varied photos" in report.text()
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["warnings"] == [prepare.ONE_PHOTO_WARNING]
    assert len(load_dataset(tmp_path / "o")) == 1  # a warning, not a refusal: it trains

    shutil.copy(PHOTOS[1], src / "second.jpg")  # two photos: no warning, and none left in dataset.json
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert report.warnings == [] and "warning" not in report.text()
    assert "warnings" not in json.loads((tmp_path / "o" / "dataset.json").read_text())


def test_prepare_from_images_for_the_node(tmp_path):
    images = [photo_like((300, 200)), Image.new("RGBA", (64, 64), (0, 0, 0, 0))]
    report = prepare_from_images(images, tmp_path / "o", PrepareConfig(resolution=128))
    assert [i.image for i in report.items] == ["image_0001.png", "image_0002.png"]
    assert report.items[0].face_found and not report.items[1].face_found
    assert report.items[1].upscaled
    assert prepare_from_images(images, tmp_path / "o", PrepareConfig(resolution=128)).reused == 2


def test_the_nodes_folder_stays_ours_after_a_first_run_is_stopped(tmp_path):
    """The node calls without `overwrite`: a first run stopped after one crop (no dataset.json yet)
    must not make its own folder look foreign to the next run."""
    images, out = [photo_like((96, 96)), photo_like((64, 80))], tmp_path / "node_out"

    def stop_after_first(event):
        if event.step == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        prepare_from_images(images, out, PrepareConfig(resolution=64, crop="center"), progress=stop_after_first)
    assert (out / "image_0001.png").is_file() and not (out / "dataset.json").exists()
    assert prepare_from_images(images, out, PrepareConfig(resolution=64, crop="center")).kept == 2


# ---------------------------------------------------------------- CLI


def _cli(*argv):
    from training.cli import main

    return main(list(argv))


def test_cli_prepare_prints_the_report(tmp_path, capsys):
    assert _cli("prepare", str(SUBJECT), "--out", str(tmp_path / "o"), "--resolution", "128", "--crop", "face",
                "--token", "ohwx", "--caption-template", "{token} portrait") == 0
    printed = capsys.readouterr().out
    assert "Prepared 6 of 8 files" in printed and "faces found: 6 of 6" in printed
    assert (tmp_path / "o" / "input__foreground__01.txt").read_text() == "ohwx portrait"


@pytest.mark.parametrize("argv,needle", [
    (["--crop", "square"], "crop"), (["--resolution", "100"], "resolution"), (["--resolution", "big"], "--resolution"),
])
def test_cli_prepare_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    assert _cli("prepare", str(SUBJECT), "--out", str(tmp_path / "o"), *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and err.startswith("error:")


def test_cli_prepare_into_a_foreign_folder_needs_overwrite(tmp_path, capsys):
    src, theirs, before = _foreign_folder(tmp_path)
    argv = ["prepare", str(src), "--out", str(theirs), "--resolution", "64", "--crop", "center"]
    assert _cli(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "--overwrite" in err and str(theirs) in err
    assert _contents(theirs) == before
    assert _cli(*argv, "--overwrite") == 0
    assert "Prepared 1 of 1 files" in capsys.readouterr().out
    assert (theirs / "me.png").read_bytes() != before["me.png"]


def test_cli_prepare_missing_folder(tmp_path, capsys):
    assert _cli("prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err
