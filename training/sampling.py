"""Sampling with diffusers' StableDiffusionPipeline built from a loaded model."""
from __future__ import annotations

from typing import Callable

import torch

from .models import SDModel
from .progress import Progress, ProgressFn, no_progress
from .quiet import quiet_libraries

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm")

def make_scheduler(model: SDModel, sampler: str = "ddim"):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
               "dpmpp_2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}
    config = {k: v for k, v in model.scheduler_config.items() if k != "_class_name"}
    return classes[sampler].from_config(config)


def make_pipeline(model: SDModel, sampler: str = "ddim"):
    """A StableDiffusionPipeline over the model's own modules (no copies, no safety checker)."""
    with quiet_libraries():  # importing the pipeline notes that torchvision is absent; it is not needed
        from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(model, sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_images(model: SDModel, prompts: list[str], negative: str = "", seeds: list[int] | None = None, *,
                    resolution: int | None = None, steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                    batch_size: int = 4, progress: ProgressFn = no_progress, stage: str = "generate",
                    cross_attention_kwargs: dict | None = None) -> list:
    """One image per prompt, each from its own seed (so any image can be redone alone)."""
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    resolution = resolution or model.resolution
    pipe = make_pipeline(model, sampler)
    device = next(model.unet.parameters()).device
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        latents = torch.stack([torch.randn((4, resolution // 8, resolution // 8), generator=g) for g in generators])
        with torch.inference_mode():
            out = pipe(prompt=chunk, negative_prompt=[negative] * len(chunk) if negative else None,
                       height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                       latents=latents.to(device, model.unet.dtype), cross_attention_kwargs=cross_attention_kwargs)
        images.extend(out.images)
        progress(Progress(stage, len(images), len(prompts)))
    return images


def make_generator(model: SDModel, sampler: str = "ddim") -> Callable:
    """The callable the class-image cache uses: (prompts, negative, seeds, resolution, steps, guidance) -> images."""

    def generate(prompts, negative, seeds, resolution, steps, guidance):
        return generate_images(model, list(prompts), negative, list(seeds), resolution=resolution, steps=steps,
                               guidance=guidance, sampler=sampler)

    return generate
