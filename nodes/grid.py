"""Subject Grid: images from several runs in one labelled grid (rows = method/rank, columns = scenes)."""
from __future__ import annotations

from .host import CATEGORY, fit_same_size, pils_to_tensor, split_labels, tensor_to_pils

MORE_INPUTS = 7  # images_2 ... images_8: one per compared model
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


# ---------------------------------------------------------------- pure: rows and drawing


def image_rows(inputs: list[list], columns: int | None = None) -> list[list]:
    """PIL images per connected input -> grid rows: each input starts a row, wrapping after `columns`
    (default: the longest input's length)."""
    inputs = [images for images in inputs if images]
    columns = columns or max((len(images) for images in inputs), default=1)
    return [images[i:i + columns] for images in inputs for i in range(0, len(images), columns)]


def draw_grid(rows: list[list], row_labels: list[str] = (), column_labels: list[str] = ()):
    """One PIL image: the tiles (all resized to the first one's size) with column labels on top
    and row labels on the left; either label set may be empty."""
    from PIL import Image, ImageDraw

    from ..training.drawing import fit_text, font, font_size

    tiles = fit_same_size([im for row in rows for im in row])
    if not tiles:
        raise ValueError("no images to put in a grid")
    tile_w, tile_h = tiles[0].size
    columns = max(len(row) for row in rows)
    label_font = font(max(12, min(tile_w, tile_h) // 16))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font_size(label_font) * 1.4)
    pad = max(4, line_h // 3)
    left = 0
    if any(row_labels):
        left = min(int(max(measure.textlength(str(t), font=label_font) for t in row_labels)) + 2 * pad, 2 * tile_w)
    top = line_h + pad if any(column_labels) else 0
    grid = Image.new("RGB", (left + columns * tile_w, top + len(rows) * tile_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(list(column_labels)[:columns]):
        draw.text((left + c * tile_w + pad, pad // 2), fit_text(draw, str(label), label_font, tile_w - 2 * pad),
                  fill=INK, font=label_font)
    position = iter(tiles)
    for r, row in enumerate(rows):
        y = top + r * tile_h
        if r < len(row_labels) and row_labels[r]:
            label = fit_text(draw, str(row_labels[r]), label_font, left - 2 * pad)
            draw.text((pad, y + tile_h // 2 - line_h // 2), label, fill=INK, font=label_font)
        for c in range(len(row)):
            grid.paste(next(position), (left + c * tile_w, y))
    return grid


def image_inputs(images, more: dict) -> list[list]:
    """The INPUT_IS_LIST image inputs (images, images_2, ...) as PIL images per connected input."""
    keys = [f"images_{i}" for i in range(2, MORE_INPUTS + 2)]
    return [tensor_to_pils(images)] + [tensor_to_pils(more[k]) for k in keys if more.get(k) is not None]


def more_image_inputs(tooltip: str) -> dict:
    return {f"images_{i}": ("IMAGE", {"tooltip": tooltip}) for i in range(2, MORE_INPUTS + 2)}


# ---------------------------------------------------------------- node


class SubjectGrid:
    DESCRIPTION = ("Puts images from several models into one labelled grid: each connected images input is a row "
                   "(e.g. DreamBooth, LoRA r4, LoRA r64) and each of its images a column (the scenes).")
    CATEGORY = CATEGORY
    FUNCTION = "grid"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("The labelled grid, one image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The first row: a list of images (one per scene) or a batch."}),
                "row_labels": ("STRING", {"default": "", "multiline": True, "tooltip":
                               "One label per row (per connected images input), comma- or newline-separated, "
                               "e.g. 'dreambooth, lora r4'."}),
                "column_labels": ("STRING", {"default": "forest, desert, mountains", "tooltip":
                                  "One label per column, comma- or newline-separated; or connect Subject Scene "
                                  "Prompts' scene_names."}),
            },
            "optional": more_image_inputs("Another row: the images of the next model."),
        }

    def grid(self, images, row_labels, column_labels, **more):
        columns = split_labels(column_labels)
        rows = image_rows(image_inputs(images, more), len(columns) or None)
        return (pils_to_tensor([draw_grid(rows, split_labels(row_labels), columns)]),)
