"""Tests for training/eval/face_descriptor.py: the torch port of dlib's face descriptor equals dlib's own
(chips bit for bit, descriptors within 1e-4) on every real face we have: the repo's photos, and
../shared/data when it is there. Landmarks come from dlib, as they will at preparation time."""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixture_paths import OTHER_PEOPLE, ROOT, SUBJECT_PHOTOS
from training.errors import UserError
from training.eval.face_descriptor import FaceDescriptor, chip_transform, extract_chips, parse_dlib_face_model

REASON = "dlib face descriptor port not checked: pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0"
if not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")):
    pytest.skip(REASON, allow_module_level=True)

import dlib  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FOLDERS = {"subject": [SUBJECT_PHOTOS, SHARED / "subject_photos"], "other": [OTHER_PEOPLE, SHARED / "other_people"]}
MODELS = Path(list(importlib.util.find_spec("face_recognition_models").submodule_search_locations)[0]) / "models"
RESNET = MODELS / "dlib_face_recognition_resnet_model_v1.dat"


@dataclass
class Face:
    name: str
    group: str  # "subject" or "other"
    pixels: np.ndarray  # (H, W, 3) uint8
    landmarks: list[tuple[int, int]]
    dlib_chip: np.ndarray  # dlib.get_face_chip, (150, 150, 3) uint8
    dlib_descriptor: np.ndarray  # dlib.face_recognition_model_v1.compute_face_descriptor

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.pixels.copy()).permute(2, 0, 1).float()

    def transform(self):
        return chip_transform(self.landmarks, (self.pixels.shape[1], self.pixels.shape[0]))


def _photos() -> list[tuple[str, str, np.ndarray]]:
    """(name, group, pixels) of every distinct photo (the repo's fixtures are copies of shared ones)."""
    seen, photos = set(), []
    for group, folders in FOLDERS.items():
        for path in sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.jpg")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                photos.append((f"{path.parent.name}/{path.name}", group, np.asarray(Image.open(path).convert("RGB"))))
    return photos


def _detect(pixels: np.ndarray, hog, cnn) -> list:
    """Face boxes in full-size pixels: HOG on a 640 px copy; dlib's CNN on a 320 px copy where HOG finds
    none (the tilted heads). Only a start for the landmarks: the check is on (image, landmarks)."""
    def scaled(side: int) -> tuple[np.ndarray, float]:
        image = Image.fromarray(pixels)
        s = side / max(image.size)
        return np.asarray(image.resize((round(image.width * s), round(image.height * s)), Image.BILINEAR)), s

    small, s = scaled(640)
    rects = list(hog(small, 0))
    if not rects:
        small, s = scaled(320)
        rects = [d.rect for d in cnn(small, 0)]
    return [dlib.rectangle(*(round(v / s) for v in (r.left(), r.top(), r.right(), r.bottom()))) for r in rects]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a few shared cores one torch thread runs this net several times faster than two that contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def port() -> FaceDescriptor:
    return FaceDescriptor.from_dlib_file(RESNET)


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, str, np.ndarray]]:
    return _photos()


@pytest.fixture(scope="module")
def faces(photos) -> list[Face]:
    hog = dlib.get_frontal_face_detector()
    cnn = dlib.cnn_face_detection_model_v1(str(MODELS / "mmod_human_face_detector.dat"))
    shapes = dlib.shape_predictor(str(MODELS / "shape_predictor_5_face_landmarks.dat"))
    resnet = dlib.face_recognition_model_v1(str(RESNET))
    # One photo 4x larger, so the chip comes from the second level of dlib's image pyramid.
    name, group, pixels = photos[1]
    big = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.BICUBIC))
    found = []
    for name, group, pixels in photos + [(name + " (4x)", group, big)]:
        for rect in _detect(pixels, hog, cnn):
            shape = shapes(pixels, rect)
            found.append(Face(name, group, pixels, [(p.x, p.y) for p in shape.parts()],
                              dlib.get_face_chip(pixels, shape, size=150, padding=0.25),
                              np.asarray(resnet.compute_face_descriptor(pixels, shape))))
    return found


