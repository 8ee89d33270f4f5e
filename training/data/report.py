"""What prepare did: `DatasetReport` (the one-screen summary the CLI prints and the node shows)
and the contact sheet of every crop."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from ..drawing import font, font_size, wrap_text
from ..errors import name_list
from .dataset import CONTACT_SHEET, DATASET_JSON, ItemRecord, PrepareConfig, Skipped

SHEET_THUMB = 128


@dataclass
class DatasetReport:
    """What `prepare_dataset` did; `text()` is the one-screen summary the CLI prints."""

    folder: Path
    origin: str
    config: PrepareConfig
    items: list[ItemRecord]
    skipped: list[Skipped]
    reused: int
    seconds: float
    warnings: list[str] = field(default_factory=list)  # about the dataset as a whole

    @property
    def kept(self) -> int:
        return len(self.items)

    @property
    def faces_found(self) -> int:
        return sum(1 for r in self.items if r.face_found)

    @property
    def upscaled(self) -> list[ItemRecord]:
        return [r for r in self.items if r.upscaled]

    @property
    def contact_sheet(self) -> Path:
        return self.folder / CONTACT_SHEET

    def text(self, max_listed: int = 8) -> str:
        cfg = self.config
        total = self.kept + len(self.skipped)
        lines = [
            f"Prepared {self.kept} of {total} files from {self.origin} -> {self.folder}",
            f"  {cfg.resolution}x{cfg.resolution}, crop={cfg.crop}, flip={'on' if cfg.flip else 'off'}, "
            f"repeats={cfg.repeats}, prompt: \"{cfg.instance_prompt}\"",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        if cfg.crop == "face":
            missed = [r.source for r in self.items if not r.face_found]
            line = f"  faces found: {self.faces_found} of {self.kept}"
            if missed:
                line += f"; center crop instead for: {name_list(missed, max_listed)}"
            lines.append(line)
        if self.upscaled:
            lines.append(f"  upscaled (smaller than {cfg.resolution} px): {name_list([r.source for r in self.upscaled], max_listed)}")
        masks = sum(1 for r in self.items if r.subject_mask)
        faces = sum(1 for r in self.items if r.subject_box and not r.subject_mask)
        lines.append(f"  subject regions (for background_weight): {faces} from faces, {masks} from masks, "
                     f"{self.kept - faces - masks} without (weighted 1 everywhere)")
        sidecars = sum(1 for r in self.items if r.caption_source == "sidecar")
        if sidecars:
            lines.append(f"  captions from .txt files: {sidecars}")
        if self.reused:
            lines.append(f"  reused unchanged from the last run: {self.reused}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            for s in self.skipped[:max_listed]:
                lines.append(f"    {s.source}: {s.reason}")
            if len(self.skipped) > max_listed:
                lines.append(f"    ... and {len(self.skipped) - max_listed} more (listed in {DATASET_JSON})")
        lines.append(f"  check the crops: {self.contact_sheet}  ({self.seconds:.1f} s)")
        return "\n".join(lines)


def needs_a_look(record: ItemRecord) -> bool:
    """Flagged on the contact sheet: no face where one was looked for, or upscaled."""
    return record.face_found is False or record.upscaled


def thumbnail(image: Image.Image) -> Image.Image:
    return image.resize((SHEET_THUMB, SHEET_THUMB), Image.Resampling.BILINEAR, reducing_gap=2.0)


REGION_TINT = (20, 40, 150)  # outside the subject region, on the contact sheet
FLAG_COLOR = (235, 64, 52)
LEGEND_COLOR = (200, 200, 200)


def make_contact_sheet(tiles: Sequence[tuple[Image.Image, str, bool, Image.Image | None]],
                       thumb: int = SHEET_THUMB) -> Image.Image:
    """All crops in a grid, each with its file name under it (on two lines when it is long); flagged ones
    (no face, upscaled) get a red frame and a '!' before the name; outside its subject region (gray, 255
    inside) a crop is tinted blue. A legend under the grid says what the marks mean."""
    label_font = font(11)
    line_h = font_size(label_font) + 3
    pad, label_height = 8, 2 * line_h + 3
    cols = max(1, min(8, math.ceil(math.sqrt(len(tiles)))))
    rows = max(1, math.ceil(len(tiles) / cols))
    cell_w, cell_h = thumb + pad, thumb + label_height + pad
    width = cols * cell_w + pad
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    legend = [line for text in _legend(tiles) for line in wrap_text(measure, text, label_font, width - 2 * pad)]
    sheet = Image.new("RGB", (width, rows * cell_h + pad + line_h * len(legend)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, (image, label, flagged, region) in enumerate(tiles):
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        if image.size != (thumb, thumb):
            image = image.resize((thumb, thumb), Image.Resampling.BILINEAR, reducing_gap=2.0)
        if region is not None:
            tinted = Image.blend(image.convert("RGB"), Image.new("RGB", image.size, REGION_TINT), 0.6)
            image = Image.composite(image.convert("RGB"), tinted, region.resize(image.size))
        sheet.paste(image, (x, y))
        if flagged:
            draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=FLAG_COLOR, width=3)
        name = wrap_text(draw, ("! " if flagged else "") + label, label_font, thumb, max_lines=2)
        for n, line in enumerate(name):
            draw.text((x, y + thumb + 3 + n * line_h), line, fill=FLAG_COLOR if flagged else (230, 230, 230),
                      font=label_font)
    for n, line in enumerate(legend):
        draw.text((pad, rows * cell_h + 2 + line_h * n), line, fill=LEGEND_COLOR, font=label_font)
    return sheet


def _legend(tiles) -> list[str]:
    lines = []
    if any(t[3] is not None for t in tiles):
        lines.append("blue tint: outside the subject region (weighted by background_weight in training)")
    if any(t[3] is None for t in tiles):
        lines.append("no tint: no face or mask, so no region (weighted 1 everywhere)")
    if any(t[2] for t in tiles):
        lines.append("red frame and ! before the name: no face found (center crop instead), or upscaled "
                     "(the photo is smaller than the crop size: expect a blurry crop)")
    return lines

