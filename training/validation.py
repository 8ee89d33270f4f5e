"""Validation during training: the validation prompts rendered with the weights of the current step."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .models import SDModel
from .prompts import fill_prompt
from .train_config import TrainConfig


def validation_images(cfg: TrainConfig, model: SDModel, resolution: int, step: int,
                      caption: Callable[[str], str] | None = None) -> list[Path]:
    """Render each validation prompt (seed = its index) into <run>/validation/step_NNNNNNN_<i>.png;
    `caption` rewrites the prompts (pivotal tuning's new tokens)."""
    from .safe_io import atomic_save_image
    from .sampling import generate_images

    prompts = [fill_prompt(p, cfg.token, cfg.class_word) for p in cfg.validation_prompts]
    prompts = [caption(p) for p in prompts] if caption is not None else prompts
    was_training = model.unet.training
    model.unet.eval()
    images = generate_images(model, prompts, cfg.validation_negative, list(range(len(prompts))),
                             resolution=resolution, steps=cfg.validation_steps)
    model.unet.train(was_training)
    folder = cfg.run_path / "validation"
    return [atomic_save_image(im, folder / f"step_{step:07d}_{i}.png") for i, im in enumerate(images)]
