"""Identity tracked during training: each validation step's renders scored with our evaluation (subject
present = a face found, identity distance to the dataset's crops, CLIP-T where CLIP weights are given), and
with keep="best-identity" the trained weights of the best validated step kept and written instead of the last.

The best step: the lowest mean identity distance over the renders in which a face is found (renders without
one do not count; a step with no face at all is not a candidate); ties go to the later step. Its weights are
kept in the run folder (`best_identity.safetensors`, written atomically) so a resumed run still has them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .progress import Progress, ProgressFn
from .prompts import PROBE_PROMPT, fill_prompt
from .train_config import TrainConfig

KEPT_FILE = "best_identity.safetensors"
# A scorer of the face metric: one FaceScore (faces found, distance to the subject) per image.
FaceScorer = Callable[[Sequence], list]


def dataset_crops(folder: Path) -> list:
    """The prepared crops of a dataset folder (not their mirror copies), as RGB images: the references."""
    from .data.dataset import load_dataset
    from .examples import open_rgb

    return [open_rgb(item.image, "prepared crop") for item in load_dataset(folder).items if not item.flipped]


def face_scorer(references: Sequence) -> FaceScorer:
    """dlib's face metric against the references (raises eval.scorers.Unavailable with the reason)."""
    from .eval.run import reference_faces
    from .eval.scorers import FaceEmbedder

    embedder = FaceEmbedder()
    refs = reference_faces(embedder, references)
    return lambda images: [refs.score(embedder.faces(image)) for image in images]


@dataclass
class StepScores:
    """One validated step: what loss.jsonl, the chart and the report show."""

    step: int
    identity: float | None  # mean distance to the subject over the renders with a face (lower = closer)
    presence: float | None  # the share of renders with a face
    clip_t: float | None = None  # mean CLIP-T of the scene prompts (token left out)
    probe_clip_t: float | None = None  # CLIP-T of the off-identity probe ("... with purple hair")
    seconds: float = 0.0  # scoring time of this step's renders
    face_seconds: float = 0.0  # the face scorer's share of it

    def row(self) -> dict:
        """The keys added to the step's loss.jsonl row (and its progress event)."""
        out = {"identity": self.identity, "presence": self.presence}
        if self.clip_t is not None or self.probe_clip_t is not None:
            out |= {"clip_t": self.clip_t, "probe_clip_t": self.probe_clip_t}
        return out

    def describe(self) -> str:
        parts = [f"identity {_fmt(self.identity)}", f"subject present {_fmt(self.presence, 2)}"]
        if self.clip_t is not None:
            parts.append(f"CLIP-T {_fmt(self.clip_t)}")
        if self.probe_clip_t is not None:
            parts.append(f"probe CLIP-T {_fmt(self.probe_clip_t)}")
        return ", ".join(parts)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def better(candidate: StepScores, best: StepScores | None) -> bool:
    """Lower identity distance wins; a tie goes to the later step (the candidate); no face: never."""
    if candidate.identity is None:
        return False
    return best is None or best.identity is None or candidate.identity <= best.identity


