"""training/data/photos.py through prepare: generated edge files (modes, EXIF, frames, sizes, bombs)."""
import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from data_helpers import photo_like
from training.data.crop import Box
from training.data.dataset import PrepareConfig
from training.data.photos import open_photo
from training.data.prepare import prepare_dataset


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
    whole = _jpeg(photo_like((640, 480)))
    (d / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "big.jpg").write_bytes(_jpeg(photo_like((4000, 3000))))
    photo_like((256, 256)).save(d / "photo.webp")
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
    photo_like((300, 300)).save(src / "bomb.png")
    photo_like((40, 40)).save(src / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 90,000 px > 2x the limit: Pillow raises
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert [i.source for i in report.items] == ["ok.png"]
    assert "too many pixels" in report.skipped[0].reason

