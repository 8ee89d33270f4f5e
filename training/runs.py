"""A training run's identity and its folder: the fingerprint of config and inputs, reuse of a
finished output, and the checkpoint a stopped run resumes from (written by checkpoint.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import checkpoint as ckpt
from .errors import UserError, input_name, turn_on
from .safe_io import read_metadata
from .train_config import TrainConfig

if TYPE_CHECKING:
    from .identity import StepScores


@dataclass
class TrainResult:
    output: Path | None  # the written model; None on another rank of a multi-process run
    steps_done: int
    final_loss: float | None
    reused: bool = False  # the output for this exact config already existed
    run_dir: Path | None = None
    losses: list[dict] = field(default_factory=list)
    kept: StepScores | None = None  # keep best-identity: the scores of the step written; else None

    @property
    def loss_curve(self) -> Path | None:
        path = self.run_dir / "loss.png" if self.run_dir else None
        return path if path and path.exists() else None


def inputs_fingerprint(cfg: TrainConfig) -> str:
    """A hash of the config's result-changing fields and of its inputs (base, photos, given class images)."""
    from .models import file_sha256

    digest = hashlib.sha256(cfg.result_hash().encode())
    base = Path(cfg.base)
    if cfg.base == "tiny":
        digest.update(b"tiny")
    elif base.is_file():
        digest.update(file_sha256(base).encode())
    # the base folder whole; photos and given class images are the files directly in their folders
    # (class images the trainer generates into a subfolder follow from the base and the config)
    for folder, pattern in ((base if base.is_dir() else None, "**/*"), (Path(cfg.instance_dir), "*"),
                            (Path(cfg.class_dir) if cfg.class_dir else None, "*")):
        if folder is None or not folder.is_dir():
            continue
        for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def finished_output(cfg: TrainConfig, fingerprint: str) -> TrainResult | None:
    """The output already written for this exact config is reused; a different one is refused."""
    out = cfg.output_path
    if not out.exists():
        return None
    try:
        written = read_metadata(out).get("dreambooth.config_hash")
    except Exception:  # noqa: BLE001 - not a safetensors file we wrote: treated as another config's
        written = None
    if written == fingerprint and not cfg.overwrite:
        return TrainResult(out, cfg.steps, None, reused=True, run_dir=cfg.run_path)
    if not cfg.overwrite:
        raise UserError(f"{out} already exists and was not made by this exact training config; "
                        f"choose another {input_name('output')} file, or {turn_on('overwrite')} to replace it.")
    return None


def resume_state(cfg: TrainConfig, fingerprint: str) -> tuple[ckpt.TrainState, Path] | None:
    """The last checkpoint of this run and its path, when it resumes; another config's run is refused
    (or removed, with overwrite)."""
    found = ckpt.list_checkpoints(cfg.run_path)
    if not found or not cfg.resume:
        return None
    state = ckpt.load_checkpoint(found[-1])
    if state.fingerprint != fingerprint and cfg.overwrite:
        ckpt.remove_checkpoints(cfg.run_path)  # another config's run, replaced as asked
        return None
    if state.fingerprint != fingerprint:
        raise UserError(f"{cfg.run_path} holds checkpoints of a different training config; "
                        "choose another output name, or delete that folder to start over.")
    return state, found[-1]


def last_checkpoint_note(cfg: TrainConfig) -> str:
    """Where a stopped run can go on from, as a clause for a message."""
    last = ckpt.list_checkpoints(cfg.run_path)
    return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"


def run_plan(cfg: TrainConfig, model, resolution: int, class_images_to_generate: int) -> dict:
    """What the run is about to do, for the header a shell prints before the first step."""
    from .models import stored_unet_dtype

    plan = {"base": str(cfg.base), "family": model.family,
            "dtype": str(stored_unet_dtype(cfg.base)).removeprefix("torch."), "method": cfg.method,
            "resolution": resolution, "steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
            "optimizer": cfg.optimizer, "mixed_precision": cfg.mixed_precision,
            "train_text_encoder": cfg.train_text_encoder, "prior_preservation": cfg.prior_preservation,
            "num_class_images": cfg.num_class_images if cfg.prior_preservation else 0,
            "class_images_to_generate": class_images_to_generate,
            "output": str(cfg.output_path), "run_dir": str(cfg.run_path)}
    if cfg.method == "lora":
        plan |= {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}
    return plan