def _port_descriptors(port: FaceDescriptor, faces: list[Face]) -> np.ndarray:
    """End to end: each whole image, cut with the chip transform of its landmarks, through the port."""
    with torch.no_grad():
        return np.concatenate([port.embed(f.tensor()[None], [f.transform()]).numpy() for f in faces])


@pytest.fixture(scope="module")
def ours(port, faces) -> np.ndarray:
    return _port_descriptors(port, faces)


def test_parse_reads_dlibs_file_to_its_last_byte_and_refuses_a_damaged_one(tmp_path):
    data = RESNET.read_bytes()
    mean, layers = parse_dlib_face_model(data)  # raises if any byte is left over
    assert mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)  # input_rgb_image's defaults
    assert [l["kind"] for l in layers].count("con") == 29 and layers[-1]["weight"].shape == (256, 128)
    damaged = tmp_path / "resnet.dat"
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="could not be read as dlib's face recognition network .*reinstall"):
        FaceDescriptor.from_dlib_file(damaged)


def test_every_face_is_found_and_chips_equal_dlibs_bit_for_bit(photos, faces):
    missed = {name for name, _, _ in photos} - {f.name for f in faces}
    assert not missed, f"no face found in {sorted(missed)}"
    levels = set()
    for f in faces:
        transform = f.transform()
        levels.add(transform.levels)
        chip = extract_chips(f.tensor()[None], [transform])[0].permute(1, 2, 0).numpy()
        assert np.array_equal(chip, f.dlib_chip.astype(np.float32)), f.name
    assert {0, 1, 2} <= levels  # bilinear from the image, and from the first and second pyramid levels


def test_descriptors_equal_dlibs_from_its_chip_and_end_to_end(port, faces, ours):
    with torch.no_grad():
        from_chips = port(torch.from_numpy(np.stack([f.dlib_chip for f in faces])).permute(0, 3, 1, 2).float()).numpy()
    expected = np.stack([f.dlib_descriptor for f in faces])
    assert np.abs(from_chips - expected).max() < 1e-4
    assert np.abs(ours - expected).max() < 1e-4


def test_same_and_other_person_distances_equal_dlibs(faces, ours):
    subject = [i for i, f in enumerate(faces) if f.group == "subject"]
    other = [i for i, f in enumerate(faces) if f.group == "other"]
    theirs = np.stack([f.dlib_descriptor for f in faces])

    def distances(d: np.ndarray, pairs) -> np.ndarray:
        return np.array([np.linalg.norm(d[i] - d[j]) for i, j in pairs])
    for pairs in (list(combinations(subject, 2)), list(product(subject, other))):
        assert np.abs(distances(ours, pairs) - distances(theirs, pairs)).max() < 5e-5  # equal to 4 decimals
    assert distances(ours, combinations(subject, 2)).mean() < distances(ours, product(subject, other)).mean()


def test_batch_equals_one_by_one_and_gradients_reach_only_the_face(port, faces):
    same_size = [f for f in faces if f.pixels.shape == faces[0].pixels.shape][:8]
    assert len(same_size) >= 2
    images = torch.stack([f.tensor() for f in same_size]).requires_grad_(True)
    transforms = [f.transform() for f in same_size]
    batched = port.embed(images, transforms)
    assert np.abs(batched.detach().numpy() - _port_descriptors(port, same_size)).max() < 1e-5
    batched.square().sum().backward()
    grad = images.grad[0].abs().sum(0)
    left, top, right, bottom = transforms[0].box
    assert torch.isfinite(images.grad).all() and grad[top:bottom + 1, left:right + 1].sum() > 0
    grad[top:bottom + 1, left:right + 1] = 0
    assert grad.sum() == 0  # nothing outside the region the chip is cut from
