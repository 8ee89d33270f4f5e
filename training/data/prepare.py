"""Photo folder (or images in memory) -> prepared dataset: square crops (face, center or pad),
captions, subject regions, `dataset.json` and a contact sheet (layout in `dataset.py`). A re-run
on unchanged inputs reuses every output. In a photo folder, `<stem>.txt` is a photo's caption and
`<stem>_mask.png` its mask (white = subject), never a photo of its own.

A folder that is neither ours (no dataset.json, no .prepare_unfinished) nor empty is the user's:
prepare refuses to write over any of its files unless told to overwrite.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageOps

from ..errors import UserError, name_list
from ..progress import Progress, ProgressFn, no_progress
from ..safe_io import atomic_save_image, atomic_write_text
from .captions import CAPTION_PREPENDED, caption_for, caption_warning
from .crop import Box, Crop, crop_photo
from .dataset import (CONTACT_SHEET, DATASET_FORMAT, DATASET_JSON, FLIP_SUFFIX, UNFINISHED, ItemRecord,
                      PrepareConfig, Skipped, record_from_json, short_hash)
from .photos import IMAGE_SUFFIXES, Photo, SkipImage, open_photo, photo_from_pil
from .regions import MASK_SUFFIX, crop_mask, head_and_shoulders, is_mask, mask_size_problem, read_mask_file, region_image
from .report import SHEET_THUMB, DatasetReport, make_contact_sheet, needs_a_look, thumbnail

ONE_PHOTO_WARNING = ("only one usable photo was found: training works, but the model learns that one picture "
                     "(its pose, light and background); 10-20 varied photos of the subject are recommended")


# ---------------------------------------------------------------- sources


@dataclass
class _Source:
    """One input: `read()` returns its content hash and a decoder `decode(min_side) -> Photo`;
    `read_mask()`, when the user gave a mask, its hash and a decoder of the gray mask."""

    name: str
    read: Callable[[], tuple[str, Callable[[int | None], Photo]]]
    sidecar: Path | None = None
    stem: str = ""
    read_mask: Callable[[], tuple[str, Callable[[], Image.Image]]] | None = None


def _file_source(path: Path, sidecar: Path | None, mask: Path | None = None) -> _Source:
    def read():
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), lambda min_side: open_photo(data, min_side)

    def read_mask():
        data = mask.read_bytes()
        return hashlib.sha256(data).hexdigest(), lambda: read_mask_file(data, mask.name)

    return _Source(path.name, read, sidecar, path.stem, read_mask if mask else None)


def _pil_source(index: int, image: Image.Image, mask: Image.Image | None = None) -> _Source:
    def read():
        return _pil_hash(image), lambda min_side: photo_from_pil(image, min_side)

    def read_mask():
        return _pil_hash(mask), lambda: mask.convert("L")

    name = f"image_{index:04d}"
    return _Source(name, read, None, name, read_mask if mask is not None else None)


def _pil_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _scan_folder(src: Path) -> tuple[list[_Source], list[Skipped]]:
    """The photos of a folder (not its subfolders), their sidecar captions and masks, and the rest as skipped."""
    try:
        files = sorted((p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: _natural_key(p.name))
    except OSError as exc:
        raise UserError(f"The photo folder {src} cannot be read ({exc.strerror or exc}); check its permissions, "
                        "or copy the photos to a folder you can read.") from None
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    photos = [p for p in images if not is_mask(p)]
    photo_stems = {p.stem for p in photos}
    sidecars = {p.stem: p for p in files if p.suffix.lower() == ".txt" and p.stem in photo_stems}
    masks = {p.stem[: -len(MASK_SUFFIX)]: p for p in images if is_mask(p)}
    skipped = [
        Skipped(p.name, f"not a supported image type ({p.suffix or 'no extension'}); "
                        "use jpg, jpeg, png, webp, bmp, tif(f) or gif")
        for p in files if p not in images and p not in sidecars.values()
    ] + [
        Skipped(p.name, f"a mask without its photo (no {stem}.* beside it); rename it to <photo name>{MASK_SUFFIX}.png")
        for stem, p in masks.items() if stem not in photo_stems
    ]
    return [_file_source(p, sidecars.get(p.stem), masks.get(p.stem)) for p in photos], skipped


def _assign_stems(sources: list[_Source]) -> None:
    """Unique output stems, also against `<stem>_flip` and case-insensitive file systems."""
    taken = {Path(CONTACT_SHEET).stem, Path(DATASET_JSON).stem}
    for source in sources:
        base = source.stem or "image"
        stem, n = base, 1
        while stem.lower() in taken or (stem + FLIP_SUFFIX).lower() in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.update({stem.lower(), (stem + FLIP_SUFFIX).lower()})
        source.stem = stem


# ---------------------------------------------------------------- preparing


def prepare_dataset(src: str | Path, out: str | Path, cfg: PrepareConfig,
                    progress: ProgressFn = no_progress, overwrite: bool = False) -> DatasetReport:
    """Crop, caption and check every photo of `src` into `out` (see the module docstring). Files of
    another origin in `out` that have the names of our outputs are replaced only with `overwrite`."""
    cfg.validate()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise UserError(f"The photo folder {src} does not exist; pass the folder that holds the subject's photos.")
    if not src.is_dir():
        raise UserError(f"{src} is a file, not a folder; pass the folder that holds the subject's photos.")
    if out.resolve() == src.resolve():
        raise UserError(f"The output folder {out} is the photo folder itself; choose another --out folder.")
    sources, skipped = _scan_folder(src)
    return _prepare(sources, skipped, out, cfg, progress, origin=str(src), overwrite=overwrite)


def prepare_from_images(images: Sequence[Image.Image], out: str | Path, cfg: PrepareConfig,
                        progress: ProgressFn = no_progress, overwrite: bool = False,
                        masks: Sequence[Image.Image] | None = None) -> DatasetReport:
    """Like `prepare_dataset`, for images already in memory (a ComfyUI IMAGE batch); `masks`, one
    per image (white = subject), are their subject regions."""
    cfg.validate()
    if not images:
        raise UserError("The image batch is empty; give at least one photo of the subject.")
    if masks is not None and len(masks) != len(images):
        raise UserError(f"The mask batch has {len(masks)} masks for {len(images)} images; give one mask per image.")
    sources = [_pil_source(i + 1, image, masks[i] if masks is not None else None) for i, image in enumerate(images)]
    return _prepare(sources, [], Path(out), cfg, progress, origin=f"a batch of {len(sources)} images",
                    overwrite=overwrite)


class _Writer:
    """Writes outputs atomically; before the first change it marks the folder unfinished (and
    ours) and removes dataset.json, so an interrupted run never leaves a folder that looks finished."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.changed = False

    def _touch(self) -> None:
        if not self.changed:
            if self.folder.exists() and not self.folder.is_dir():
                raise UserError(f"The output folder {self.folder} is a file; choose a folder for --out.")
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"The output folder {self.folder} cannot be made ({exc.strerror or exc}); "
                                "choose a folder you can write to.") from None
            atomic_write_text(self.folder / UNFINISHED, "python -m training prepare is writing this folder, "
                              f"or was stopped; it is a finished dataset once {DATASET_JSON} is here.\n")
            (self.folder / DATASET_JSON).unlink(missing_ok=True)
            self.changed = True

    def image(self, image: Image.Image, name: str) -> None:
        self._touch()
        atomic_save_image(image, self.folder / name, format="PNG", compress_level=1)

    def text(self, name: str, text: str) -> None:
        path = self.folder / name
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
            return
        self._touch()
        atomic_write_text(path, text)

    def remove(self, name: str) -> None:
        path = self.folder / name
        if Path(name).name == name and path.is_file():  # only our own flat outputs
            self._touch()
            path.unlink()


