"""The run folder's loss log: `loss.jsonl` (one row per step: step, loss, lr, ...) and `loss.png`."""
from __future__ import annotations

import json
from pathlib import Path

from .safe_io import atomic_write_text

LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"


def read_loss_log(run_dir: Path) -> list[dict]:
    """The rows written so far ([] when there is no readable log)."""
    try:
        lines = (Path(run_dir) / LOSS_LOG).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []


def write_loss_log(run_dir: Path, losses: list[dict]) -> None:
    """Write the log and its plot (the plot only when there is a step)."""
    atomic_write_text(run_dir / LOSS_LOG, "".join(json.dumps(r) + "\n" for r in losses))
    if losses:
        plot_loss(losses, run_dir / LOSS_PLOT)


def plot_loss(losses: list[dict], path: Path, size: tuple[int, int] = (640, 320)) -> Path:
    """Loss (raw and a moving mean) and learning rate against step, as a PNG (PIL: no plotting library to load)."""
    from PIL import Image, ImageDraw

    from .safe_io import atomic_save_image

    steps = [r["step"] for r in losses]
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    mean = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
    lrs = [r["lr"] for r in losses]
    width, height = size
    left, right, top, bottom = 56, width - 56, 24, height - 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, right, bottom], outline="#888")

    def scaler(lo: float, hi: float, a: float, b: float):
        span = (hi - lo) or 1.0
        return lambda v: a + (v - lo) / span * (b - a)

    x = scaler(steps[0], steps[-1], left, right) if len(steps) > 1 else (lambda v: (left + right) / 2)
    y = scaler(min(values), max(values), bottom, top)
    y_lr = scaler(0.0, max(lrs) or 1.0, bottom, top)
    for series, scale, colour, w in ((values, y, "#9ab", 1), (mean, y, "#157", 2), (lrs, y_lr, "#c73", 1)):
        points = [(x(s), scale(v)) for s, v in zip(steps, series)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=w)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
    draw.text((left, 4), f"loss (blue, mean of {window} dark)", fill="#157")
    draw.text((right - 110, 4), "learning rate (orange)", fill="#c73")
    draw.text((4, top), f"{max(values):.3g}", fill="#157")
    draw.text((4, bottom - 10), f"{min(values):.3g}", fill="#157")
    draw.text((right + 4, top), f"{max(lrs):.2g}", fill="#c73")
    draw.text((left, bottom + 8), f"step {steps[0]}", fill="#444")
    draw.text((right - 60, bottom + 8), f"step {steps[-1]}", fill="#444")
    return atomic_save_image(image, path)
