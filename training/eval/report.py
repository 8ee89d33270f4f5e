"""The evaluation report: per-image scores, their aggregates per (method, rank, scene) and per (method,
rank), written as JSON, a plain-text table, an annotated grid and a bar chart."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..drawing import MIN_TILE, enlarge, fit_text, font, font_size
from ..safe_io import atomic_path, atomic_save_image, atomic_write_text
from .scorers import FACE_MATCH_THRESHOLD

OUTPUT_NAMES = ("report.json", "table.txt", "grid.png", "chart.png")
METRICS = ("presence", "identity_match", "identity_distance", "clip_i", "clip_t", "dino")
METRIC_TITLES = {
    "presence": "subject presence (face found)",
    "identity_match": f"identity match (distance < {FACE_MATCH_THRESHOLD})",
    "identity_distance": "identity distance to mean (lower = closer)",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dino": "DINO",
}


@dataclass
class ImageScores:
    """The scores of one generated image; None where a metric is not available or does not apply."""

    label: str
    method: str
    rank: int | None
    scene: str
    prompt: str | None
    path: str | None = None
    faces: int | None = None
    face_found: bool | None = None
    identity_distance: float | None = None
    nearest_distance: float | None = None
    identity_match: bool | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    dino: float | None = None


def _mean(values: Sequence[float | bool | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _aggregate(rows: Sequence[ImageScores]) -> dict[str, Any]:
    return {
        "n": len(rows),
        "presence": _mean([r.face_found for r in rows]),
        "identity_match": _mean([r.identity_match for r in rows]),
        "identity_distance": _mean([r.identity_distance for r in rows]),
        "nearest_distance": _mean([r.nearest_distance for r in rows]),
        "clip_i": _mean([r.clip_i for r in rows]),
        "clip_t": _mean([r.clip_t for r in rows]),
        "dino": _mean([r.dino for r in rows]),
    }


def group_key(method: str, rank: int | None) -> tuple:
    """The one order of models in every table, grid, chart and report: the untrained base first (the control),
    then methods by name, a higher rank first, and at equal rank a method before its variants
    ("lora r4" before "lora-resized r4", so the trained and the resized LoRA of one rank sit side by side)."""
    return (method != "base", method.split("-")[0], rank is not None, -(rank or 0), method)


def group_name(method: str, rank: int | None) -> str:
    """A model's label: "dreambooth", "lora r16", "lora-resized r4"."""
    return method if rank is None else f"{method} r{rank}"