def _read_previous(out: Path) -> tuple[dict, str]:
    """The last finished run's dataset.json (parsed, raw text), or ({}, "")."""
    try:
        raw = (out / DATASET_JSON).read_text(encoding="utf-8")
        doc = json.loads(raw)
    except (OSError, ValueError):
        return {}, ""
    return (doc, raw) if isinstance(doc, dict) and doc.get("format") == DATASET_FORMAT else ({}, "")


def _outputs(record: ItemRecord) -> list[str]:
    names = [record.image, Path(record.image).stem + ".txt"]
    if record.flipped_image:
        names += [record.flipped_image, Path(record.flipped_image).stem + ".txt"]
    if record.subject_mask:
        names.append(record.subject_mask)
    return names


def _refuse_foreign_files(out: Path, sources: list[_Source], cfg: PrepareConfig) -> None:
    """`out` is not ours (no dataset.json, not an unfinished run of ours): refuse before writing
    anything if any file there has the name of one of our outputs."""
    names = [CONTACT_SHEET, DATASET_JSON]
    for source in sources:
        names += [source.stem + ".png", source.stem + ".txt"]
        if source.read_mask:
            names.append(source.stem + MASK_SUFFIX + ".png")
        if cfg.flip:
            names += [source.stem + FLIP_SUFFIX + ".png", source.stem + FLIP_SUFFIX + ".txt"]
    taken = [name for name in names if (out / name).exists()]
    if taken:
        raise UserError(f"The output folder {out} has no {DATASET_JSON} from prepare but already holds "
                        f"{name_list(taken)}, "
                        "which prepare would overwrite; choose an empty or new folder for --out, "
                        "or pass --overwrite to replace them.")


