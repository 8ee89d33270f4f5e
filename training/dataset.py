"""Photo folder -> prepared dataset: square crops (face, center or pad), captions,
`dataset.json` and a contact sheet. A re-run on unchanged inputs reuses every output.

Layout of the output folder (flat, so any trainer that reads image + same-stem .txt works):
    <stem>.png, <stem>.txt            one crop and its caption per kept photo
    <stem>_flip.png, <stem>_flip.txt  its mirror, with `flip`
    contact_sheet.png                 every crop with its file name, to check crops at a glance
    dataset.json                      written last: a folder without it is not a finished dataset
    .prepare_unfinished               only while a run writes (or after it was stopped): the folder is ours

A folder that is neither ours (no dataset.json, no .prepare_unfinished) nor empty is the user's:
prepare refuses to write over any of its files unless told to overwrite.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError, name_list
from .progress import Progress, ProgressFn, no_progress
from .safe_io import atomic_save_image, atomic_write_text

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CROP_MODES = ("face", "center", "pad")
DATASET_JSON = "dataset.json"
CONTACT_SHEET = "contact_sheet.png"
UNFINISHED = ".prepare_unfinished"
DATASET_FORMAT = 1
# Bump when the crop pixels for the same inputs change (decoding, geometry, detector):
# it is part of every cache key, so old outputs are redone instead of trusted.
CROP_VERSION = 1
PAD_COLOR = (255, 255, 255)
FLIP_SUFFIX = "_flip"
SHEET_THUMB = 128
ONE_PHOTO_WARNING = ("only one usable photo was found: training works, but the model learns that one picture "
                     "(its pose, light and background); 10-20 varied photos of the subject are recommended")

# Head-and-shoulders framing: the face box is this fraction of the square's side, and
# its centre sits this far down the square (upper middle, shoulders below).
FACE_HEIGHT_FRACTION = 0.38
FACE_WIDTH_FRACTION = 0.45
FACE_CENTER_Y = 0.42
FACE_MODEL = Path(__file__).resolve().parent / "configs" / "face_detector" / "face_detection_yunet_2023mar.onnx"
DETECT_MAX_SIDE = 640  # YuNet finds faces of ~10-300 px: detect on a copy this size, then half
FACE_SCORE_THRESHOLD = 0.7


# ---------------------------------------------------------------- configuration


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
            raise UserError(f"resolution must be a multiple of 8 from 64 to 4096 (e.g. 512), got {self.resolution!r}.")
        if self.crop not in CROP_MODES:
            raise UserError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}.")
        if not isinstance(self.flip, bool):
            raise UserError(f"flip must be true or false, got {self.flip!r}.")
        if not _is_int(self.repeats) or self.repeats < 1:
            raise UserError(f"repeats must be a whole number of at least 1, got {self.repeats!r}.")
        if not isinstance(self.caption_template, str) or "{token}" not in self.caption_template:
            raise UserError(f"caption_template must contain {{token}} (e.g. 'a photo of {{token}} {{class_word}}'), got {self.caption_template!r}.")
        if "{" in _PLACEHOLDER.sub("", self.caption_template) or "}" in _PLACEHOLDER.sub("", self.caption_template):
            raise UserError(f"caption_template may only use {{token}} and {{class_word}} (or {{class}}) in braces; "
                            f"remove the other braces from {self.caption_template!r}.")
        return self

    @property
    def instance_prompt(self) -> str:
        return _PLACEHOLDER.sub(lambda m: self.token.strip() if m[1] == "token" else self.class_word.strip(),
                                self.caption_template)

    def crop_key(self) -> str:
        """What the crop pixels depend on besides the photo itself."""
        return _short_hash({"resolution": self.resolution, "crop": self.crop, "version": CROP_VERSION})


_PLACEHOLDER = re.compile(r"\{(token|class_word|class)\}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- results


@dataclass
class ItemRecord:
    """One kept photo, as written to dataset.json. Boxes are in source pixels (after EXIF rotation)."""

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


@dataclass
class Skipped:
    source: str
    reason: str


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


@dataclass
class DatasetItem:
    """One training image of a prepared dataset."""

    image: Path
    caption: str
    source: str
    flipped: bool = False
    face_found: bool | None = None
    upscaled: bool = False


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


# ---------------------------------------------------------------- decoding


class SkipImage(Exception):
    """This file cannot be used; the message is the reason shown in the report."""


@dataclass
class Photo:
    """A decoded photo: 8-bit RGB, upright, maybe decoded downscaled from `full_size`."""

    image: Image.Image
    full_size: tuple[int, int]
    notes: list[str]

    @property
    def scale(self) -> float:
        """Source pixels per decoded pixel (1.0 unless decoded downscaled)."""
        return self.full_size[0] / self.image.width


def open_photo(data: bytes, min_side: int | None = None) -> Photo:
    """Decode image bytes: first frame, EXIF orientation, 8-bit RGB. With `min_side`, a large
    image is decoded downscaled (JPEG draft, else reduce), its short side kept >= min_side.
    Raises SkipImage with the reason when the bytes are not a usable image."""
    notes: list[str] = []
    if not data:
        raise SkipImage("empty file (0 bytes); copy the photo again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning: the engine never prints
            im = Image.open(io.BytesIO(data))
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(f"{frames} frames ({im.format}); used the first")
            full_size = im.size
            if min_side and im.format in ("JPEG", "MPO") and min(full_size) >= 2 * min_side:
                factor = min(full_size) / min_side
                im.draft(None, (math.ceil(full_size[0] / factor), math.ceil(full_size[1] / factor)))
            im.load()
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                full_size = (full_size[1], full_size[0])
            rgb = to_rgb8(ImageOps.exif_transpose(im))
            if min_side and min(rgb.size) >= 2 * min_side:
                rgb = rgb.reduce(min(rgb.size) // min_side)
    except Image.DecompressionBombError as exc:
        raise SkipImage(f"too many pixels to decode safely ({exc}); save a smaller copy of it") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not an image, or a format Pillow cannot read") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt data
        raise SkipImage(f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return Photo(rgb, full_size, notes)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float
    images are scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, PAD_COLOR + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else _guess_white(arr)
        gray = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if im.mode == "CMYK" and im.info.get("icc_profile"):
        converted = _cmyk_with_profile(im)
        if converted is not None:
            return converted
    return im.convert("RGB")


def _guess_white(arr: np.ndarray) -> float:
    """The white point of an `I` or `F` image: 1.0, 255, 65535, or the maximum."""
    peak = float(arr.max()) if arr.size else 1.0
    for white in (1.0, 255.0, 65535.0):
        if peak <= white:
            return white
    return peak


def _cmyk_with_profile(im: Image.Image) -> Image.Image | None:
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None  # a broken profile: fall back to Pillow's plain conversion


# ---------------------------------------------------------------- faces and crop geometry


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x0, y0) - (x1, y1), in pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def contains(self, other: "Box", tolerance: float = 0.0) -> bool:
        return (other.x0 >= self.x0 - tolerance and other.y0 >= self.y0 - tolerance
                and other.x1 <= self.x1 + tolerance and other.y1 <= self.y1 + tolerance)

    def scaled(self, factor: float) -> "Box":
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)

    def as_list(self, digits: int = 2) -> list[float]:
        return [round(v, digits) for v in (self.x0, self.y0, self.x1, self.y1)]


_DETECTOR_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _face_detector():
    try:
        import cv2

        cv2.FaceDetectorYN  # noqa: B018 - OpenCV 4.8 and later
    except (ImportError, AttributeError):
        raise UserError("The face crop needs OpenCV 4.8 or later (pip install opencv-python-headless); "
                        "install it or use --crop center.") from None
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # it warns about DNN targets on stderr
    try:
        return cv2.FaceDetectorYN.create(str(FACE_MODEL), "", (320, 320), FACE_SCORE_THRESHOLD, 0.3, 50)
    finally:
        cv2.utils.logging.setLogLevel(level)


def detect_faces(image: Image.Image, max_side: int = DETECT_MAX_SIDE) -> list[Box]:
    """Face boxes in `image` pixels, largest first; [] when there is none."""
    longest = max(image.size)
    for side in (min(max_side, longest), min(max_side, longest) // 2):
        if side < 32:
            break
        factor = side / longest
        small = image if factor == 1 else image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(small.convert("RGB"))[:, :, ::-1])
        with _DETECTOR_LOCK:
            detector = _face_detector()
            detector.setInputSize(small.size)
            _, rows = detector.detect(bgr)
        if rows is not None and len(rows):
            boxes = [Box(*(float(v) / factor for v in (x, y, x + w, y + h))) for x, y, w, h in rows[:, :4]]
            return sorted(boxes, key=lambda b: b.width * b.height, reverse=True)
    return []


def face_crop_box(face: Box, image_size: tuple[int, int]) -> Box:
    """The square that frames head and shoulders around `face`, with integer corners.
    It stays inside the image when the image allows, is never smaller than the face box and
    always contains it (it reaches past the image, to be padded, only when the face is
    larger than the image's short side)."""
    width, height = image_size
    fx0, fy0 = math.floor(max(0.0, face.x0)), math.floor(max(0.0, face.y0))
    fx1, fy1 = math.ceil(min(float(width), face.x1)), math.ceil(min(float(height), face.y1))
    fw, fh = max(1, fx1 - fx0), max(1, fy1 - fy0)
    side = round(max(fh / FACE_HEIGHT_FRACTION, fw / FACE_WIDTH_FRACTION))
    side = max(min(side, width, height), fw, fh)
    left = _place(round((fx0 + fx1) / 2 - side / 2), side, width, fx0, fx0 + fw)
    top = _place(round((fy0 + fy1) / 2 - FACE_CENTER_Y * side), side, height, fy0, fy0 + fh)
    return Box(left, top, left + side, top + side)


def _place(start: int, side: int, length: int, lo: int, hi: int) -> int:
    """Slide a span of `side` into [0, length) if it fits, else centre it; [lo, hi) always stays inside."""
    start = min(max(start, 0), length - side) if side <= length else (length - side) // 2
    return min(max(start, hi - side), lo)


def center_crop_box(image_size: tuple[int, int]) -> Box:
    width, height = image_size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


def pad_box(image_size: tuple[int, int]) -> Box:
    """The square around the whole image (letterbox: no pixel is cut)."""
    width, height = image_size
    side = max(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


def render_square(image: Image.Image, box: Box, resolution: int) -> Image.Image:
    """The square `box` of `image` resized to `resolution`; parts outside the image are PAD_COLOR."""
    side = box.width
    inside = Box(max(box.x0, 0), max(box.y0, 0), min(box.x1, image.width), min(box.y1, image.height))
    if inside == box:
        return image.resize((resolution, resolution), Image.Resampling.LANCZOS,
                            box=(box.x0, box.y0, box.x1, box.y1), reducing_gap=3.0)
    scale = resolution / side
    canvas = Image.new("RGB", (resolution, resolution), PAD_COLOR)
    dx0, dy0 = round((inside.x0 - box.x0) * scale), round((inside.y0 - box.y0) * scale)
    dx1, dy1 = round((inside.x1 - box.x0) * scale), round((inside.y1 - box.y0) * scale)
    if dx1 > dx0 and dy1 > dy0:
        part = image.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS,
                            box=(inside.x0, inside.y0, inside.x1, inside.y1), reducing_gap=3.0)
        canvas.paste(part, (dx0, dy0))
    return canvas


@dataclass
class Crop:
    image: Image.Image
    source_size: tuple[int, int]
    box: Box  # in source pixels
    face: Box | None
    face_searched: bool
    upscaled: bool
    notes: list[str]


def crop_photo(photo: Photo, cfg: PrepareConfig, reopen: Callable[[], Photo] | None = None) -> Crop:
    """Crop one decoded photo per `cfg.crop`. `reopen` decodes it again at full size: used
    when the face crop of a downscaled decode would have to be upscaled."""
    notes = list(photo.notes)
    face = None
    if cfg.crop == "face":
        faces = detect_faces(photo.image)
        if faces:
            face = faces[0]
            box = face_crop_box(face, photo.image.size)
            if box.width < cfg.resolution and photo.scale > 1 and reopen is not None:
                full = reopen()
                face = face.scaled(photo.scale / full.scale)
                photo = full
                box = face_crop_box(face, photo.image.size)
        else:
            box = center_crop_box(photo.image.size)
            notes.append("no face found; used the center crop")
    elif cfg.crop == "center":
        box = center_crop_box(photo.image.size)
    else:
        box = pad_box(photo.image.size)
    square = render_square(photo.image, box, cfg.resolution)
    source_box = box.scaled(photo.scale)
    upscaled = source_box.width < cfg.resolution
    if upscaled:
        notes.append(f"upscaled from {round(source_box.width)} px to {cfg.resolution} px")
    face_box = face.scaled(photo.scale) if face else None
    return Crop(square, photo.full_size, source_box, face_box, cfg.crop == "face", upscaled, notes)


# ---------------------------------------------------------------- captions

CAPTION_PREPENDED = "its caption file lacked the token; prepended it"


def caption_for(cfg: PrepareConfig, sidecar_text: str | None) -> tuple[str, str, list[str]]:
    """(caption, where it came from, notes): the sidecar text with {token} and {class_word}
    filled in, or the token prepended when it lacks it; the template when there is none."""
    text = " ".join((sidecar_text or "").split())
    if not text:
        return cfg.instance_prompt, "template", []
    token, class_word = cfg.token.strip(), cfg.class_word.strip()
    if "{token}" in text or "{class_word}" in text:
        return text.replace("{token}", token).replace("{class_word}", class_word), "sidecar", []
    if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text):
        return text, "sidecar", []
    return f"{token}, {text}", "sidecar", [CAPTION_PREPENDED]


