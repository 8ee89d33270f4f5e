"""Evaluation of generated images against the subject's photos.

Per image: face found, identity distance (dlib's 128-d face embeddings), CLIP-I, CLIP-T
and DINO; aggregated per (method, rank, scene) and per (method, rank); written as JSON, a
plain-text table, an annotated grid and a bar chart. Every model is optional and local:
a missing one turns its columns into "not available" with the reason, never a download.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError
from .progress import Progress, ProgressFn, no_progress

# dlib's own threshold: two descriptors closer than this are the same person.
FACE_MATCH_THRESHOLD = 0.6
DLIB_INSTALL = "pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0"
FACE_DETECTORS = ("hog", "cnn", "hog+cnn")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OUTPUT_NAMES = ("report.json", "table.txt", "grid.png", "chart.png")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_EXPECTED = (
    "a local Hugging Face CLIP folder (config.json + model.safetensors + tokenizer files, "
    "e.g. openai/clip-vit-base-patch32) or a CLIP vision file from ComfyUI/models/clip_vision"
)
DINO_EXPECTED = "a local Hugging Face folder of facebook/dino-vits16 (config.json + model.safetensors)"

METRICS = ("presence", "identity_match", "identity_distance", "clip_i", "clip_t", "dino")
METRIC_TITLES = {
    "presence": "subject presence (face found)",
    "identity_match": f"identity match (distance < {FACE_MATCH_THRESHOLD})",
    "identity_distance": "identity distance to mean (lower = closer)",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dino": "DINO",
}


class _Unavailable(Exception):
    """A metric cannot run here (missing optional package or model); the message says why."""


# --------------------------------------------------------------------------- inputs


@dataclass
class EvalImage:
    """One generated image and what it was generated for."""

    image: Path | Image.Image
    prompt: str | None = None
    method: str = "images"
    rank: int | None = None
    scene: str = ""
    label: str = ""

    def load(self) -> Image.Image:
        return _load_rgb(self.image)


def _load_rgb(image: Path | str | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Image {image} could not be read ({e}); "
                        "remove it or replace it with a PNG or JPEG.") from None


def prompt_without_token(prompt: str, token: str | None) -> str:
    """The prompt with the trigger token removed, as CLIP-T scores it ("a sks man" -> "a man")."""
    if token:
        prompt = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    prompt = re.sub(r"\s+([,.;:!?])", r"\1", prompt)
    return " ".join(prompt.split())


# --------------------------------------------------------------------------- faces (dlib)


@dataclass
class Face:
    """One detected face: its box (left, top, right, bottom) in image pixels and its 128-d descriptor."""

    box: tuple[int, int, int, int]
    descriptor: np.ndarray


def _face_models_dir() -> Path:
    # The package's __init__ imports pkg_resources (gone from new setuptools): find its folder
    # without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise _Unavailable(f"not available: the face model package is not installed ({DLIB_INSTALL})")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class FaceEmbedder:
    """dlib face detection + ResNet face descriptors (weights from `face_recognition_models`)."""

    MAX_SIDE = 1600  # larger images are downscaled first: faces stay big enough, detection is faster
    UPSAMPLE_BELOW = 800  # smaller images are upsampled once so small faces are found
    CNN_MAX_SIDE = 640  # the CNN detector is ~2 s per 512 px image on a CPU
    MAX_FACES = 8

    def __init__(self, detector: str = "hog+cnn"):
        if detector not in FACE_DETECTORS:
            raise UserError(f"Face detector '{detector}' is unknown; use one of {', '.join(FACE_DETECTORS)}.")
        try:
            import dlib
        except ImportError as e:
            raise _Unavailable(f"not available: dlib is not installed ({DLIB_INSTALL})") from e
        models = _face_models_dir()
        files = {
            "shape": models / "shape_predictor_5_face_landmarks.dat",
            "resnet": models / "dlib_face_recognition_resnet_model_v1.dat",
            "cnn": models / "mmod_human_face_detector.dat",
        }
        for path in files.values():
            if not path.is_file():
                raise _Unavailable(f"not available: {path} is missing; reinstall it ({DLIB_INSTALL})")
        self.detector = detector
        self._hog = dlib.get_frontal_face_detector() if "hog" in detector else None
        self._cnn = dlib.cnn_face_detection_model_v1(str(files["cnn"])) if "cnn" in detector else None
        self._shape = dlib.shape_predictor(str(files["shape"]))
        self._resnet = dlib.face_recognition_model_v1(str(files["resnet"]))
        self._dlib = dlib

    def faces(self, image: Image.Image) -> list[Face]:
        """All faces found (largest first, at most MAX_FACES), with their descriptors."""
        image = image.convert("RGB")
        scale = min(1.0, self.MAX_SIDE / max(image.size))
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        pixels = np.asarray(image)
        rects = []
        if self._hog is not None:
            upsample = 1 if max(image.size) < self.UPSAMPLE_BELOW else 0
            rects = list(self._hog(pixels, upsample))
        if not rects and self._cnn is not None:
            rects = self._cnn_rects(image)
        rects.sort(key=lambda r: r.width() * r.height(), reverse=True)
        found = []
        for rect in rects[: self.MAX_FACES]:
            descriptor = np.asarray(self._resnet.compute_face_descriptor(pixels, self._shape(pixels, rect)))
            box = tuple(int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
            found.append(Face(box=box, descriptor=descriptor))
        return found

    def _cnn_rects(self, image: Image.Image) -> list:
        shrink = min(1.0, self.CNN_MAX_SIDE / max(image.size))
        small = image if shrink == 1.0 else image.resize(
            (round(image.width * shrink), round(image.height * shrink)), Image.BICUBIC)
        rects = []
        for det in self._cnn(np.asarray(small), 0):
            r = det.rect
            rects.append(self._dlib.rectangle(int(r.left() / shrink), int(r.top() / shrink),
                                              int(r.right() / shrink), int(r.bottom() / shrink)))
        return rects


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two face descriptors (same person below FACE_MATCH_THRESHOLD)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


# --------------------------------------------------------------------------- CLIP and DINO


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    # from_pretrained logs "unused weights" (e.g. DINO's pooler) and draws a loading bar: the engine never prints.
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _pixels(images: Sequence[Image.Image], resize: int, crop: int,
            mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Shortest side to `resize` (bicubic), center crop `crop`, normalise: (N, 3, crop, crop)."""
    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        w, h = max(crop, round(image.width * scale)), max(crop, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - crop) // 2, (h - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(batch)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClipScorer:
    """CLIP image (and, from a full CLIP folder, text) embeddings, L2-normalised."""

    def __init__(self, vision_model, visual_projection, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 text_model=None, text_projection=None, tokenizer=None, name: str = ""):
        self.vision_model, self.visual_projection = vision_model, visual_projection
        self.text_model, self.text_projection, self.tokenizer = text_model, text_projection, tokenizer
        self.image_size, self.mean, self.std, self.name = image_size, tuple(mean), tuple(std), name

    @property
    def has_text(self) -> bool:
        return self.text_model is not None and self.tokenizer is not None

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = _pixels(images, self.image_size, self.image_size, self.mean, self.std)
        pooled = self.vision_model(pixel_values=x).pooler_output
        return _normalized(self.visual_projection(pooled))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = min(77, self.text_model.config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=max_len, return_tensors="pt")
        pooled = self.text_model(input_ids=tokens["input_ids"],
                                 attention_mask=tokens["attention_mask"]).pooler_output
        return _normalized(self.text_projection(pooled))