def _prepare(sources: list[_Source], skipped: list[Skipped], out: Path, cfg: PrepareConfig,
             progress: ProgressFn, origin: str, overwrite: bool = False) -> DatasetReport:
    started = time.perf_counter()
    previous_doc, previous_raw = _read_previous(out)
    previous = {r.source: r for r in map(record_from_json, previous_doc.get("items", [])) if r is not None}
    writer = _Writer(out)
    _assign_stems(sources)
    if not (overwrite or previous_doc or (out / UNFINISHED).is_file()):
        _refuse_foreign_files(out, sources, cfg)
    records: list[ItemRecord] = []
    thumbs: dict[str, Image.Image] = {}  # new crops, small, for the contact sheet
    reused = 0
    for index, source in enumerate(sources):
        progress(Progress("prepare", index, len(sources), {"note": source.name}))
        try:
            record, crop_image = _crop_one(source, previous.get(source.name), out, cfg, writer)
        except SkipImage as exc:
            skipped.append(Skipped(source.name, str(exc)))
            continue
        if crop_image is None:
            reused += 1
        else:
            thumbs[record.image] = thumbnail(crop_image)
        _write_captions_and_flip(source, record, crop_image, out, cfg, writer)
        records.append(record)
    progress(Progress("prepare", len(sources), len(sources), {"note": "done"}))

    if not records:
        examples = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:2])
        raise UserError(f"No usable photo in {origin}"
                        + (f" (skipped {len(skipped)}, e.g. {examples})" if skipped else "")
                        + "; add photos of the subject (jpg, jpeg, png, webp, bmp, tif(f) or gif).")
    kept = {name for r in records for name in _outputs(r)}
    for stale in {name for r in previous.values() for name in _outputs(r)} - kept:
        writer.remove(stale)

    sheet_key = short_hash([(r.image, r.source, r.sha256, r.crop_key, needs_a_look(r), r.subject_box,
                             r.mask_sha256) for r in records])
    if previous_doc.get("sheet_key") != sheet_key or not (out / CONTACT_SHEET).is_file():
        tiles = [(thumbs.get(r.image) or thumbnail(_open_png(out / r.image)), r.source, needs_a_look(r),
                  _region_thumb(r, out, cfg.resolution)) for r in records]
        writer.image(make_contact_sheet(tiles), CONTACT_SHEET)

    dataset_warnings = [ONE_PHOTO_WARNING] if len(records) == 1 else []  # none usable raised above
    repeated = caption_warning(cfg, [r.caption for r in records], sum(r.caption_source == "sidecar" for r in records))
    dataset_warnings += [repeated] if repeated else []
    doc = {
        "format": DATASET_FORMAT,
        "origin": origin,
        "config": asdict(cfg),
        "instance_prompt": cfg.instance_prompt,
        "sheet_key": sheet_key,
        "contact_sheet": CONTACT_SHEET,
        "items": [asdict(r) for r in records],
        "skipped": [asdict(s) for s in skipped],
    }
    if dataset_warnings:  # only when there are some: the text of older datasets (their hash) stays as it was
        doc["warnings"] = dataset_warnings
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if writer.changed or text != previous_raw:
        atomic_write_text(out / DATASET_JSON, text)  # last: its presence means "finished"
    (out / UNFINISHED).unlink(missing_ok=True)
    return DatasetReport(out, origin, cfg, records, skipped, reused, time.perf_counter() - started, dataset_warnings)


