"""Tests for training/drawing.py: the one font and fit-text helper of every drawn label."""
from __future__ import annotations

from PIL import Image, ImageDraw

from training.drawing import fit_text, font, font_size


def _draw():
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def test_text_that_fits_is_unchanged():
    draw, f = _draw(), font(12)
    assert fit_text(draw, "forest", f, 1000) == "forest"


def test_end_cut_keeps_the_start_and_fits():
    draw, f = _draw(), font(12)
    text = "dreambooth trained for a very long time"
    fitted = fit_text(draw, text, f, 60)
    assert fitted.endswith("…") and text.startswith(fitted[:-1]) and len(fitted) > 1
    assert draw.textlength(fitted, font=f) <= 60


def test_middle_cut_keeps_both_ends_of_a_file_name():
    draw, f = _draw(), font(11)
    name = "input_photo_of_the_subject_in_the_forest_background_01.jpg"
    fitted = fit_text(draw, name, f, 80, cut="middle")
    head, tail = fitted.split("…")
    assert name.startswith(head) and name.endswith(tail) and tail.endswith(".jpg")
    assert draw.textlength(fitted, font=f) <= 80


def test_font_is_shared_and_sized():
    assert font(14) is font(14)
    assert font_size(font(14)) == 14
