"""training/dataset.py and the `prepare` command: real photos, generated edge files, the cache."""
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import dataset
from training.dataset import (Box, PrepareConfig, caption_for, center_crop_box, face_crop_box, load_dataset,
                              open_photo, pad_box, prepare_dataset, prepare_from_images, render_square)
from training.errors import UserError
from training.progress import Cancelled

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = ROOT / "training" / "sample_data" / "subject"
PHOTOS = sorted(SUBJECT.glob("*.jpg"))


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
            assert dataset.detect_faces(im.convert("RGB")), f"no face in the crop of {item.source}"


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


# ---------------------------------------------------------------- crop geometry (pure)


@pytest.mark.parametrize("face,size", [
    (Box(400, 300, 600, 560), (1000, 1500)),  # ordinary portrait
    (Box(0, 0, 120, 160), (800, 600)),  # face in the top-left corner
    (Box(700, 450, 800, 590), (800, 600)),  # face in the bottom-right corner
    (Box(10, 50, 390, 560), (400, 600)),  # face wider than a head-and-shoulders crop allows
    (Box(-20, 40, 430, 640), (400, 700)),  # face box taller than the image is wide: must pad
    (Box(3.7, 2.2, 5.1, 4.9), (8, 8)),  # tiny image, fractional box
])
def test_face_crop_box_never_cuts_the_face(face, size):
    box = face_crop_box(face, size)
    clipped = Box(max(face.x0, 0), max(face.y0, 0), min(face.x1, size[0]), min(face.y1, size[1]))
    assert box.width == box.height and box.width == int(box.width)
    assert box.contains(clipped)
    if box.width <= min(size):  # fits: stays inside the photo, no padding
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= size[0] and box.y1 <= size[1]
    else:
        assert box.width == pytest.approx(max(clipped.width, clipped.height), abs=1)


def test_face_crop_box_frames_head_and_shoulders():
    face = Box(450, 400, 550, 530)  # small face in a big photo: room all around
    box = face_crop_box(face, (1000, 1400))
    assert box.width == pytest.approx(130 / dataset.FACE_HEIGHT_FRACTION, abs=1)
    assert (face.x0 + face.x1) / 2 == pytest.approx((box.x0 + box.x1) / 2, abs=1)
    assert ((face.y0 + face.y1) / 2 - box.y0) / box.height == pytest.approx(dataset.FACE_CENTER_Y, abs=0.01)


def test_center_and_pad_boxes_and_padding():
    assert center_crop_box((300, 200)) == Box(50, 0, 250, 200)
    assert pad_box((300, 200)) == Box(0, -50, 300, 250)
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    square = np.asarray(render_square(red, pad_box(red.size), 96))
    assert tuple(square[2, 48]) == dataset.PAD_COLOR and tuple(square[48, 48]) == (255, 0, 0)


# ---------------------------------------------------------------- edge files


def _photo_like(size):
    """A real photo (the subject), resized: faces and textures, not flat colour."""
    with Image.open(PHOTOS[1]) as im:
        return im.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def _jpeg(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _halves(w=120, h=80):
    """Left half red, right half blue: shows which way an image was turned."""
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))
    return im


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(_halves(), exif=exif.tobytes())


@pytest.fixture(scope="module")
def edge_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge")
    Image.new("CMYK", (96, 96), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    ramp = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    Image.fromarray(ramp).save(d / "gray16.png")
    rgba = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (0, 0, 48, 96))
    rgba.save(d / "alpha.PNG")
    Image.new("RGB", (96, 96), (10, 20, 200)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    (d / "rot6.jpg").write_bytes(_exif_jpeg(6))
    (d / "rot8.JPEG").write_bytes(_exif_jpeg(8))
    for name, kw in (("phone.jpg", {"format": "MPO"}), ("anim.gif", {}), ("pages.TIF", {})):  # the MPO is named .jpg
        first, second = Image.new("RGB", (96, 96), (250, 0, 0)), Image.new("RGB", (96, 96), (0, 0, 250))
        first.save(d / name, save_all=True, append_images=[second], **kw)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "dot.bmp")
    (d / "notes.jpg").write_text("this is not a picture\n")
    whole = _jpeg(_photo_like((640, 480)))
    (d / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "big.jpg").write_bytes(_jpeg(_photo_like((4000, 3000))))
    _photo_like((256, 256)).save(d / "photo.webp")
    return d


