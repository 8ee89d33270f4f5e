"""training/data/crop.py: the crop geometry (pure functions)."""
import numpy as np
import pytest
from PIL import Image

from training.data import crop, photos
from training.data.crop import Box, center_crop_box, face_crop_box, pad_box, render_square


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
    assert box.width == pytest.approx(130 / crop.FACE_HEIGHT_FRACTION, abs=1)
    assert (face.x0 + face.x1) / 2 == pytest.approx((box.x0 + box.x1) / 2, abs=1)
    assert ((face.y0 + face.y1) / 2 - box.y0) / box.height == pytest.approx(crop.FACE_CENTER_Y, abs=0.01)


def test_center_and_pad_boxes_and_padding():
    assert center_crop_box((300, 200)) == Box(50, 0, 250, 200)
    assert pad_box((300, 200)) == Box(0, -50, 300, 250)
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    square = np.asarray(render_square(red, pad_box(red.size), 96))
    assert tuple(square[2, 48]) == photos.PAD_COLOR and tuple(square[48, 48]) == (255, 0, 0)