class DinoScorer:
    """DINO ViT CLS-token features (resize 256, crop 224, ImageNet mean/std), L2-normalised."""

    def __init__(self, model, image_size: int, name: str = ""):
        self.model, self.image_size, self.name = model, image_size, name

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        crop = self.image_size
        x = _pixels(images, round(crop * 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD)
        return _normalized(self.model(pixel_values=x).last_hidden_state[:, 0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); "
                        "replace the model folder with a complete copy.") from e


def load_clip(path: str | os.PathLike | None) -> ClipScorer:
    """A CLIP scorer from a Hugging Face CLIP folder or a ComfyUI clip_vision .safetensors file."""
    if not path:
        raise _Unavailable(f"not available: no CLIP model given; pass {CLIP_EXPECTED}")
    path = Path(path)
    if not path.exists():
        raise _Unavailable(f"not available: no CLIP model at {path}; expected {CLIP_EXPECTED}")
    if path.is_file():
        return _load_clip_vision_file(path)
    if not (path / "config.json").is_file():
        raise UserError(f"CLIP folder {path} has no config.json; pass {CLIP_EXPECTED}.")
    from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model_type = _read_json(path / "config.json").get("model_type")
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
    if model_type not in classes:
        raise UserError(f"CLIP folder {path} holds a '{model_type}' model, not CLIP; pass {CLIP_EXPECTED}.")
    try:
        with _quiet_transformers():
            model = classes[model_type].from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise _unloadable_folder("CLIP", path, e) from e
    mean, std = CLIP_MEAN, CLIP_STD
    if (path / "preprocessor_config.json").is_file():
        pre = _read_json(path / "preprocessor_config.json")
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    vision_config = model.config.vision_config if model_type == "clip" else model.config
    scorer = ClipScorer(model.vision_model, model.visual_projection, vision_config.image_size,
                        mean, std, name=str(path))
    if model_type == "clip":
        scorer.text_model, scorer.text_projection = model.text_model, model.text_projection
        with _quiet_transformers():
            # Every OpenAI/OpenCLIP text tower uses the same BPE: the pack's copy stands in for a missing one.
            has_tokenizer = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
            folder = path if has_tokenizer else Path(__file__).parent / "configs" / "clip_tokenizer"
            scorer.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return scorer


_VISION_ANCHOR = "vision_model.embeddings.patch_embedding.weight"


def _load_clip_vision_file(path: Path) -> ClipScorer:
    """A ComfyUI clip_vision file: a CLIPVisionModelWithProjection state dict; config read from shapes."""
    if path.suffix != ".safetensors":
        raise UserError(f"CLIP file {path} is not a .safetensors file; only safetensors files are loaded (a .bin, "
                        ".pt or .ckpt pickle can run code): convert it to .safetensors, or pass a CLIP folder.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"CLIP file {path} could not be read ({_first_line(e)}); "
                        "replace it with a complete copy.") from e
    anchor = next((k for k in state if k.endswith(_VISION_ANCHOR)), None)
    if anchor is None or not any(k.endswith("visual_projection.weight") for k in state):
        raise UserError(f"CLIP file {path} is not a CLIP vision model in Hugging Face layout "
                        f"(no {_VISION_ANCHOR} / visual_projection.weight); pass {CLIP_EXPECTED}.")
    prefix = anchor[: -len(_VISION_ANCHOR)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    patch = state[_VISION_ANCHOR]
    hidden = patch.shape[0]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in state
                     if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=state["visual_projection.weight"].shape[0],
        num_hidden_layers=layers,
        # OpenAI ViT-B (768) has 12 heads of 64; ViT-L/H/bigG all have 16.
        num_attention_heads=16 if hidden >= 1024 else max(1, hidden // 64),
        patch_size=patch.shape[-1],
        image_size=int(round(math.sqrt(positions - 1))) * patch.shape[-1],
        # OpenAI's towers (B, L) use quick_gelu; OpenCLIP's ViT-H and bigG use gelu.
        hidden_act="gelu" if hidden >= 1280 else "quick_gelu",
    )
    model = CLIPVisionModelWithProjection(config).eval()
    state.pop("vision_model.embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"CLIP file {path} does not match a CLIP vision layout ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors); pass {CLIP_EXPECTED}.")
    return ClipScorer(model.vision_model, model.visual_projection, config.image_size, name=str(path))


def load_dino(path: str | os.PathLike | None) -> DinoScorer:
    """A DINO scorer from a local Hugging Face ViT (or DINOv2) folder."""
    if not path:
        raise _Unavailable(f"not available: no DINO model given; pass {DINO_EXPECTED}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise _Unavailable(f"not available: no DINO model at {path}; expected {DINO_EXPECTED}")
    from transformers import Dinov2Model, ViTModel

    model_type = _read_json(path / "config.json").get("model_type")
    if model_type not in ("vit", "dinov2"):
        raise UserError(f"DINO folder {path} holds a '{model_type}' model, not a ViT; pass {DINO_EXPECTED}.")
    try:
        with _quiet_transformers():
            if model_type == "vit":  # DINO v1 checkpoints carry no pooler we use
                model = ViTModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 add_pooling_layer=False)
            else:
                model = Dinov2Model.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise _unloadable_folder("DINO", path, e) from e
    return DinoScorer(model.eval(), model.config.image_size, name=str(path))


def _unloadable_folder(kind: str, path: Path, e: BaseException) -> UserError:
    # only model.safetensors is read: a pytorch_model.bin is a pickle, which can run code when loaded
    return UserError(f"{kind} folder {path} could not be loaded ({_first_line(e)}); save the model into it with "
                     "save_pretrained(folder, safe_serialization=True), or pass a folder that has config.json "
                     "and model.safetensors.")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- scores and report


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


def _rank_key(rank: int | None) -> int:
    return -1 if rank is None else rank


def _group_name(method: str, rank: int | None) -> str:
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
        return sorted(keys, key=lambda k: (k[0], _rank_key(k[1])))

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
        """The generated images, one row per method/rank, each tile annotated with its scores."""
        return _draw_grid(self, tile)

    def chart(self, path: Path) -> None:
        """A bar chart of the aggregates per method/rank (one panel per metric, bars per scene)."""
        _draw_chart(self, path)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write report.json, table.txt, grid.png and chart.png (when matplotlib is installed) into out_dir,
        each via a temp file."""
        out = Path(out_dir)
        written = {
            "chart.png": self.chart,
            "grid.png": lambda p: self.grid().save(p, format="PNG"),
            "report.json": lambda p: p.write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8"),
            "table.txt": lambda p: p.write_text(self.table(), encoding="utf-8"),
        }
        if importlib.util.find_spec("matplotlib") is None:  # optional in ComfyUI's Python
            del written["chart.png"]
            self.unavailable["chart"] = "not drawn: matplotlib is not installed (pip install matplotlib)"
        paths = {}
        for name, write in written.items():
            paths[name] = _write_atomic(out / name, write)
        return paths


def _write_atomic(target: Path, write) -> Path:
    """`write(tmp)`, then a rename: a full disk or an unwritable folder is one line, never a half-written file."""
    from .safe_io import atomic_path

    with atomic_path(target) as tmp:
        write(tmp)
    return target


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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile_lines(r: ImageScores) -> list[str]:
    head = " ".join(p for p in (_group_name(r.method, r.rank), r.scene) if p)
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
    font = _font(max(10, tile // 16))
    line_h = font.size + 3 if hasattr(font, "size") else 13
    caption_h = 4 * line_h + 6
    rows: list[list[int]] = []
    for group in report._groups():
        members = [i for i, r in enumerate(report.images) if (r.method, r.rank) == group]
        order = {s: n for n, s in enumerate(report._scenes())}
        rows.append(sorted(members, key=lambda i: order[report.images[i].scene]))
    cols = max((len(r) for r in rows), default=1)
    grid = Image.new("RGB", (cols * tile, max(1, len(rows)) * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for y, members in enumerate(rows):
        for x, i in enumerate(members):
            left, top = x * tile, y * (tile + caption_h)
            thumb = report.thumbnails[i].copy()
            thumb.thumbnail((tile, tile))
            grid.paste(thumb, (left + (tile - thumb.width) // 2, top + (tile - thumb.height) // 2))
            scores = report.images[i]
            # the face line: green = the subject, red = no face or someone else, black = not measured
            face_color = "black" if scores.identity_match is None else (
                (0, 120, 0) if scores.identity_match else (190, 0, 0))
            for n, text in enumerate(_tile_lines(scores)):
                color = face_color if text.startswith("face:") else "black"
                draw.text((left + 4, top + tile + 3 + n * line_h), text, fill=color, font=font)
            draw.rectangle((left, top, left + tile - 1, top + tile + caption_h - 1), outline=(200, 200, 200))
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
        ax.set_xticklabels([_group_name(*g) for g in groups])
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


# --------------------------------------------------------------------------- evaluation


def _face_scores(embedder: FaceEmbedder, references: list[Image.Image], images: list[Image.Image],
                 rows: list[ImageScores], report: EvalReport, progress: ProgressFn) -> None:
    total = len(references) + len(images)
    ref_faces = []
    for i, image in enumerate(references):
        found = embedder.faces(image)
        if found:
            ref_faces.append(found[0].descriptor)  # the largest face is the subject
        progress(Progress("evaluate faces", i + 1, total, {"what": "references"}))
    report.references["faces_found"] = len(ref_faces)
    if not ref_faces:
        raise _Unavailable("not available: no face was found in the reference images; "
                           "give photos where the subject's face is visible")
    refs = np.stack(ref_faces)
    center = refs.mean(axis=0)
    if len(refs) > 1:  # leave-one-out: how far each reference lies from the mean of the others
        report.references["identity_distance"] = _mean(
            [face_distance(refs[i], np.delete(refs, i, axis=0).mean(axis=0)) for i in range(len(refs))])
    for i, (image, row) in enumerate(zip(images, rows)):
        faces = embedder.faces(image)
        row.faces, row.face_found = len(faces), bool(faces)
        if faces:
            # With several faces, score the one closest to the subject: "is the subject in the picture".
            best = min(faces, key=lambda f: face_distance(f.descriptor, center))
            row.identity_distance = face_distance(best.descriptor, center)
            row.nearest_distance = float(np.linalg.norm(refs - best.descriptor, axis=1).min())
            row.identity_match = row.identity_distance < FACE_MATCH_THRESHOLD
        else:
            row.identity_match = False
        progress(Progress("evaluate faces", len(references) + i + 1, total, {"what": "images"}))


def _embed(embed, images: list[Image.Image], stage: str, progress: ProgressFn,
           done: int, total: int, batch: int = 8) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch):
        out.append(embed(images[start:start + batch]))
        progress(Progress(stage, done + min(start + batch, len(images)), total))
    return torch.cat(out)


def _leave_one_out_similarity(refs: torch.Tensor) -> float | None:
    n = len(refs)
    if n < 2:
        return None
    sims = refs @ refs.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def _similarity_scores(scorer, metric: str, references: list[Image.Image], images: list[Image.Image],
                       rows: list[ImageScores], report: EvalReport, progress: ProgressFn) -> torch.Tensor:
    total = len(references) + len(images)
    stage = f"evaluate {metric.split('_')[0]}"
    refs = _embed(scorer.embed_images, references, stage, progress, 0, total)
    embs = _embed(scorer.embed_images, images, stage, progress, len(references), total)
    report.references[metric] = _leave_one_out_similarity(refs)
    for row, sim in zip(rows, (embs @ refs.T).mean(dim=1).tolist()):
        setattr(row, metric, sim)
    return embs


def evaluate_images(images: Sequence[EvalImage], references: Sequence[Path | str | Image.Image], *,
                    clip: str | os.PathLike | None = None, dino: str | os.PathLike | None = None,
                    token: str | None = "sks", face_detector: str = "hog+cnn",
                    progress: ProgressFn = no_progress) -> EvalReport:
    """Score generated images against the subject's reference photos (paths or in-memory images)."""
    if not images:
        raise UserError("No generated images were given; pass at least one image to evaluate.")
    if not references:
        raise UserError("No reference images were given; pass the subject's photos.")
    if face_detector not in FACE_DETECTORS:
        raise UserError(f"Face detector '{face_detector}' is unknown; use one of {', '.join(FACE_DETECTORS)}.")
    ref_images = [_load_rgb(r) for r in references]
    gen_images = [item.load() for item in images]
    rows = []
    for i, item in enumerate(images):
        path = None if isinstance(item.image, Image.Image) else str(item.image)
        rows.append(ImageScores(label=item.label or (Path(path).name if path else f"image {i + 1}"),
                                method=item.method, rank=item.rank, scene=item.scene,
                                prompt=item.prompt, path=path))
    report = EvalReport(images=rows, references={"count": len(ref_images)}, settings={
        "clip": None if clip is None else str(clip), "dino": None if dino is None else str(dino),
        "token": token, "face_detector": face_detector, "face_match_threshold": FACE_MATCH_THRESHOLD})
    report.thumbnails = [_thumbnail(im) for im in gen_images]

    try:
        _face_scores(FaceEmbedder(face_detector), ref_images, gen_images, rows, report, progress)
    except _Unavailable as e:
        report.unavailable["identity"] = str(e)
        for row in rows:
            row.faces = row.face_found = row.identity_distance = row.nearest_distance = row.identity_match = None

    try:
        clip_scorer = load_clip(clip)
    except _Unavailable as e:
        report.unavailable["clip_i"] = report.unavailable["clip_t"] = str(e)
    else:
        embs = _similarity_scores(clip_scorer, "clip_i", ref_images, gen_images, rows, report, progress)
        prompted = [i for i, r in enumerate(rows) if r.prompt]
        if not clip_scorer.has_text:
            report.unavailable["clip_t"] = "not available (needs the text tower; give a Hugging Face CLIP folder)"
        elif not prompted:
            report.unavailable["clip_t"] = "not available: no prompts given (pass a prompts file)"
        else:
            texts = clip_scorer.embed_texts([prompt_without_token(rows[i].prompt, token) for i in prompted])
            for i, sim in zip(prompted, (texts * embs[prompted]).sum(dim=1).tolist()):
                rows[i].clip_t = sim

    try:
        dino_scorer = load_dino(dino)
    except _Unavailable as e:
        report.unavailable["dino"] = str(e)
    else:
        _similarity_scores(dino_scorer, "dino", ref_images, gen_images, rows, report, progress)
    return report


def _thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    return thumb


# --------------------------------------------------------------------------- folders (the CLI's helper)

_NAME_PATTERN = re.compile(r"^(?P<method>[A-Za-z0-9-]+?)(?:_r(?P<rank>\d+))?_(?P<scene>[A-Za-z0-9-]+)_(?P<n>\d+)$")


def image_files(folder: str | os.PathLike, what: str) -> list[Path]:
    """The image files directly inside folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist; pass a folder of PNG or JPEG images.")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:
        raise UserError(f"{what} folder {folder} cannot be read ({e.strerror or e}); check its permissions.") from None
    if not files:
        raise UserError(f"{what} folder {folder} has no images; pass a folder of PNG or JPEG images.")
    return files


def _read_prompts(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"Prompts file {path} does not exist; pass a JSON file mapping image names to prompts.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"Prompts file {path} is not valid JSON ({e}); fix it or leave --prompts out.") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"Prompts file {path} must map each image file name to "
                        '{"prompt": ..., "scene": ..., "method": ..., "rank": ...}; fix its layout.')
    for name, entry in data.items():
        rank = entry.get("rank")
        if rank is not None and not (isinstance(rank, int) or (isinstance(rank, str) and rank.isdigit())):
            raise UserError(f"Prompts file {path}: rank '{rank}' of {name} is not a whole number; fix it.")
    return data


def describe_images(files: Sequence[Path], prompts: dict[str, dict[str, Any]] | None = None) -> list[EvalImage]:
    """EvalImages for files: from the prompts mapping when it names a file, else from names like
    `<method>_r<rank>_<scene>_<n>.png` when every file fits that pattern, else all as "images"."""
    prompts = prompts or {}
    matches = {f: _NAME_PATTERN.match(f.stem) for f in files}
    use_names = all(matches.values())
    out = []
    for f in files:
        entry = prompts.get(f.name) or prompts.get(f.stem)
        m = matches[f] if use_names else None
        method = (m["method"] if m else "images")
        rank = int(m["rank"]) if m and m["rank"] else None
        scene = m["scene"] if m else ""
        if entry is not None:
            method = str(entry.get("method", method))
            rank = int(entry["rank"]) if entry.get("rank") is not None else rank
            scene = str(entry.get("scene", scene))
        out.append(EvalImage(f, prompt=entry.get("prompt") if entry else None,
                             method=method, rank=rank, scene=scene, label=f.name))
    return out


def run_evaluate(images_dir: str | os.PathLike, references_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 prompts_file: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
                 dino: str | os.PathLike | None = None, token: str | None = "sks",
                 face_detector: str = "hog+cnn", progress: ProgressFn = no_progress) -> EvalReport:
    """Evaluate a folder of generated images against a folder of subject photos; write the report to out_dir.

    Without prompts_file, `images_dir/prompts.json` is used when it exists.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    files = image_files(images_dir, "Images")
    if out_dir.resolve() == images_dir.resolve():  # a previous run's grid/chart are not generated images
        files = [f for f in files if f.name not in OUTPUT_NAMES]
    if prompts_file is None and (images_dir / "prompts.json").is_file():
        prompts_file = images_dir / "prompts.json"
    prompts = _read_prompts(Path(prompts_file)) if prompts_file is not None else None
    references = image_files(references_dir, "References")
    report = evaluate_images(describe_images(files, prompts), references, clip=clip, dino=dino,
                             token=token, face_detector=face_detector, progress=progress)
    report.save(out_dir)
    return report
