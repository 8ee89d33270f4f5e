"""Tests for training/drawing.py: the one font and fit-text helper of every drawn label."""
from __future__ import annotations

from PIL import Image, ImageDraw

from training.drawing import MIN_TILE, enlarge, fit_text, font, font_size, wrap_text


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


def test_wrap_keeps_a_file_name_whole_on_two_lines():
    draw, f = _draw(), font(11)
    # one line cut it in the middle ("input__fo…nd__01.jpg"): the part that tells photos apart was lost
    assert draw.textlength("input__foreground__01.jpg", font=f) > 128
    assert wrap_text(draw, "input__foreground__01.jpg", f, 128, max_lines=2) == ["input__foreground__", "01.jpg"]
    long = "a_very_long_photo_name_of_the_subject_in_the_forest_background_01.jpg"
    lines = wrap_text(draw, long, f, 128, max_lines=2)
    assert len(lines) == 2 and long.startswith(lines[0]) and lines[1].endswith("_01.jpg") and "…" in lines[1]
    assert all(draw.textlength(line, font=f) <= 128 for line in lines)
    assert wrap_text(draw, "x.jpg", f, 128, max_lines=2) == ["x.jpg"]


def test_wrap_breaks_sentences_at_spaces():
    draw, f = _draw(), font(11)
    text = "red frame and ! before the name: no face found (center crop instead), or upscaled"
    lines = wrap_text(draw, text, f, 120)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(draw.textlength(line, font=f) <= 120 for line in lines)


def test_enlarge_repeats_pixels_by_a_whole_factor():
    small = Image.new("RGB", (64, 48), "white")
    small.putpixel((0, 0), (255, 0, 0))
    big = enlarge(small, MIN_TILE)
    assert big.size == (128, 96)
    assert {big.getpixel(p) for p in ((0, 0), (1, 1), (0, 1))} == {(255, 0, 0)} and big.getpixel((2, 2)) == (255,) * 3
    large = Image.new("RGB", (256, 256))
    assert enlarge(large, MIN_TILE) is large


# ---------------------------------------------------------------- the contact sheet (training/data/report.py)


def _bright_rows(image, box, threshold=90):
    """The y of every row in box (x0, y0, x1, y1) with a pixel brighter than threshold (text on the dark sheet)."""
    x0, y0, x1, y1 = box
    gray = image.convert("L")
    return {y for y in range(y0, y1) for x in range(x0, x1) if gray.getpixel((x, y)) > threshold}


def test_contact_sheet_shows_whole_names_and_explains_the_flag():
    from training.data.report import FLAG_COLOR, SHEET_THUMB, make_contact_sheet

    photo = Image.new("RGB", (SHEET_THUMB, SHEET_THUMB), (40, 40, 40))
    names = ["input__foreground__01.jpg", "input__half_body__02.jpg", "b.jpg"]  # two columns, two rows
    sheet = make_contact_sheet([(photo, name, name == names[1], None) for name in names])
    line_h = font_size(font(11)) + 3
    caption_top = 8 + SHEET_THUMB + 3
    # both caption lines of the first tile carry text, above the next row: the name is wrapped, not cut
    first = _bright_rows(sheet, (8, caption_top, 8 + SHEET_THUMB, caption_top + line_h))
    second = _bright_rows(sheet, (8, caption_top + line_h, 8 + SHEET_THUMB, caption_top + 2 * line_h))
    assert first and second
    # the flagged tile's name is red; below the tiles a legend says what the red frame and "!" mean
    flagged_x = 8 + SHEET_THUMB + 8
    rgb = sheet.convert("RGB")
    assert any(rgb.getpixel((x, y)) == FLAG_COLOR for x in range(flagged_x, flagged_x + 20)
               for y in range(caption_top, caption_top + line_h))
    legend_top = 2 * (8 + SHEET_THUMB + 2 * line_h + 3)
    legend_rows = _bright_rows(sheet, (8, legend_top, sheet.width, sheet.height))
    assert len(legend_rows) > 2 * line_h // 2  # at least two lines of text: the region line and the "!" line
    plain = make_contact_sheet([(photo, name, False, None) for name in names])
    assert sheet.height - plain.height >= line_h  # the "!" line exists only when something is flagged
