"""Crop geometry: face detection (YuNet), the head-and-shoulders, center and pad squares, and
rendering a square of a photo at the training resolution."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UserError
from ..quiet import quiet_libraries
from .photos import PAD_COLOR, Photo

CROP_MODES = ("face", "center", "pad")
# Bump when the crop pixels for the same inputs change (decoding, geometry, detector):
# it is part of every cache key, so old outputs are redone instead of trusted.
CROP_VERSION = 1

# Head-and-shoulders framing: the face box is this fraction of the square's side, and
# its centre sits this far down the square (upper middle, shoulders below).
FACE_HEIGHT_FRACTION = 0.38
FACE_WIDTH_FRACTION = 0.45
FACE_CENTER_Y = 0.42
FACE_MODEL = Path(__file__).resolve().parent.parent / "configs" / "face_detector" / "face_detection_yunet_2023mar.onnx"
DETECT_MAX_SIDE = 640  # YuNet finds faces of ~10-300 px: detect on a copy this size, then half
FACE_SCORE_THRESHOLD = 0.7


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x0, y0) - (x1, y1), in pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def contains(self, other: "Box", tolerance: float = 0.0) -> bool:
        return (other.x0 >= self.x0 - tolerance and other.y0 >= self.y0 - tolerance
                and other.x1 <= self.x1 + tolerance and other.y1 <= self.y1 + tolerance)

    def scaled(self, factor: float) -> "Box":
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)

    def as_list(self, digits: int = 2) -> list[float]:
        return [round(v, digits) for v in (self.x0, self.y0, self.x1, self.y1)]


_DETECTOR_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _face_detector():
    try:
        import cv2

        cv2.FaceDetectorYN  # noqa: B018 - OpenCV 4.8 and later
    except (ImportError, AttributeError):
        raise UserError("The face crop needs OpenCV 4.8 or later: run the pack's install.py with ComfyUI's python "
                        "(elsewhere pip install opencv-python-headless, or upgrade the OpenCV you have), "
                        "or use crop center.") from None
    with quiet_libraries():  # OpenCV warns about DNN targets on stderr
        return cv2.FaceDetectorYN.create(str(FACE_MODEL), "", (320, 320), FACE_SCORE_THRESHOLD, 0.3, 50)


def detect_faces(image: Image.Image, max_side: int = DETECT_MAX_SIDE) -> list[Box]:
    """Face boxes in `image` pixels, largest first; [] when there is none."""
    longest = max(image.size)
    for side in (min(max_side, longest), min(max_side, longest) // 2):
        if side < 32:
            break
        factor = side / longest
        small = image if factor == 1 else image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(small.convert("RGB"))[:, :, ::-1])
        with _DETECTOR_LOCK:
            detector = _face_detector()
            detector.setInputSize(small.size)
            _, rows = detector.detect(bgr)
        if rows is not None and len(rows):
            boxes = [Box(*(float(v) / factor for v in (x, y, x + w, y + h))) for x, y, w, h in rows[:, :4]]
            return sorted(boxes, key=lambda b: b.width * b.height, reverse=True)
    return []


def face_crop_box(face: Box, image_size: tuple[int, int]) -> Box:
    """The square that frames head and shoulders around `face`, with integer corners.
    It stays inside the image when the image allows, is never smaller than the face box and
    always contains it (it reaches past the image, to be padded, only when the face is
    larger than the image's short side)."""
    width, height = image_size
    fx0, fy0 = math.floor(max(0.0, face.x0)), math.floor(max(0.0, face.y0))
    fx1, fy1 = math.ceil(min(float(width), face.x1)), math.ceil(min(float(height), face.y1))
    fw, fh = max(1, fx1 - fx0), max(1, fy1 - fy0)
    side = round(max(fh / FACE_HEIGHT_FRACTION, fw / FACE_WIDTH_FRACTION))
    side = max(min(side, width, height), fw, fh)
    left = _place(round((fx0 + fx1) / 2 - side / 2), side, width, fx0, fx0 + fw)
    top = _place(round((fy0 + fy1) / 2 - FACE_CENTER_Y * side), side, height, fy0, fy0 + fh)
    return Box(left, top, left + side, top + side)


def _place(start: int, side: int, length: int, lo: int, hi: int) -> int:
    """Slide a span of `side` into [0, length) if it fits, else centre it; [lo, hi) always stays inside."""
    start = min(max(start, 0), length - side) if side <= length else (length - side) // 2
    return min(max(start, hi - side), lo)


def center_crop_box(image_size: tuple[int, int]) -> Box:
    width, height = image_size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


def pad_box(image_size: tuple[int, int]) -> Box:
    """The square around the whole image (letterbox: no pixel is cut)."""
    width, height = image_size
    side = max(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


def render_square(image: Image.Image, box: Box, resolution: int, fill=PAD_COLOR) -> Image.Image:
    """The square `box` of `image` resized to `resolution`; parts outside the image are `fill`."""
    side = box.width
    inside = Box(max(box.x0, 0), max(box.y0, 0), min(box.x1, image.width), min(box.y1, image.height))
    if inside == box:
        return image.resize((resolution, resolution), Image.Resampling.LANCZOS,
                            box=(box.x0, box.y0, box.x1, box.y1), reducing_gap=3.0)
    scale = resolution / side
    canvas = Image.new(image.mode, (resolution, resolution), fill)
    dx0, dy0 = round((inside.x0 - box.x0) * scale), round((inside.y0 - box.y0) * scale)
    dx1, dy1 = round((inside.x1 - box.x0) * scale), round((inside.y1 - box.y0) * scale)
    if dx1 > dx0 and dy1 > dy0:
        part = image.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS,
                            box=(inside.x0, inside.y0, inside.x1, inside.y1), reducing_gap=3.0)
        canvas.paste(part, (dx0, dy0))
    return canvas


@dataclass
class Crop:
    image: Image.Image
    source_size: tuple[int, int]
    box: Box  # in source pixels
    face: Box | None
    face_searched: bool
    upscaled: bool
    notes: list[str]


def crop_photo(photo: Photo, mode: str, resolution: int, reopen: Callable[[], Photo] | None = None) -> Crop:
    """Crop one decoded photo to a `resolution` square per `mode` (one of CROP_MODES). `reopen`
    decodes it again at full size: used when the face crop of a downscaled decode would be upscaled."""
    notes = list(photo.notes)
    face = None
    if mode == "face":
        faces = detect_faces(photo.image)
        if faces:
            face = faces[0]
            box = face_crop_box(face, photo.image.size)
            if box.width < resolution and photo.scale > 1 and reopen is not None:
                full = reopen()
                face = face.scaled(photo.scale / full.scale)
                photo = full
                box = face_crop_box(face, photo.image.size)
        else:
            box = center_crop_box(photo.image.size)
            notes.append("no face found; used the center crop")
    elif mode == "center":
        box = center_crop_box(photo.image.size)
    else:
        box = pad_box(photo.image.size)
    square = render_square(photo.image, box, resolution)
    source_box = box.scaled(photo.scale)
    upscaled = source_box.width < resolution
    if upscaled:
        notes.append(f"upscaled from {round(source_box.width)} px to {resolution} px")
    face_box = face.scaled(photo.scale) if face else None
    return Crop(square, photo.full_size, source_box, face_box, mode == "face", upscaled, notes)

