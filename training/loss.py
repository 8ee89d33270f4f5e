"""The denoising loss of one batch: noise, timesteps, the UNet's prediction against its target."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import SDModel
from .train_config import TrainConfig


def noise_schedule(model: SDModel):
    """The base's DDPM training schedule."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in model.scheduler_config.items() if k != "_class_name"}
    return DDPMScheduler.from_config(config)


def denoising_loss(cfg: TrainConfig, model: SDModel, unet, context: torch.Tensor, latents: torch.Tensor, schedule,
                   generator: torch.Generator, weights: torch.Tensor | None = None, identity=None) -> torch.Tensor:
    """MSE of the UNet's prediction (noise, or velocity for v-prediction) on latents noised at random
    timesteps; instance then class halves with prior preservation. `weights` ([n, 1, h, w], the first n
    rows: the instance examples) multiply the per-pixel error before the mean (background_weight).
    `identity(noisy, pred, t, schedule)` adds the identity term (identity_loss.IdentityLoss.for_batch)."""
    device = next(unet.parameters()).device
    latents = latents.to(device) * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(device)
    t = torch.randint(0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, context.to(device)).sample
    target = noise if model.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, t)
    per_pixel = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weights is not None:  # None (background_weight 1): no multiply at all, so the loss is bit-identical
        n = weights.shape[0]
        per_pixel = torch.cat([per_pixel[:n] * weights.to(per_pixel.device), per_pixel[n:]])
    per_example = per_pixel.mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        per_example = per_example * min_snr_weight(schedule, t, cfg.min_snr_gamma, model.prediction_type)
    if cfg.prior_preservation:
        instance_loss, class_loss = per_example.chunk(2)
        loss = instance_loss.mean() + cfg.prior_loss_weight * class_loss.mean()
    else:
        loss = per_example.mean()
    return loss if identity is None else loss + identity(noisy, pred, t, schedule)


def min_snr_weight(schedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alphas = schedule.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