class IdentityTracker:
    """Scores validation renders and, with keep="best-identity", keeps the best step's trainable weights."""

    def __init__(self, cfg: TrainConfig, dataset_folder: Path, progress: ProgressFn, resumed_step: int = 0,
                 losses: Sequence[dict] = ()):
        self.cfg, self.progress, self.dataset_folder = cfg, progress, dataset_folder
        self.kept_path = cfg.run_path / KEPT_FILE
        self._face: FaceScorer | None = None
        self._clip = None
        self._loaded = False  # the scorers load at the first validation (a run may never reach one)
        self.best = self._resumed_best(resumed_step, losses) if cfg.validation_every else None

    # ---------------------------------------------------------------- setup

    def _note(self, text: str) -> None:
        self.progress(Progress("warning", 0, 0, {"note": text}))

    def _load_scorers(self) -> None:
        self._loaded = True
        self._face = self._load_face_scorer(self.dataset_folder)
        if self.cfg.validation_clip:
            from .eval.scorers import Unavailable, load_clip

            try:
                self._clip = load_clip(self.cfg.validation_clip)
            except Unavailable as e:
                self._note(f"validation_clip: CLIP-T {e}")
            else:
                if not self._clip.has_text:
                    self._clip = None
                    self._note("validation_clip: CLIP-T needs the text tower; give a Hugging Face CLIP folder")

    def _load_face_scorer(self, dataset_folder: Path) -> FaceScorer | None:
        from .eval.scorers import Unavailable

        try:
            return face_scorer(dataset_crops(dataset_folder))
        except Unavailable as e:
            self._note(f"validation: identity {e}")
            return None

    def _resumed_best(self, resumed_step: int, losses: Sequence[dict]) -> StepScores | None:
        """The kept step of the run being resumed, when its weights are on disk; a fresh run drops stale ones."""
        if not self.keeps_best or not self.kept_path.is_file():
            return None
        from .safe_io import read_metadata

        step = int(read_metadata(self.kept_path).get("step", "0"))
        row = next((r for r in losses if r.get("step") == step), None)
        if resumed_step and 0 < step <= resumed_step and row is not None and row.get("identity") is not None:
            return StepScores(step, row["identity"], row.get("presence"), row.get("clip_t"), row.get("probe_clip_t"))
        self.kept_path.unlink(missing_ok=True)  # from another run, or from steps after the checkpoint resumed
        return None

    @property
    def keeps_best(self) -> bool:
        return self.cfg.keep == "best-identity"

    # ---------------------------------------------------------------- each validation

    def track(self, step: int, images: Sequence[Path], trainable) -> dict:
        """Score this step's renders; keep its weights when it is the best so far. Returns the loss-row keys."""
        scores = self.score(step, images)
        if self.keeps_best and better(scores, self.best):
            self._keep(scores, trainable.state())
            self.best = scores
        return scores.row()

    def score(self, step: int, images: Sequence[Path]) -> StepScores:
        from PIL import Image

        if not self._loaded:
            self._load_scorers()
        started = time.perf_counter()
        pictures = []
        for path in images:
            with Image.open(path) as image:
                pictures.append(image.convert("RGB"))
        identity = presence = None
        face_started = time.perf_counter()
        if self._face is not None:
            faces = self._face(pictures)
            found = [f.distance for f in faces if f.faces and f.distance is not None]
            presence = sum(1 for f in faces if f.faces) / len(faces) if faces else None
            identity = sum(found) / len(found) if found else None
        face_seconds = time.perf_counter() - face_started
        clip_t = probe = None
        if self._clip is not None:
            clip_t, probe = self._clip_t(pictures)
        return StepScores(step, identity, presence, clip_t, probe, time.perf_counter() - started, face_seconds)

    def _clip_t(self, pictures: list) -> tuple[float | None, float | None]:
        from .eval.run import prompt_without_token

        cfg = self.cfg
        templates = cfg.validation_prompts
        texts = [prompt_without_token(fill_prompt(t, cfg.token, cfg.class_word), cfg.token) for t in templates]
        sims = (self._clip.embed_texts(texts) * self._clip.embed_images(pictures)).sum(dim=1).tolist()
        scene = [s for t, s in zip(templates, sims) if t != PROBE_PROMPT]
        probe = [s for t, s in zip(templates, sims) if t == PROBE_PROMPT]
        return (sum(scene) / len(scene) if scene else None), (probe[0] if probe else None)

    def _keep(self, scores: StepScores, weights: dict) -> None:
        from .safe_io import atomic_save_safetensors

        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        atomic_save_safetensors(tensors, self.kept_path, {"step": str(scores.step), "scores": json.dumps(scores.row())})

    # ---------------------------------------------------------------- the end

    def restore_best(self, trainable) -> StepScores | None:
        """With keep="best-identity": load the kept step's weights into `trainable` (the output is written from
        them) and return its scores; None (the last step is written) when no validated step had a face."""
        if not self.keeps_best:
            return None
        if self.best is None:
            self._note("keep best-identity: no validation render showed a face, so the last step is written")
            return None
        from safetensors.torch import load_file

        trainable.load(load_file(str(self.kept_path)))
        return self.best


def identity_report(cfg: TrainConfig, result) -> str | None:
    """The line the CLI and the node print about validation scores and the step written; None without
    validation (or for a reused output)."""
    if not cfg.validation_every or result.reused:
        return None
    if result.kept is not None:
        return (f"kept step {result.kept.step} of {result.steps_done} (keep best-identity): "
                f"{result.kept.describe()}")
    if cfg.keep == "best-identity":
        return "keep best-identity: no validation render showed a face, so the last step was written"
    scored = [r for r in result.losses if r.get("identity") is not None]
    if not scored:
        return "validation: no render showed a face, so identity was not scored"
    best = min(reversed(scored), key=lambda r: r["identity"])  # ties: the later step, as keep best-identity
    scores = StepScores(best["step"], best["identity"], best.get("presence"), best.get("clip_t"),
                        best.get("probe_clip_t"))
    return (f"validation: best identity at step {best['step']} ({scores.describe()}); the last step was written "
            "(keep best-identity writes the best)")