# ---------------------------------------------------------------- sources


@dataclass
class _Source:
    """One input: `read()` returns its content hash and a decoder `decode(min_side) -> Photo`."""

    name: str
    read: Callable[[], tuple[str, Callable[[int | None], Photo]]]
    sidecar: Path | None = None
    stem: str = ""


def _file_source(path: Path, sidecar: Path | None) -> _Source:
    def read():
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), lambda min_side: open_photo(data, min_side)

    return _Source(path.name, read, sidecar, path.stem)


def _pil_source(index: int, image: Image.Image) -> _Source:
    def read():
        digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest(), lambda min_side: _photo_from_pil(image, min_side)

    name = f"image_{index:04d}"
    return _Source(name, read, None, name)


def _photo_from_pil(image: Image.Image, min_side: int | None) -> Photo:
    rgb = to_rgb8(image)
    if min_side and min(rgb.size) >= 2 * min_side:
        rgb = rgb.reduce(min(rgb.size) // min_side)
    return Photo(rgb, image.size, [])


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _scan_folder(src: Path) -> tuple[list[_Source], list[Skipped]]:
    """The photos of a folder (not its subfolders), their sidecar captions, and the rest as skipped."""
    try:
        files = sorted((p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: _natural_key(p.name))
    except OSError as exc:
        raise UserError(f"The photo folder {src} cannot be read ({exc.strerror or exc}); check its permissions, "
                        "or copy the photos to a folder you can read.") from None
    photos = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    photo_stems = {p.stem for p in photos}
    sidecars = {p.stem: p for p in files if p.suffix.lower() == ".txt" and p.stem in photo_stems}
    skipped = [
        Skipped(p.name, f"not a supported image type ({p.suffix or 'no extension'}); "
                        "use jpg, jpeg, png, webp, bmp, tif(f) or gif")
        for p in files if p not in photos and p not in sidecars.values()
    ]
    return [_file_source(p, sidecars.get(p.stem)) for p in photos], skipped


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
                        progress: ProgressFn = no_progress, overwrite: bool = False) -> DatasetReport:
    """Like `prepare_dataset`, for images already in memory (a ComfyUI IMAGE batch)."""
    cfg.validate()
    if not images:
        raise UserError("The image batch is empty; give at least one photo of the subject.")
    sources = [_pil_source(i + 1, image) for i, image in enumerate(images)]
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


def _record_from_json(entry: dict) -> ItemRecord | None:
    try:
        known = {f.name for f in fields(ItemRecord)}
        record = ItemRecord(**{k: v for k, v in entry.items() if k in known})
        for name in ("source_size", "crop_box", "face_box"):  # JSON gives lists
            value = getattr(record, name)
            setattr(record, name, tuple(value) if value is not None else None)
        return record
    except (TypeError, AttributeError):  # not an item of ours: no reuse, the photo is redone
        return None


def _outputs(record: ItemRecord) -> list[str]:
    names = [record.image, Path(record.image).stem + ".txt"]
    if record.flipped_image:
        names += [record.flipped_image, Path(record.flipped_image).stem + ".txt"]
    return names


def _refuse_foreign_files(out: Path, sources: list[_Source], cfg: PrepareConfig) -> None:
    """`out` is not ours (no dataset.json, not an unfinished run of ours): refuse before writing
    anything if any file there has the name of one of our outputs."""
    names = [CONTACT_SHEET, DATASET_JSON]
    for source in sources:
        names += [source.stem + ".png", source.stem + ".txt"]
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
    previous = {r.source: r for r in map(_record_from_json, previous_doc.get("items", [])) if r is not None}
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
            thumbs[record.image] = _thumbnail(crop_image)
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

    sheet_key = _short_hash([(r.image, r.source, r.sha256, r.crop_key, _needs_a_look(r)) for r in records])
    if previous_doc.get("sheet_key") != sheet_key or not (out / CONTACT_SHEET).is_file():
        tiles = [(thumbs.get(r.image) or _thumbnail(_open_png(out / r.image)), r.source, _needs_a_look(r))
                 for r in records]
        writer.image(make_contact_sheet(tiles), CONTACT_SHEET)

    dataset_warnings = [ONE_PHOTO_WARNING] if len(records) == 1 else []  # none usable raised above
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
    name, crop_key = source.stem + ".png", cfg.crop_key()
    if old and (old.sha256, old.crop_key, old.image) == (sha, crop_key, name) and (out / name).is_file():
        record = ItemRecord(**asdict(old))
        record.warnings = [w for w in old.warnings if w != CAPTION_PREPENDED]
        return record, None
    # headroom for the face crop, which is only part of the photo
    crop = crop_photo(decode(cfg.resolution * (2 if cfg.crop == "face" else 1)), cfg, reopen=lambda: decode(None))
    writer.image(crop.image, name)
    record = ItemRecord(
        source=source.name, sha256=sha, image=name, caption="", caption_source="template",
        source_size=crop.source_size, crop_box=tuple(crop.box.as_list()),
        face_found=(crop.face is not None) if crop.face_searched else None,
        face_box=tuple(crop.face.as_list()) if crop.face else None,
        upscaled=crop.upscaled, crop_key=crop_key, warnings=crop.notes)
    return record, crop.image


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


def _needs_a_look(record: ItemRecord) -> bool:
    """Flagged on the contact sheet: no face where one was looked for, or upscaled."""
    return record.face_found is False or record.upscaled


def _thumbnail(image: Image.Image) -> Image.Image:
    return image.resize((SHEET_THUMB, SHEET_THUMB), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _open_png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- contact sheet


def make_contact_sheet(tiles: Sequence[tuple[Image.Image, str, bool]], thumb: int = SHEET_THUMB) -> Image.Image:
    """All crops in a grid, each with its file name under it; flagged ones (no face,
    upscaled) get a red frame and a '!' before the name."""
    pad, label_height = 8, 16
    cols = max(1, min(8, math.ceil(math.sqrt(len(tiles)))))
    rows = max(1, math.ceil(len(tiles) / cols))
    cell_w, cell_h = thumb + pad, thumb + label_height + pad
    sheet = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = _label_font()
    for i, (image, label, flagged) in enumerate(tiles):
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        if image.size != (thumb, thumb):
            image = image.resize((thumb, thumb), Image.Resampling.BILINEAR, reducing_gap=2.0)
        sheet.paste(image, (x, y))
        if flagged:
            draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=(235, 64, 52), width=3)
        text = _fit_text(draw, ("! " if flagged else "") + label, font, thumb)
        draw.text((x, y + thumb + 3), text, fill=(235, 64, 52) if flagged else (230, 230, 230), font=font)
    return sheet


@lru_cache(maxsize=1)
def _label_font():
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten in the middle: names of one folder tend to differ at their ends."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while len(head) + len(tail) > 2 and draw.textlength(head + "…" + tail, font=font) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail


# ---------------------------------------------------------------- reading a prepared dataset


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
        records = [_record_from_json(e) for e in doc["items"]]
        if None in records:
            raise ValueError("an item has unknown fields")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        raise UserError(f"{path} is damaged, unreadable or from another version ({exc}); run prepare into {folder} again.") from None
    items = []
    for r in records:
        pairs = [(r.image, False)] + ([(r.flipped_image, True)] if r.flipped_image else [])
        for name, flipped in pairs:
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} is listed in {DATASET_JSON} but missing; run prepare into {folder} again.")
            items.append(DatasetItem(folder / name, r.caption, r.source, flipped, r.face_found, r.upscaled))
    return PreparedDataset(folder, config, items)
