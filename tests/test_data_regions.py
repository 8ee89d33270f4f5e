"""training/data/regions.py and prepare's subject regions: from the face, from a user mask, none."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_helpers import PHOTOS, SUBJECT
from training.data.crop import Box
from training.data.dataset import PrepareConfig, load_dataset
from training.data.prepare import prepare_dataset, prepare_from_images
from training.data.regions import HEAD_ABOVE, HEAD_BELOW, HEAD_WIDTH, head_and_shoulders, subject_map


def test_head_and_shoulders_rule_in_crop_pixels():
    crop = Box(100, 50, 500, 450)  # 400 source px -> a 200 px crop: scale 0.5
    face = Box(260, 130, 340, 230)  # 80 x 100 source px -> 40 x 50 crop px at (80, 40)
    region = head_and_shoulders(face, crop, 200)
    assert region.x0 == pytest.approx(100 - HEAD_WIDTH * 40 / 2) and region.x1 == pytest.approx(100 + HEAD_WIDTH * 40 / 2)
    assert region.y0 == pytest.approx(40 - HEAD_ABOVE * 50) and region.y1 == pytest.approx(40 + HEAD_BELOW * 50)
    # clipped to the crop
    big = head_and_shoulders(Box(120, 60, 480, 400), crop, 200)
    assert (big.x0, big.y0, big.x1, big.y1) == (0.0, 0.0, 200.0, 200.0)


def test_face_regions_hold_the_face_and_stay_in_the_crop(tmp_path):
    report = prepare_dataset(SUBJECT, tmp_path / "o", PrepareConfig(resolution=128))
    for item in report.items:
        crop, face, region = Box(*item.crop_box), Box(*item.face_box), Box(*item.subject_box)
        scale = 128 / crop.width
        face_in_crop = Box(*(min(max((v - o) * scale, 0), 128) for v, o in
                             zip((face.x0, face.y0, face.x1, face.y1), (crop.x0, crop.y0, crop.x0, crop.y0))))
        assert region.contains(face_in_crop, tolerance=0.01), item.source
        assert Box(0, 0, 128, 128).contains(region)
        assert region.width * region.height < 128 * 128  # some background is left out
    assert "6 from faces, 0 from masks, 0 without" in report.text()
    doc = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert all(len(i["subject_box"]) == 4 and i["subject_mask"] is None for i in doc["items"])


def _masked_folder(root):
    """p0 with a mask (left half white), p1 without, and a mask whose photo is missing."""
    src = root / "photos"
    src.mkdir()
    for i in range(2):
        shutil.copy(PHOTOS[i], src / f"p{i}.jpg")
    size = Image.open(PHOTOS[0]).size
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    mask.save(src / "p0_mask.png")
    Image.new("L", (8, 8), 255).save(src / "lost_mask.png")
    return src


def test_a_user_mask_is_cropped_like_the_photo_and_never_trained_on(tmp_path):
    src = _masked_folder(tmp_path)
    out = tmp_path / "o"
    report = prepare_dataset(src, out, PrepareConfig(resolution=64, crop="pad", flip=True))
    assert [i.source for i in report.items] == ["p0.jpg", "p1.jpg"]  # the masks are not photos
    assert {s.source: s.reason for s in report.skipped}["lost_mask.png"].startswith("a mask without its photo")
    p0, p1 = report.items
    assert p0.subject_mask == "p0_mask.png" and p0.subject_box is None
    assert p1.subject_mask is None and p1.subject_box is None  # pad mode finds no face: no region
    with Image.open(out / "p0_mask.png") as im:
        cropped = np.asarray(im)
    assert cropped.shape == (64, 64)
    assert cropped[32, 4] > 250 and cropped[32, 60] < 5  # left half subject, right half background
    ds = load_dataset(out)
    plain, mirror, other, _ = ds.items
    grid = ds.subject_map(plain, 8)
    assert grid[4, 0] == 1.0 and grid[4, 7] == 0.0
    assert np.array_equal(ds.subject_map(mirror, 8), grid[:, ::-1])  # the flipped copy's region is flipped
    assert ds.subject_map(other, 8) is None

    # a changed mask redoes that photo only; a removed one removes its cropped mask
    Image.new("L", (10, 10), 255).save(src / "p0_mask.png")
    again = prepare_dataset(src, out, PrepareConfig(resolution=64, crop="pad", flip=True))
    assert again.reused == 1 and np.asarray(Image.open(out / "p0_mask.png")).min() > 250
    (src / "p0_mask.png").unlink()
    third = prepare_dataset(src, out, PrepareConfig(resolution=64, crop="pad", flip=True))
    assert third.items[0].subject_mask is None and not (out / "p0_mask.png").exists()


def test_a_mask_of_another_shape_is_a_warning_not_a_region(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(PHOTOS[0], src / "p.jpg")  # square
    Image.new("L", (40, 20), 255).save(src / "p_mask.png")
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert report.items[0].subject_mask is None
    assert any("its mask is 40x20" in w for w in report.items[0].warnings)


def test_masks_from_the_node_batch(tmp_path):
    images = [Image.open(PHOTOS[0]).convert("RGB"), Image.open(PHOTOS[1]).convert("RGB")]
    masks = [Image.new("L", images[0].size, 255), Image.new("L", images[1].size, 0)]
    report = prepare_from_images(images, tmp_path / "o", PrepareConfig(resolution=64, crop="center"), masks=masks)
    assert [i.subject_mask for i in report.items] == ["image_0001_mask.png", "image_0002_mask.png"]
    ds = load_dataset(tmp_path / "o")
    assert ds.subject_map(ds.items[0], 8).min() == 1.0 and ds.subject_map(ds.items[1], 8).max() == 0.0


def test_subject_map_is_the_share_of_each_latent_cell_inside():
    region = Image.new("L", (64, 64), 0)
    region.paste(255, (0, 0, 12, 64))  # 12 px: one and a half cells of 8
    grid = subject_map(region, 8)
    assert grid.dtype == np.float32 and grid[0, 0] == 1.0 and grid[0, 1] == 0.5 and grid[0, 2:].max() == 0.0


def test_the_contact_sheet_tints_outside_the_region(tmp_path):
    src = _masked_folder(tmp_path)
    prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=128, crop="pad"))
    sheet = np.asarray(Image.open(tmp_path / "o" / "contact_sheet.png").convert("RGB")).astype(int)
    crop = np.asarray(Image.open(tmp_path / "o" / "p0.png").resize((128, 128))).astype(int)
    pad = 8  # the first tile's corner on the sheet
    inside, outside = sheet[pad + 64, pad + 20], sheet[pad + 64, pad + 108]
    assert np.abs(inside - crop[64, 20]).max() <= 2  # the subject as it is
    assert np.abs(outside - crop[64, 108]).max() > 20 and outside[2] >= outside[0]  # tinted blue
    assert sheet.shape[0] > 128 + 16 + 2 * pad  # room for the legend below the grid


def test_the_prepare_node_takes_an_optional_mask_batch_white_on_the_subject():
    import torch

    from fixture_paths import load_pack

    load_pack()
    from pack_offline.nodes import dataset as node

    assert node.PrepareSubjectDataset.INPUT_TYPES()["optional"]["masks"][0] == "MASK"
    masks = torch.zeros(2, 4, 6)
    masks[0, :, :3] = 1.0
    pils = node._mask_pils(masks)
    assert [p.mode for p in pils] == ["L", "L"] and pils[0].size == (6, 4)
    assert np.asarray(pils[0])[0].tolist() == [255, 255, 255, 0, 0, 0] and np.asarray(pils[1]).max() == 0
