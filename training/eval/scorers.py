"""The scorers: dlib faces (detection, descriptors, distance to the subject), CLIP and DINO embeddings,
and their loaders. Every model is optional and local: a missing one raises Unavailable with the reason,
never a download."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..quiet import quiet_libraries
from . import DEFAULT_FACE_DETECTOR, DLIB_INSTALL, FACE_DETECTORS

# dlib's own threshold: two descriptors closer than this are the same person.
FACE_MATCH_THRESHOLD = 0.6
# Who computes the 128-d descriptors: "port" (training/eval/face_descriptor.py, torch: equal to dlib's
# within 4e-7 and about 3x faster on a CPU) or "dlib" (its C++ net). Detection and landmarks are dlib's in both.
DESCRIPTORS = ("port", "dlib")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_EXPECTED = (
    "a local Hugging Face CLIP folder (config.json + model.safetensors + tokenizer files, "
    "e.g. openai/clip-vit-base-patch32) or a CLIP vision file from ComfyUI/models/clip_vision"
)
DINO_EXPECTED = "a local Hugging Face folder of facebook/dino-vits16 (config.json + model.safetensors)"


class Unavailable(Exception):
    """A metric cannot run here (missing optional package or model); the message says why."""


def check_face_detector(detector: str) -> None:
    if detector not in FACE_DETECTORS:
        raise UserError(f"Face detector '{detector}' is unknown; use one of {', '.join(FACE_DETECTORS)}.")


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
        raise Unavailable(f"not available: the face model package is not installed ({DLIB_INSTALL})")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class FaceEmbedder:
    """dlib face detection and landmarks + ResNet face descriptors (weights from `face_recognition_models`)."""

    MAX_SIDE = 1600  # larger images are downscaled first: faces stay big enough, detection is faster
    UPSAMPLE_BELOW = 800  # smaller images are upsampled once so small faces are found
    CNN_MAX_SIDE = 640  # the CNN detector is ~2 s per 512 px image on a CPU
    MAX_FACES = 8

    def __init__(self, detector: str = DEFAULT_FACE_DETECTOR, descriptors: str = "port"):
        check_face_detector(detector)
        if descriptors not in DESCRIPTORS:
            raise ValueError(f"descriptors must be one of {DESCRIPTORS}, not {descriptors!r}")
        try:
            import dlib
        except ImportError as e:
            raise Unavailable(f"not available: dlib is not installed ({DLIB_INSTALL})") from e
        models = _face_models_dir()
        files = {
            "shape": models / "shape_predictor_5_face_landmarks.dat",
            "resnet": models / "dlib_face_recognition_resnet_model_v1.dat",
            "cnn": models / "mmod_human_face_detector.dat",
        }
        for path in files.values():
            if not path.is_file():
                raise Unavailable(f"not available: {path} is missing; reinstall it ({DLIB_INSTALL})")
        self.detector = detector
        self._hog = dlib.get_frontal_face_detector() if "hog" in detector else None
        self._cnn = dlib.cnn_face_detection_model_v1(str(files["cnn"])) if "cnn" in detector else None
        self._shape = dlib.shape_predictor(str(files["shape"]))
        if descriptors == "dlib":
            self._resnet = dlib.face_recognition_model_v1(str(files["resnet"]))
        else:
            from .face_descriptor import FaceDescriptor

            self.torch_descriptor = FaceDescriptor.from_dlib_file(files["resnet"])  # differentiable
        self.descriptors = descriptors
        self._dlib = dlib

    def landmarks(self, image: Image.Image) -> list[list[tuple[float, float]]]:
        """dlib's 5 face landmarks [(x, y), ...] of each face found (largest first), in image pixels."""
        pixels, rects, scale = self._detect(image)
        return [[(p.x / scale, p.y / scale) for p in self._shape(pixels, rect).parts()] for rect in rects]

    def faces(self, image: Image.Image) -> list[Face]:
        """All faces found (largest first, at most MAX_FACES), with their descriptors."""
        pixels, rects, scale = self._detect(image)
        shapes = [self._shape(pixels, rect) for rect in rects]
        descriptors = self._descriptors(pixels, shapes)
        return [Face(box=tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom())),
                     descriptor=d) for r, d in zip(rects, descriptors)]

    def _descriptors(self, pixels: np.ndarray, shapes: list) -> list[np.ndarray]:
        if not shapes:
            return []
        if self.descriptors == "dlib":
            return [np.asarray(self._resnet.compute_face_descriptor(pixels, shape)) for shape in shapes]
        from .face_descriptor import chip_transform

        size = (pixels.shape[1], pixels.shape[0])
        transforms = [chip_transform([(p.x, p.y) for p in shape.parts()], size) for shape in shapes]
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None].expand(len(shapes), -1, -1, -1)
        with torch.inference_mode():
            return list(self.torch_descriptor.embed(image, transforms).double().numpy())

    def _detect(self, image: Image.Image) -> tuple[np.ndarray, list, float]:
        """(the pixels searched, the faces' dlib rectangles in them, largest first, their scale to the image)."""
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
        return pixels, rects[: self.MAX_FACES], scale

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


