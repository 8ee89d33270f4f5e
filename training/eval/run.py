"""Evaluation runs: score generated images (in memory or a folder of files) against the subject's photos."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageOps

from ..data.photos import IMAGE_SUFFIXES
from ..errors import UserError
from ..progress import Progress, ProgressFn, no_progress
from . import DEFAULT_FACE_DETECTOR
from .report import OUTPUT_NAMES, EvalReport, ImageScores
from .scorers import (FACE_MATCH_THRESHOLD, FaceEmbedder, FaceReferences, Unavailable,
                      check_face_detector, load_clip, load_dino)


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


# --------------------------------------------------------------------------- scoring


def reference_faces(embedder: FaceEmbedder, references: Sequence[Image.Image],
                    progress: ProgressFn = no_progress, total: int | None = None) -> FaceReferences:
    """The subject's descriptors: the largest face of each reference (Unavailable when none has a face)."""
    descriptors = []
    for i, image in enumerate(references):
        found = embedder.faces(image)
        if found:
            descriptors.append(found[0].descriptor)  # the largest face is the subject
        progress(Progress("evaluate faces", i + 1, total or len(references), {"what": "references"}))
    return FaceReferences(descriptors)


def _face_scores(embedder: FaceEmbedder, references: list[Image.Image], images: list[Image.Image],
                 rows: list[ImageScores], report: EvalReport, progress: ProgressFn) -> None:
    total = len(references) + len(images)
    try:
        refs = reference_faces(embedder, references, progress, total)
    except Unavailable:
        report.references["faces_found"] = 0
        raise
    report.references["faces_found"] = len(refs.descriptors)
    if len(refs.descriptors) > 1:
        report.references["identity_distance"] = refs.leave_one_out_distance()
    for i, (image, row) in enumerate(zip(images, rows)):
        score = refs.score(embedder.faces(image))
        row.faces, row.face_found = score.faces, score.found
        row.identity_distance, row.nearest_distance, row.identity_match = score.distance, score.nearest, score.match
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
                    token: str | None = "sks", face_detector: str = DEFAULT_FACE_DETECTOR,
                    progress: ProgressFn = no_progress) -> EvalReport:
    """Score generated images against the subject's reference photos (paths or in-memory images)."""
    if not images:
        raise UserError("No generated images were given; pass at least one image to evaluate.")
    if not references:
        raise UserError("No reference images were given; pass the subject's photos.")
    check_face_detector(face_detector)
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
    except Unavailable as e:
        report.unavailable["identity"] = str(e)
        for row in rows:
            row.faces = row.face_found = row.identity_distance = row.nearest_distance = row.identity_match = None

    try:
        clip_scorer = load_clip(clip)
    except Unavailable as e:
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
    except Unavailable as e:
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
                 face_detector: str = DEFAULT_FACE_DETECTOR, progress: ProgressFn = no_progress) -> EvalReport:
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