@dataclass
class EvalReport:
    """Per-image scores, their aggregates and the reasons for any metric that is not available."""

    images: list[ImageScores]
    unavailable: dict[str, str] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    thumbnails: list[Image.Image] = field(default_factory=list, repr=False)

    def _scenes(self) -> list[str]:
        return list(dict.fromkeys(r.scene for r in self.images))

    def _groups(self) -> list[tuple[str, int | None]]:
        keys = {(r.method, r.rank) for r in self.images}
        return sorted(keys, key=lambda k: group_key(*k))

    def aggregates(self, by_scene: bool = True) -> list[dict[str, Any]]:
        """Mean scores per (method, rank, scene), or per (method, rank) when by_scene is False."""
        out = []
        for method, rank in self._groups():
            rows = [r for r in self.images if (r.method, r.rank) == (method, rank)]
            scenes = self._scenes() if by_scene else [None]
            for scene in scenes:
                selected = [r for r in rows if scene is None or r.scene == scene]
                if selected:
                    key = {"method": method, "rank": rank} | ({"scene": scene} if by_scene else {})
                    out.append(key | _aggregate(selected))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "unavailable": self.unavailable,
            "references": self.references,
            "aggregates": {
                "by_method_rank_scene": self.aggregates(by_scene=True),
                "by_method_rank": self.aggregates(by_scene=False),
            },
            "images": [vars(r).copy() for r in self.images],
        }

    def table(self) -> str:
        """Plain-text tables of the aggregates, then one line per metric that is not available."""
        parts = ["per method / rank / scene", _format_table(self.aggregates(True), True, self.unavailable),
                 "", "per method / rank", _format_table(self.aggregates(False), False, self.unavailable)]
        ref = self.references
        if ref:
            baseline = ", ".join(f"{k} {_fmt(ref.get(k))}" for k in ("identity_distance", "clip_i", "dino")
                                 if ref.get(k) is not None)
            parts += ["", f"references: {ref.get('count', 0)} images, {ref.get('faces_found', 0)} with a face"
                      + (f"; leave-one-out baseline: {baseline}" if baseline else "")]
        for metric, reason in self.unavailable.items():
            parts.append(f"{metric}: {reason}")
        return "\n".join(parts) + "\n"

    def grid(self, tile: int = 224) -> Image.Image:
        """The generated images, one row per method/rank, each tile annotated with its scores; a cell is the
        picture (at most `tile` px, small ones enlarged to MIN_TILE) over its caption."""
        return _draw_grid(self, tile)

    def chart(self, path: Path) -> None:
        """A bar chart of the aggregates per method/rank (one panel per metric, bars per scene)."""
        _draw_chart(self, path)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write report.json, table.txt, grid.png and chart.png (when matplotlib is installed) into out_dir,
        each via a temp file and a rename."""
        out = Path(out_dir)
        paths = {}
        if importlib.util.find_spec("matplotlib") is None:  # optional in ComfyUI's Python
            self.unavailable["chart"] = "not drawn: matplotlib is not installed (pip install matplotlib)"
        else:
            with atomic_path(out / "chart.png") as tmp:
                self.chart(tmp)
            paths["chart.png"] = out / "chart.png"
        paths["grid.png"] = atomic_save_image(self.grid(), out / "grid.png")
        paths["report.json"] = atomic_write_text(out / "report.json", json.dumps(self.to_json(), indent=2))
        paths["table.txt"] = atomic_write_text(out / "table.txt", self.table())
        return paths


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_COLUMNS = [("presence", "presence"), ("identity_match", "id match"), ("identity_distance", "id dist"),
            ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")]
# The metric whose unavailability empties each column.
_COLUMN_SOURCE = {"presence": "identity", "identity_match": "identity", "identity_distance": "identity",
                  "clip_i": "clip_i", "clip_t": "clip_t", "dino": "dino"}


def _format_table(rows: list[dict[str, Any]], by_scene: bool, unavailable: dict[str, str]) -> str:
    header = ["method", "rank"] + (["scene"] if by_scene else []) + ["n"] + [title for _, title in _COLUMNS]
    lines = [header]
    for row in rows:
        cells = [row["method"], "-" if row["rank"] is None else str(row["rank"])]
        cells += [row["scene"] or "-"] if by_scene else []
        cells.append(str(row["n"]))
        for key, _ in _COLUMNS:
            if _COLUMN_SOURCE[key] in unavailable:
                cells.append("not available")
            elif key in ("presence", "identity_match") and row[key] is not None:
                cells.append(f"{round(row[key] * row['n'])}/{row['n']}")
            else:
                cells.append(_fmt(row[key]))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _tile_lines(r: ImageScores) -> list[str]:
    head = " ".join(p for p in (group_name(r.method, r.rank), r.scene) if p)
    if r.face_found is None:
        face = "face: n/a"
    elif not r.face_found:
        face = "face: NO"
    else:
        verdict = "match" if r.identity_match else "other"
        face = f"face: yes  d={r.identity_distance:.2f} {verdict}"
    clip = "  ".join(f"{name} {_fmt(v, 2)}" for name, v in (("CLIP-I", r.clip_i), ("CLIP-T", r.clip_t))
                     if v is not None)
    dino = f"DINO {_fmt(r.dino, 2)}" if r.dino is not None else ""
    return [line for line in (head or r.label, face, clip, dino) if line]


def _draw_grid(report: EvalReport, tile: int) -> Image.Image:
    thumbs = [enlarge(t, MIN_TILE) for t in report.thumbnails]
    side = min(tile, max((max(t.size) for t in thumbs), default=tile))  # cells fit the pictures, not a fixed box
    text_font = font(max(10, side // 16))
    line_h = font_size(text_font) + 3
    caption_h = max((len(_tile_lines(r)) for r in report.images), default=1) * line_h + 6  # the lines there are
    order = {s: n for n, s in enumerate(report._scenes())}
    rows = [sorted((i for i, r in enumerate(report.images) if (r.method, r.rank) == group),
                   key=lambda i: order[report.images[i].scene]) for group in report._groups()]
    cols = max((len(r) for r in rows), default=1)
    grid = Image.new("RGB", (cols * side, max(1, len(rows)) * (side + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for y, members in enumerate(rows):
        for x, i in enumerate(members):
            left, top = x * side, y * (side + caption_h)
            thumb = thumbs[i].copy()
            thumb.thumbnail((side, side))
            grid.paste(thumb, (left + (side - thumb.width) // 2, top + (side - thumb.height) // 2))
            scores = report.images[i]
            # the face line: green = the subject, red = no face or someone else, black = not measured
            face_color = "black" if scores.identity_match is None else (
                (0, 120, 0) if scores.identity_match else (190, 0, 0))
            for n, text in enumerate(_tile_lines(scores)):
                color = face_color if text.startswith("face:") else "black"
                draw.text((left + 4, top + side + 3 + n * line_h), fit_text(draw, text, text_font, side - 6),
                          fill=color, font=text_font)
            draw.rectangle((left, top, left + side - 1, top + side + caption_h - 1), outline=(200, 200, 200))
    return grid


def _draw_chart(report: EvalReport, path: Path) -> None:
    # The Agg canvas directly: no pyplot, so no global backend switch inside a host process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = report._groups()
    scenes = report._scenes()
    per_scene = report.aggregates(by_scene=True)
    metrics = [m for m in METRICS if any(row[m] is not None for row in per_scene)]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(scenes)) / 2 + 3), 2.6 * max(1, len(metrics))))
    FigureCanvasAgg(fig)
    if not metrics:
        fig.text(0.5, 0.5, "no metric available:\n" + "\n".join(report.unavailable.values()),
                 ha="center", va="center", wrap=True)
    width = 0.8 / max(1, len(scenes))
    for n, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, n + 1)
        for s, scene in enumerate(scenes):
            values = []
            for group in groups:
                row = next((r for r in per_scene if (r["method"], r["rank"], r["scene"]) == (*group, scene)), None)
                values.append(np.nan if row is None or row[metric] is None else row[metric])
            xs = np.arange(len(groups)) - 0.4 + width * (s + 0.5)
            ax.bar(xs, values, width, label=scene or "all")
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([group_name(*g) for g in groups])
        ax.set_xlim(-0.5, len(groups) - 0.5)  # NaN bars (no data) must not shift the axis
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        if metric in ("presence", "identity_match"):
            ax.set_ylim(0, 1)
        if metric == "identity_distance":
            ax.axhline(FACE_MATCH_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    top = 1.0
    if metrics and len(scenes) > 1:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncols=len(scenes), fontsize=8, frameon=False)
        top = 1.0 - 0.35 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, format="png", dpi=100)


