"""Text and tiles on drawn images (contact sheet, evaluation grid, Subject Grid): one font, one way to fit
a label, one way to enlarge a small tile."""
from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

BITMAP_LINE_HEIGHT = 11  # Pillow's fixed bitmap font, used where FreeType is missing
MIN_TILE = 128  # a grid's smaller pictures (tiny's 64 px) are enlarged to this, so their labels fit beside them


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


_BREAK_AFTER = " _-"  # where a line may break: after a space, and inside file names after "_" or "-"


def wrap_text(draw: ImageDraw.ImageDraw, text: str, f, width: float, max_lines: int | None = None) -> list[str]:
    """`text` in lines of at most `width` px, broken after a space, "_" or "-"; the last of `max_lines`
    lines keeps what is left, shortened in its middle by `fit_text` (so a file name keeps its ending)."""
    pieces, start = [], 0
    for i, char in enumerate(text):
        if char in _BREAK_AFTER:
            pieces.append(text[start:i + 1])
            start = i + 1
    pieces.append(text[start:])
    lines, current = [], ""
    for piece in filter(None, pieces):
        if current and draw.textlength((current + piece).rstrip(), font=f) > width:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines - 1] + ["".join(lines[max_lines - 1:])]
    lines = [line.strip() for line in lines]
    return [fit_text(draw, line, f, width, cut="middle") for line in lines]


def enlarge(image: Image.Image, minimum: int) -> Image.Image:
    """`image` scaled up by a whole factor (nearest neighbour: its pixels stay visible as pixels) until its
    longer side is at least `minimum` px; a large enough image is returned as it is."""
    longest = max(image.size)
    factor = -(-minimum // longest) if longest else 1
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
