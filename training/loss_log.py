"""The run folder's loss log: `loss.jsonl` (one row per step: step, loss, lr, ...) and `loss.png`."""
from __future__ import annotations

import json
from pathlib import Path

from .safe_io import atomic_write_text

LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"
IDENTITY_COLOUR = "#b3b"  # the identity distance of validated steps (training/identity.py)


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
    """Loss (raw and a moving mean), learning rate and, on validated steps, the identity distance against
    step, as a PNG (PIL: no plotting library to load)."""
    from PIL import Image, ImageDraw

    from .drawing import font
    from .safe_io import atomic_save_image

    steps = [r["step"] for r in losses]
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    mean = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
    lrs = [r["lr"] for r in losses]
    scored = [(r["step"], r["identity"]) for r in losses if r.get("identity") is not None]
    width, height = size
    left, right, top, bottom = 56, width - 56, 24, height - 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    text = font(11)
    draw.rectangle([left, top, right, bottom], outline="#888")

    def scaler(lo: float, hi: float, a: float, b: float):
        span = (hi - lo) or 1.0
        return lambda v: a + (v - lo) / span * (b - a)

    x = scaler(steps[0], steps[-1], left, right) if len(steps) > 1 else (lambda v: (left + right) / 2)
    y = scaler(min(values), max(values), bottom, top)
    lr_top = (max(lrs) or 1.0) * 1.1  # headroom: a constant rate is a line inside the frame, not on its edge
    y_lr = scaler(0.0, lr_top, bottom, top)
    for series, scale, colour, w in ((values, y, "#9ab", 1), (mean, y, "#157", 2), (lrs, y_lr, "#c73", 1)):
        _polyline(draw, [(x(s), scale(v)) for s, v in zip(steps, series)], colour, w)
    draw.text((left, 4), f"loss (blue, mean of {window} dark)", fill="#157", font=text)
    draw.text((right - 110, 4), "learning rate (orange)", fill="#c73", font=text)
    draw.text((4, top), f"{max(values):.3g}", fill="#157", font=text)
    draw.text((4, bottom - 10), f"{min(values):.3g}", fill="#157", font=text)
    draw.text((right + 4, y_lr(max(lrs)) - 5), f"{max(lrs):.2g}", fill="#c73", font=text)
    if scored:  # identity distance on its own 0..1 scale (lower = closer to the subject)
        y_id = scaler(0.0, max(1.0, max(d for _, d in scored) * 1.05), bottom, top)
        _polyline(draw, [(x(s), y_id(d)) for s, d in scored], IDENTITY_COLOUR, 2, dots=True)
        draw.text(((left + right) // 2 - 70, 4), "identity distance (magenta, 0-1)", fill=IDENTITY_COLOUR, font=text)
    draw.text((left, bottom + 8), f"step {steps[0]}", fill="#444", font=text)
    draw.text((right - 60, bottom + 8), f"step {steps[-1]}", fill="#444", font=text)
    return atomic_save_image(image, path)


def _polyline(draw, points: list[tuple[float, float]], colour: str, width: int, dots: bool = False) -> None:
    if len(points) > 1:
        draw.line(points, fill=colour, width=width)
    for px, py in points if dots or len(points) == 1 else ():
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
