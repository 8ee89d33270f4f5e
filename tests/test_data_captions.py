"""training/data/captions.py: template and sidecar captions, and the check for traits in every caption."""
import json
import shutil

import pytest

from data_helpers import PHOTOS
from training.data.captions import caption_for, repeated_phrases
from training.data.dataset import PrepareConfig
from training.data.prepare import prepare_dataset


def test_captions_from_template_and_sidecars(tmp_path):
    cfg = PrepareConfig(token="zwx", class_word="dog", caption_template="{token} {class_word}, studio photo")
    assert caption_for(cfg, None) == ("zwx dog, studio photo", "template", [])
    assert caption_for(cfg, "  a {token} {class_word}\non a beach ")[0] == "a zwx dog on a beach"
    assert caption_for(cfg, "zwx running")[0] == "zwx running"
    caption, origin, notes = caption_for(cfg, "a dog running")
    assert caption == "zwx, a dog running" and origin == "sidecar" and notes
    assert caption_for(cfg, "zwxy is not the token")[0].startswith("zwx, ")

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(PHOTOS[0], src / name)
    (src / "a.txt").write_text("{token} on a bench", encoding="utf-8")
    out = tmp_path / "o"
    report = prepare_dataset(src, out, cfg.__class__(**{**cfg.__dict__, "crop": "center"}))
    assert (out / "a.txt").read_text() == "zwx on a bench"
    assert (out / "b.txt").read_text() == "zwx dog, studio photo"
    assert {i.caption_source for i in report.items} == {"sidecar", "template"}
    assert not report.skipped  # a.txt is a caption, not a skipped file


# ---------------------------------------------------------------- the caption check


def _captioned_folder(root, captions):
    """One copy of a sample photo per caption, each with its caption as a sidecar .txt."""
    src = root / "photos"
    src.mkdir()
    for i, caption in enumerate(captions):
        shutil.copy(PHOTOS[i % len(PHOTOS)], src / f"p{i}.jpg")
        (src / f"p{i}.txt").write_text(caption, encoding="utf-8")
    return src


def test_a_trait_in_every_caption_is_named_in_the_report_and_dataset_json(tmp_path):
    src = _captioned_folder(tmp_path, ["sks man, bearded, smiling at the camera", "bearded sks man in a park",
                                       "sks man with a hat, Bearded", "a photo of sks man, bearded, at night"])
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    [warning] = report.warnings
    assert warning.startswith("'bearded' is in nearly every caption (4 of 4)")
    assert "remove 'bearded' from the .txt captions" in warning and "not be learned by the token 'sks'" in warning
    assert f"warning: {warning}" in report.text()
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["warnings"] == [warning]
    # nothing is changed silently: the captions are written as the user gave them
    assert (tmp_path / "o" / "p1.txt").read_text() == "bearded sks man in a park"


def test_varied_captions_get_no_warning(tmp_path):
    src = _captioned_folder(tmp_path, ["a photo of sks man smiling", "sks man in a park", "sks man wearing a hat",
                                       "sks man at night, in the rain"])
    report = prepare_dataset(src, tmp_path / "o", PrepareConfig(resolution=64, crop="center"))
    assert report.warnings == [] and "warning" not in report.text()
    assert "warnings" not in json.loads((tmp_path / "o" / "dataset.json").read_text())


@pytest.mark.parametrize("captions,expected", [
    # the longest phrase is named, not also its words; 4 of 5 is "nearly every" (80 %)
    (["red hair, smiling", "red hair, outdoors", "long red hair", "red hair at the beach", "a hat"], [("red hair", 4)]),
    # 3 of 5 is not
    (["bearded", "bearded", "bearded", "smiling", "outdoors"], []),
    # two captions are too few to tell a trait from chance
    (["bearded", "bearded"], []),
    # the token, the class word, the template's words and stop words never count
    (["a photo of sks man on a bench", "a photo of sks man in the city", "a photo of sks man with a dog"], []),
    # a phrase does not run across punctuation: 'bearded' and 'glasses' each, not 'bearded glasses'
    (["bearded, glasses", "glasses and bearded", "bearded; glasses"], [("bearded", 3), ("glasses", 3)]),
])
def test_repeated_phrases(captions, expected):
    assert repeated_phrases(captions, {"a", "photo", "of", "sks", "man"}) == expected


def test_template_captions_are_not_checked(tmp_path):
    """Only .txt captions describe traits; the template is in every caption by design."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        shutil.copy(PHOTOS[i], src / f"p{i}.jpg")
    cfg = PrepareConfig(resolution=64, crop="center", caption_template="{token} {class_word}, bearded, studio light")
    assert prepare_dataset(src, tmp_path / "o", cfg).warnings == []
