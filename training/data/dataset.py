"""A prepared dataset: how it is made (`PrepareConfig`), the files of its folder, the records of
`dataset.json`, and `load_dataset`, which gives the trainer its items.

Layout of a prepared folder (flat, so any trainer that reads image + same-stem .txt works):
    <stem>.png, <stem>.txt            one crop and its caption per kept photo
    <stem>_flip.png, <stem>_flip.txt  its mirror, with `flip`
    <stem>_mask.png                   the user's mask of the photo, cut like the crop (white = subject)
    contact_sheet.png                 every crop with its file name, to check crops at a glance
    dataset.json                      written last: a folder without it is not a finished dataset
    .prepare_unfinished               only while a run writes (or after it was stopped): the folder is ours
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import UserError, input_name
from .crop import CROP_MODES, CROP_VERSION, Box
from .regions import region_image, subject_map

DATASET_JSON = "dataset.json"
CONTACT_SHEET = "contact_sheet.png"
UNFINISHED = ".prepare_unfinished"
DATASET_FORMAT = 1
FLIP_SUFFIX = "_flip"


@dataclass
class PrepareConfig:
    """How a photo folder becomes a dataset."""

    token: str = "sks"
    class_word: str = "man"
    resolution: int = 512
    crop: str = "face"  # face | center | pad
    flip: bool = False
    repeats: int = 1
    caption_template: str = "a photo of {token} {class_word}"

    def validate(self) -> "PrepareConfig":
        """Raise UserError naming the first bad field; return self."""
        for name in ("token", "class_word"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or "{" in value or "}" in value:
                raise UserError(f"{name} must be a non-empty word without braces, got {value!r}.")
        if not _is_int(self.resolution) or self.resolution < 64 or self.resolution % 8 or self.resolution > 4096:
            raise UserError(f"{input_name('resolution')} must be a multiple of 8 from 64 to 4096 (e.g. 512), got {self.resolution!r}.")
        if self.crop not in CROP_MODES:
            raise UserError(f"{input_name('crop')} must be one of {', '.join(CROP_MODES)}, got {self.crop!r}.")
        if not isinstance(self.flip, bool):
            raise UserError(f"{input_name('flip')} must be true or false, got {self.flip!r}.")
        if not _is_int(self.repeats) or self.repeats < 1:
            raise UserError(f"{input_name('repeats')} must be a whole number of at least 1, got {self.repeats!r}.")
        if not isinstance(self.caption_template, str) or "{token}" not in self.caption_template:
            raise UserError(f"{input_name('caption_template')} must contain {{token}} (e.g. 'a photo of {{token}} {{class_word}}'), got {self.caption_template!r}.")
        if "{" in _PLACEHOLDER.sub("", self.caption_template) or "}" in _PLACEHOLDER.sub("", self.caption_template):
            raise UserError(f"{input_name('caption_template')} may only use {{token}} and {{class_word}} (or {{class}}) in braces; "
                            f"remove the other braces from {self.caption_template!r}.")
        return self

    @property
    def instance_prompt(self) -> str:
        return _PLACEHOLDER.sub(lambda m: self.token.strip() if m[1] == "token" else self.class_word.strip(),
                                self.caption_template)

    def crop_key(self) -> str:
        """What the crop pixels depend on besides the photo itself."""
        return short_hash({"resolution": self.resolution, "crop": self.crop, "version": CROP_VERSION})


_PLACEHOLDER = re.compile(r"\{(token|class_word|class)\}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ItemRecord:
    """One kept photo, as written to dataset.json. Boxes are in source pixels (after EXIF rotation),
    but the subject region, in crop pixels: `subject_mask` (a cropped user mask, white = subject) or
    else `subject_box` (from the face; see regions.py), or neither (no region)."""

    source: str
    sha256: str
    image: str
    caption: str
    caption_source: str  # "template" | "sidecar"
    source_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    face_found: bool | None  # None when the crop mode does not look for faces
    face_box: tuple[float, float, float, float] | None
    upscaled: bool
    crop_key: str
    flipped_image: str | None = None
    warnings: list[str] = field(default_factory=list)
    subject_box: tuple[float, float, float, float] | None = None
    subject_mask: str | None = None
    mask_sha256: str | None = None  # of the user's mask file, to redo the crop when it changes


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class DatasetItem:
    """One training image of a prepared dataset."""

    image: Path
    caption: str
    source: str
    flipped: bool = False
    face_found: bool | None = None
    upscaled: bool = False
    subject_box: Box | None = None  # crop pixels of the unflipped crop
    subject_mask: Path | None = None


@dataclass
class PreparedDataset:
    """A prepared dataset as the trainer sees it."""

    folder: Path
    config: PrepareConfig
    items: list[DatasetItem]

    @property
    def instance_prompt(self) -> str:
        return self.config.instance_prompt

    def training_items(self) -> list[DatasetItem]:
        """The items of one epoch: every item `repeats` times."""
        return [item for item in self.items for _ in range(self.config.repeats)]

    def __len__(self) -> int:
        return len(self.items)

    def subject_map(self, item: DatasetItem, size: int):
        """The item's subject region on a `size` x `size` grid (float32, 1 inside, 0 outside; mirrored
        for a flipped copy), or None when it has none."""
        region = region_image(self.config.resolution, item.subject_box, item.subject_mask, item.flipped)
        return None if region is None else subject_map(region, size)


def load_dataset(folder: str | Path) -> PreparedDataset:
    """A prepared dataset (as `prepare_dataset` wrote it), for the trainer."""
    folder = Path(folder)
    path = folder / DATASET_JSON
    if not folder.is_dir():
        raise UserError(f"The dataset folder {folder} does not exist; prepare one with `python -m training prepare PHOTOS --out {folder}`.")
    if not path.is_file():
        raise UserError(f"{folder} has no {DATASET_JSON}: it is not a prepared dataset or its preparation did not finish; run prepare into it again.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != DATASET_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        known = {f.name for f in fields(PrepareConfig)}
        config = PrepareConfig(**{k: v for k, v in doc["config"].items() if k in known}).validate()
        records = [record_from_json(e) for e in doc["items"]]
        if None in records:
            raise ValueError("an item has unknown fields")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        raise UserError(f"{path} is damaged, unreadable or from another version ({exc}); run prepare into {folder} again.") from None
    items = []
    for r in records:
        pairs = [(r.image, False)] + ([(r.flipped_image, True)] if r.flipped_image else [])
        for name in [n for n, _ in pairs] + ([r.subject_mask] if r.subject_mask else []):
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} is listed in {DATASET_JSON} but missing; run prepare into {folder} again.")
        box = Box(*r.subject_box) if r.subject_box else None
        mask = folder / r.subject_mask if r.subject_mask else None
        for name, flipped in pairs:
            items.append(DatasetItem(folder / name, r.caption, r.source, flipped, r.face_found, r.upscaled, box, mask))
    return PreparedDataset(folder, config, items)


def record_from_json(entry: dict) -> ItemRecord | None:
    try:
        known = {f.name for f in fields(ItemRecord)}
        record = ItemRecord(**{k: v for k, v in entry.items() if k in known})
        for name in ("source_size", "crop_box", "face_box", "subject_box"):  # JSON gives lists
            value = getattr(record, name)
            setattr(record, name, tuple(value) if value is not None else None)
        return record
    except (TypeError, AttributeError):  # not an item of ours: no reuse, the photo is redone
        return None


def short_hash(value) -> str:
    """16 hex digits of the sha256 of `value` as sorted JSON: a cache key."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
