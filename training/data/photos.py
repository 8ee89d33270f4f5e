"""Decoding a photo: first frame, EXIF orientation, any Pillow mode -> 8-bit RGB, large images
decoded downscaled. `IMAGE_SUFFIXES` is the package's one list of image file types."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..quiet import quiet_libraries

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PAD_COLOR = (255, 255, 255)  # transparency is composited on it, and the pad crop fills with it


class SkipImage(Exception):
    """This file cannot be used; the message is the reason shown in the report."""


@dataclass
class Photo:
    """A decoded photo: 8-bit RGB, upright, maybe decoded downscaled from `full_size`."""

    image: Image.Image
    full_size: tuple[int, int]
    notes: list[str]

    @property
    def scale(self) -> float:
        """Source pixels per decoded pixel (1.0 unless decoded downscaled)."""
        return self.full_size[0] / self.image.width


def open_photo(data: bytes, min_side: int | None = None) -> Photo:
    """Decode image bytes: first frame, EXIF orientation, 8-bit RGB. With `min_side`, a large
    image is decoded downscaled (JPEG draft, else reduce), its short side kept >= min_side.
    Raises SkipImage with the reason when the bytes are not a usable image."""
    notes: list[str] = []
    if not data:
        raise SkipImage("empty file (0 bytes); copy the photo again")
    try:
        with quiet_libraries():  # e.g. DecompressionBombWarning: the engine never prints
            im = Image.open(io.BytesIO(data))
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(f"{frames} frames ({im.format}); used the first")
            full_size = im.size
            if min_side and im.format in ("JPEG", "MPO") and min(full_size) >= 2 * min_side:
                factor = min(full_size) / min_side
                im.draft(None, (math.ceil(full_size[0] / factor), math.ceil(full_size[1] / factor)))
            im.load()
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                full_size = (full_size[1], full_size[0])
            rgb = to_rgb8(ImageOps.exif_transpose(im))
            if min_side and min(rgb.size) >= 2 * min_side:
                rgb = rgb.reduce(min(rgb.size) // min_side)
    except Image.DecompressionBombError as exc:
        raise SkipImage(f"too many pixels to decode safely ({exc}); save a smaller copy of it") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not an image, or a format Pillow cannot read") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt data
        raise SkipImage(f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return Photo(rgb, full_size, notes)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float
    images are scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, PAD_COLOR + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else _guess_white(arr)
        gray = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if im.mode == "CMYK" and im.info.get("icc_profile"):
        converted = _cmyk_with_profile(im)
        if converted is not None:
            return converted
    return im.convert("RGB")


def _guess_white(arr: np.ndarray) -> float:
    """The white point of an `I` or `F` image: 1.0, 255, 65535, or the maximum."""
    peak = float(arr.max()) if arr.size else 1.0
    for white in (1.0, 255.0, 65535.0):
        if peak <= white:
            return white
    return peak


def _cmyk_with_profile(im: Image.Image) -> Image.Image | None:
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None  # a broken profile: fall back to Pillow's plain conversion


def photo_from_pil(image: Image.Image, min_side: int | None = None) -> Photo:
    """An image already in memory (e.g. from a ComfyUI batch) as a Photo, reduced like `open_photo`."""
    rgb = to_rgb8(image)
    if min_side and min(rgb.size) >= 2 * min_side:
        rgb = rgb.reduce(min(rgb.size) // min_side)
    return Photo(rgb, image.size, [])