@dataclass
class FaceScore:
    """How one image's faces compare with the subject's: the face closest to the references' mean counts."""

    faces: int
    distance: float | None = None  # to the mean reference descriptor
    nearest: float | None = None  # to the closest single reference

    @property
    def found(self) -> bool:
        return self.faces > 0

    @property
    def match(self) -> bool:
        return self.distance is not None and self.distance < FACE_MATCH_THRESHOLD


class FaceReferences:
    """The subject's face descriptors (the largest face of each reference photo that has one)."""

    def __init__(self, descriptors: Sequence[np.ndarray]):
        if not len(descriptors):
            raise Unavailable("not available: no face was found in the reference images; "
                              "give photos where the subject's face is visible")
        self.descriptors = np.stack(descriptors)
        self.center = self.descriptors.mean(axis=0)

    def leave_one_out_distance(self) -> float | None:
        """How far each reference lies from the mean of the others, averaged: the baseline."""
        refs = self.descriptors
        if len(refs) < 2:
            return None
        distances = [face_distance(refs[i], np.delete(refs, i, axis=0).mean(axis=0)) for i in range(len(refs))]
        return sum(distances) / len(distances)

    def score(self, faces: Sequence[Face]) -> FaceScore:
        if not faces:
            return FaceScore(faces=0)
        # With several faces, score the one closest to the subject: "is the subject in the picture".
        best = min(faces, key=lambda f: face_distance(f.descriptor, self.center))
        return FaceScore(faces=len(faces), distance=face_distance(best.descriptor, self.center),
                         nearest=float(np.linalg.norm(self.descriptors - best.descriptor, axis=1).min()))


# --------------------------------------------------------------------------- CLIP and DINO


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
        raise Unavailable(f"not available: no CLIP model given; pass {CLIP_EXPECTED}")
    path = Path(path)
    if not path.exists():
        raise Unavailable(f"not available: no CLIP model at {path}; expected {CLIP_EXPECTED}")
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
        with quiet_libraries():
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
        with quiet_libraries():
            # Every OpenAI/OpenCLIP text tower uses the same BPE: the pack's copy stands in for a missing one.
            has_tokenizer = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
            folder = path if has_tokenizer else Path(__file__).parents[1] / "configs" / "clip_tokenizer"
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
        raise Unavailable(f"not available: no DINO model given; pass {DINO_EXPECTED}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise Unavailable(f"not available: no DINO model at {path}; expected {DINO_EXPECTED}")
    from transformers import Dinov2Model, ViTModel

    model_type = _read_json(path / "config.json").get("model_type")
    if model_type not in ("vit", "dinov2"):
        raise UserError(f"DINO folder {path} holds a '{model_type}' model, not a ViT; pass {DINO_EXPECTED}.")
    try:
        with quiet_libraries():
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