@pytest.fixture(scope="module")
def edge_run(edge_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge_out") / "out"
    return prepare_dataset(edge_folder, out, PrepareConfig(resolution=64, crop="pad")), out


def _crop_of(run, source) -> np.ndarray:
    report, out = run
    item = next(i for i in report.items if i.source == source)
    return np.asarray(Image.open(out / item.image)).astype(int)


def test_edge_files_kept_and_skipped_with_reasons(edge_run):
    report, _ = edge_run
    skipped = {s.source: s.reason for s in report.skipped}
    assert set(skipped) == {"notes.jpg", "broken.jpg"}
    assert "not an image" in skipped["notes.jpg"]
    assert "truncated" in skipped["broken.jpg"]
    kept = {i.source for i in report.items}
    assert kept == {"cmyk.jpg", "gray16.png", "alpha.PNG", "palette.png", "rot6.jpg", "rot8.JPEG", "phone.jpg",
                    "anim.gif", "pages.TIF", "dot.bmp", "big.jpg", "photo.webp"}
    assert "notes.jpg: not an image" in report.text()


def test_modes_become_8bit_rgb(edge_run):
    assert np.abs(_crop_of(edge_run, "cmyk.jpg")[32, 32] - [255, 0, 0]).max() < 40
    gray = _crop_of(edge_run, "gray16.png")
    assert gray[1, 32, 0] < 30 and gray[62, 32, 0] > 225  # a full ramp, not clipped to white
    assert 100 < gray[32, 32, 0] < 160
    alpha = _crop_of(edge_run, "alpha.PNG")
    assert list(alpha[32, 8]) == [0, 128, 0] and list(alpha[32, 56]) == [255, 255, 255]  # composited on white
    assert np.abs(_crop_of(edge_run, "palette.png")[32, 32] - [10, 20, 200]).max() < 12


# 6: the camera was turned clockwise (display rotated 90 deg CW: the left half goes on top); 8: the other way
@pytest.mark.parametrize("source,top,bottom", [("rot6.jpg", "red", "blue"), ("rot8.JPEG", "blue", "red")])
def test_exif_orientation_applied(edge_run, source, top, bottom):
    report, _ = edge_run
    item = next(i for i in report.items if i.source == source)
    assert item.source_size == (80, 120)  # portrait after rotation
    crop = _crop_of(edge_run, source)
    # padded left and right (portrait), and the halves now lie top and bottom
    assert list(crop[32, 2]) == [255, 255, 255]
    colour = {"red": 0, "blue": 2}
    assert crop[8, 32, colour[top]] > 200 and crop[56, 32, colour[bottom]] > 200


@pytest.mark.parametrize("source", ["phone.jpg", "anim.gif", "pages.TIF"])
def test_multi_frame_files_give_their_first_frame(edge_run, source):
    report, _ = edge_run
    crop = _crop_of(edge_run, source)
    assert crop[32, 32, 0] > 200 and crop[32, 32, 2] < 50  # red first frame, not the blue second
    item = next(i for i in report.items if i.source == source)
    assert any("2 frames" in w for w in item.warnings)


def test_tiny_image_is_upscaled_and_flagged(edge_run):
    report, _ = edge_run
    item = next(i for i in report.items if i.source == "dot.bmp")
    assert item.upscaled and any("upscaled from 1 px" in w for w in item.warnings)
    assert list(_crop_of(edge_run, "dot.bmp")[32, 32]) == [9, 9, 9]
    assert "dot.bmp" in report.text()


def test_big_photo_is_decoded_downscaled(edge_folder):
    data = (edge_folder / "big.jpg").read_bytes()
    t0 = time.perf_counter()
    small = open_photo(data, min_side=512)
    t_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = open_photo(data)
    t_full = time.perf_counter() - t0
    assert full.image.size == (4000, 3000) and small.full_size == (4000, 3000)
    assert small.image.size == (1000, 750) and small.scale == 4.0  # JPEG draft at 1/4, short side >= 512
    assert t_small < t_full


def test_big_photo_face_crop_in_source_pixels(edge_folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(edge_folder / "big.jpg", src)
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig())
    item = report.items[0]
    assert item.face_found and item.source_size == (4000, 3000)
    assert Box(*item.crop_box).contains(Box(*item.face_box), tolerance=0.01)
    assert Box(*item.crop_box).width > 1000 and not item.upscaled


def test_decompression_bomb_is_skipped_not_raised(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    _photo_like((300, 300)).save(src / "bomb.png")
    _photo_like((40, 40)).save(src / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 90,000 px > 2x the limit: Pillow raises
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert [i.source for i in report.items] == ["ok.png"]
    assert "too many pixels" in report.skipped[0].reason


# ---------------------------------------------------------------- captions


def test_captions_from_template_and_sidecars(tmp_path):
    cfg = PrepareConfig(token="zwx", class_word="dog", caption_template="{token} {class_word}, studio photo")
    assert caption_for(cfg, None) == ("zwx dog, studio photo", "template", [])
    assert caption_for(cfg, "  a {token} {class_word}\non a beach ")[0] == "a zwx dog on a beach"
    assert caption_for(cfg, "zwx running")[0] == "zwx running"
    caption, origin, notes = caption_for(cfg, "a dog running")
    assert caption == "zwx, a dog running" and origin == "sidecar" and notes
    assert caption_for(cfg, "zwxy is not the token")[0].startswith("zwx, ")

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(PHOTOS[0], src / name)
    (src / "a.txt").write_text("{token} on a bench", encoding="utf-8")
    out = tmp_path / "o"
    report = prepare_dataset(src, out, cfg.__class__(**{**cfg.__dict__, "crop": "center"}))
    assert (out / "a.txt").read_text() == "zwx on a bench"
    assert (out / "b.txt").read_text() == "zwx dog, studio photo"
    assert {i.caption_source for i in report.items} == {"sidecar", "template"}
    assert not report.skipped  # a.txt is a caption, not a skipped file


# ---------------------------------------------------------------- cache, atomicity, errors


def test_rerun_reuses_everything_and_detects_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(SUBJECT, src)
    out = tmp_path / "o"
    prepare_dataset(src, out, PrepareConfig())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = []
    monkeypatch.setattr(dataset, "detect_faces", lambda *a, **k: calls.append(1) or [])
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
    _photo_like((80, 80)).save(theirs / "me.png")
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
    assert report.kept == 1 and report.warnings == [dataset.ONE_PHOTO_WARNING]
    assert "only one usable photo" in report.text() and "10-20 varied photos" in report.text()
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["warnings"] == [dataset.ONE_PHOTO_WARNING]
    assert len(load_dataset(tmp_path / "o")) == 1  # a warning, not a refusal: it trains

    shutil.copy(PHOTOS[1], src / "second.jpg")  # two photos: no warning, and none left in dataset.json
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert report.warnings == [] and "warning" not in report.text()
    assert "warnings" not in json.loads((tmp_path / "o" / "dataset.json").read_text())


def test_prepare_from_images_for_the_node(tmp_path):
    images = [_photo_like((300, 200)), Image.new("RGBA", (64, 64), (0, 0, 0, 0))]
    report = prepare_from_images(images, tmp_path / "o", PrepareConfig(resolution=128))
    assert [i.image for i in report.items] == ["image_0001.png", "image_0002.png"]
    assert report.items[0].face_found and not report.items[1].face_found
    assert report.items[1].upscaled
    assert prepare_from_images(images, tmp_path / "o", PrepareConfig(resolution=128)).reused == 2


def test_the_nodes_folder_stays_ours_after_a_first_run_is_stopped(tmp_path):
    """The node calls without `overwrite`: a first run stopped after one crop (no dataset.json yet)
    must not make its own folder look foreign to the next run."""
    images, out = [_photo_like((96, 96)), _photo_like((64, 80))], tmp_path / "node_out"

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
