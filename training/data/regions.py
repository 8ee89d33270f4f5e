"""The subject region of each crop: where the subject is, so that training can weight the loss
outside it less (`background_weight`). It comes from a mask the user gives (`<stem>_mask.png`
beside the photo, white = subject) or else from the detected face, grown to head and shoulders.
A crop with neither has no region: the whole image is weighted 1.

The rule for the face: the face box is widened to HEAD_WIDTH face widths about its centre, raised
by HEAD_ABOVE face heights (hair) and extended down to HEAD_BELOW face heights below its top
(neck and shoulders), then clipped to the crop.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .crop import Box, render_square
from .photos import SkipImage

MASK_SUFFIX = "_mask"
HEAD_WIDTH = 2.2
HEAD_ABOVE = 0.5
HEAD_BELOW = 2.5


def head_and_shoulders(face: Box, crop_box: Box, resolution: int) -> Box:
    """The subject region from `face` (both boxes in source pixels), in crop pixels (0..resolution)."""
    scale = resolution / crop_box.width
    fx0, fy0 = (face.x0 - crop_box.x0) * scale, (face.y0 - crop_box.y0) * scale
    fw, fh = face.width * scale, face.height * scale
    cx = fx0 + fw / 2
    grown = Box(cx - HEAD_WIDTH * fw / 2, fy0 - HEAD_ABOVE * fh, cx + HEAD_WIDTH * fw / 2, fy0 + HEAD_BELOW * fh)
    return Box(*(min(max(v, 0.0), float(resolution)) for v in (grown.x0, grown.y0, grown.x1, grown.y1)))


def is_mask(path: Path) -> bool:
    """`<stem>_mask.<image suffix>` is the mask of the photo `<stem>.*`, never a training photo."""
    return path.stem.lower().endswith(MASK_SUFFIX)


def read_mask_file(data: bytes, name: str) -> Image.Image:
    """A mask file as 8-bit gray (first frame, EXIF orientation applied); raises SkipImage."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            upright = ImageOps.exif_transpose(im)  # the first frame
            return upright.convert("L") if upright.mode != "L" else upright.copy()
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt data
        raise SkipImage(f"its mask {name} cannot be read ({type(exc).__name__}: {exc}); the mask was ignored; "
                        "save it again as a PNG") from None


def crop_mask(mask: Image.Image, crop_box: Box, photo_size: tuple[int, int], resolution: int) -> Image.Image:
    """The mask cut with the photo's crop box (source pixels of a photo of `photo_size`), at
    `resolution`; outside the photo (pad) is background. The mask may be the photo's size or a
    scaled copy of it (same aspect)."""
    factor = mask.width / photo_size[0]
    return render_square(mask, crop_box.scaled(factor), resolution, fill=0)


def mask_size_problem(mask: Image.Image, photo_size: tuple[int, int]) -> str | None:
    """Why this mask cannot be the photo's, or None."""
    (mw, mh), (pw, ph) = mask.size, photo_size
    if abs(mw / pw - mh / ph) <= 0.01 * max(mw / pw, mh / ph):
        return None
    return (f"its mask is {mw}x{mh} but the photo is {pw}x{ph}: the mask was ignored; "
            "save the mask at the photo's size")


def region_image(resolution: int, box: Box | None, mask_path: Path | None, flipped: bool = False) -> Image.Image | None:
    """The region at crop resolution as 8-bit gray, 255 inside; None when the crop has no region."""
    if mask_path is not None:
        with Image.open(mask_path) as im:
            region = im.convert("L")
        if region.size != (resolution, resolution):
            region = region.resize((resolution, resolution), Image.Resampling.BILINEAR)
    elif box is not None:
        region = Image.new("L", (resolution, resolution), 0)
        x0, y0, x1, y1 = (round(v) for v in (box.x0, box.y0, box.x1, box.y1))
        if x1 > x0 and y1 > y0:
            region.paste(255, (x0, y0, x1, y1))
    else:
        return None
    return ImageOps.mirror(region) if flipped else region


def subject_map(region: Image.Image, size: int) -> np.ndarray:
    """The region on a `size` x `size` grid (the latent grid): each cell the share of its pixels
    inside the region, so 1 inside, 0 outside, fractions on the edge. float32."""
    gray = np.asarray(region, dtype=np.float32) / 255.0
    side = gray.shape[0]
    if side % size == 0:  # the usual case (512 px, 64 latents): exact block means
        k = side // size
        return gray.reshape(size, k, size, k).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    return np.asarray(Image.fromarray(gray, "F").resize((size, size), Image.Resampling.BOX), dtype=np.float32)
