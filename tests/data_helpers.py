"""Helpers the data tests share: the bundled subject photos and photo-like images made from them.
(Not in conftest.py, for the reason given in fixture_paths.py.)"""
from __future__ import annotations

from PIL import Image

from fixture_paths import SUBJECT_PHOTOS

SUBJECT = SUBJECT_PHOTOS
PHOTOS = sorted(SUBJECT.glob("*.jpg"))


def photo_like(size):
    """A real photo (the subject), resized: faces and textures, not flat colour."""
    with Image.open(PHOTOS[1]) as im:
        return im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