def _crop_one(source: _Source, old: ItemRecord | None, out: Path, cfg: PrepareConfig,
              writer: _Writer) -> tuple[ItemRecord, Image.Image | None]:
    """The record of one source and its new crop, or (the reused record, None) when the last
    run's crop is still valid (same bytes, same crop settings). Raises SkipImage."""
    try:
        sha, decode = source.read()
    except OSError as exc:
        raise SkipImage(f"cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        mask_sha, decode_mask = source.read_mask() if source.read_mask else (None, None)
    except OSError as exc:
        raise SkipImage(f"its mask cannot be read ({exc.strerror or exc}); check its permissions") from None
    name, crop_key = source.stem + ".png", cfg.crop_key()
    if (old and (old.sha256, old.crop_key, old.image, old.mask_sha256) == (sha, crop_key, name, mask_sha)
            and all((out / n).is_file() for n in [name] + ([old.subject_mask] if old.subject_mask else []))):
        record = ItemRecord(**asdict(old))
        record.warnings = [w for w in old.warnings if w != CAPTION_PREPENDED]
        _region_from_face(record, cfg.resolution)  # datasets made before regions get one too
        return record, None
    # headroom for the face crop, which is only part of the photo
    crop = crop_photo(decode(cfg.resolution * (2 if cfg.crop == "face" else 1)), cfg.crop, cfg.resolution,
                      reopen=lambda: decode(None))
    writer.image(crop.image, name)
    record = ItemRecord(
        source=source.name, sha256=sha, image=name, caption="", caption_source="template",
        source_size=crop.source_size, crop_box=tuple(crop.box.as_list()),
        face_found=(crop.face is not None) if crop.face_searched else None,
        face_box=tuple(crop.face.as_list()) if crop.face else None,
        upscaled=crop.upscaled, crop_key=crop_key, warnings=crop.notes, mask_sha256=mask_sha)
    if decode_mask is not None:
        _write_mask(decode_mask, crop, record, source.stem + MASK_SUFFIX + ".png", cfg.resolution, writer)
    _region_from_face(record, cfg.resolution)
    return record, crop.image


def _write_mask(decode_mask: Callable[[], Image.Image], crop: Crop, record: ItemRecord, name: str,
                resolution: int, writer: _Writer) -> None:
    """Cut the user's mask like the photo and save it beside the crop; a mask that cannot be used is
    a warning on the item (it trains without a region, or with the face's), never a skipped photo."""
    try:
        mask = decode_mask()
    except SkipImage as exc:
        record.warnings.append(str(exc))
        return
    problem = mask_size_problem(mask, crop.source_size)
    if problem:
        record.warnings.append(problem)
        return
    writer.image(crop_mask(mask, crop.box, crop.source_size, resolution), name)
    record.subject_mask = name


def _region_from_face(record: ItemRecord, resolution: int) -> None:
    """Without a mask, the region is the face grown to head and shoulders (regions.py), if a face was found."""
    if record.subject_mask is None and record.face_box is not None:
        box = head_and_shoulders(Box(*record.face_box), Box(*record.crop_box), resolution)
        record.subject_box = tuple(box.as_list())
    elif record.subject_mask is None:
        record.subject_box = None


def _region_thumb(record: ItemRecord, out: Path, resolution: int) -> Image.Image | None:
    box = Box(*record.subject_box) if record.subject_box else None
    region = region_image(resolution, box, out / record.subject_mask if record.subject_mask else None)
    return None if region is None else region.resize((SHEET_THUMB, SHEET_THUMB), Image.Resampling.BILINEAR)


def _write_captions_and_flip(source: _Source, record: ItemRecord, crop_image: Image.Image | None, out: Path,
                             cfg: PrepareConfig, writer: _Writer) -> None:
    try:
        sidecar = source.sidecar.read_text(encoding="utf-8-sig", errors="replace") if source.sidecar else None
        unread = []
    except OSError as exc:
        sidecar, unread = None, [f"its caption file cannot be read ({exc.strerror or exc}); used the template"]
    record.caption, record.caption_source, notes = caption_for(cfg, sidecar)
    record.warnings = record.warnings + unread + notes
    writer.text(source.stem + ".txt", record.caption)
    record.flipped_image = None
    if cfg.flip:
        record.flipped_image = source.stem + FLIP_SUFFIX + ".png"
        if crop_image is not None or not (out / record.flipped_image).is_file():
            writer.image(ImageOps.mirror(crop_image or _open_png(out / record.image)), record.flipped_image)
        writer.text(source.stem + FLIP_SUFFIX + ".txt", record.caption)


def _open_png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")

