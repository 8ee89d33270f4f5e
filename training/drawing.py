"""Text on drawn images (contact sheet, evaluation grid, Subject Grid): one font, one way to fit a label."""
from __future__ import annotations

from functools import lru_cache

from PIL import ImageDraw, ImageFont

BITMAP_LINE_HEIGHT = 11  # Pillow's fixed bitmap font, used where FreeType is missing


@lru_cache(maxsize=16)
def font(size: int):
    """Pillow's default font at `size` px (its fixed bitmap font where Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def font_size(f) -> int:
    """The font's size in pixels (the bitmap font has none: its line height)."""
    return getattr(f, "size", BITMAP_LINE_HEIGHT)


def fit_text(draw: ImageDraw.ImageDraw, text: str, f, width: float, cut: str = "end") -> str:
    """`text`, shortened with "…" until it is at most `width` px wide. cut="middle" keeps both ends
    (file names of one folder tend to differ at their ends), cut="end" keeps the start."""
    if draw.textlength(text, font=f) <= width:
        return text
    if cut == "end":
        while text and draw.textlength(text + "…", font=f) > width:
            text = text[:-1]
        return text + "…"
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while len(head) + len(tail) > 2 and draw.textlength(head + "…" + tail, font=f) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail
