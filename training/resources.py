"""Memory: a rough estimate before training, and a plain answer when memory runs out."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .train_config import TrainConfig

GB = 1024**3
# Activation memory of one SD1.5 UNet training example at 512 px in fp32 (saved for backward),
# measured on CPU; it scales with pixels. Gradient checkpointing keeps roughly a fifth of it.
ACTIVATIONS_PER_EXAMPLE_512 = 5.0 * GB
CHECKPOINTED_FRACTION = 0.2


@dataclass
class MemoryEstimate:
    weights: float
    training_state: float  # gradients and optimizer moments of what is trained
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.training_state + self.activations


def estimate_memory(cfg: TrainConfig, model, resolution: int) -> MemoryEstimate:
    """Bytes the training loop will hold, from the real parameter counts of the model."""
    compute_bytes = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.components().items()}
    # as loaded: a LoRA run keeps the frozen UNet in the precision the base stores it in
    weights = float(sum(p.numel() * p.element_size() for m in model.components().values() for p in m.parameters()))
    if cfg.method == "dreambooth":
        trained = counts["unet"] + (counts["text_encoder"] if cfg.train_text_encoder else 0)
    else:  # a LoRA adds about rank * (in + out) per adapted layer: a few per mille of the UNet
        trained = counts["unet"] * cfg.rank / 2000
    optimizer_slots = 0.5 if cfg.optimizer == "adamw8bit" else 2.0  # Adam moments (8-bit: a quarter each)
    training_state = trained * 4.0 * (1 + optimizer_slots)
    examples = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    unet_scale = counts["unet"] / 859.5e6  # activations grow with width like the weights do
    per_example = ACTIVATIONS_PER_EXAMPLE_512 * (resolution / 512) ** 2 * unet_scale * compute_bytes / 4
    if cfg.gradient_checkpointing:
        per_example *= CHECKPOINTED_FRACTION
    return MemoryEstimate(weights, training_state, per_example * examples)


def available_memory(device: torch.device) -> tuple[float, str]:
    """Free bytes on the device training runs on, and its name."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), torch.cuda.get_device_name(device)
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return float(info["MemAvailable"].split()[0]) * 1024, "system memory"
    except (OSError, KeyError, ValueError):
        return float("inf"), "system memory"


def memory_warning(cfg: TrainConfig, model, resolution: int, device: torch.device) -> str | None:
    """One line when the estimate exceeds what the device has free, naming settings to lower."""
    estimate = estimate_memory(cfg, model, resolution)
    free, name = available_memory(device)
    if estimate.total <= free:
        return None
    return (f"This run needs about {estimate.total / GB:.1f} GB but {name} has {free / GB:.1f} GB free; "
            f"it may run out of memory; {lower_settings(cfg, resolution)}.")


def fit_to_memory(cfg: TrainConfig, model, resolution: int, free: float, device_name: str, eight_bit_adam: bool,
                  resumed_optimizer: str | None = None) -> list[str]:
    """Turn on what a DreamBooth run needs to fit in `free` bytes, cheapest first; one line per change.

    The rule: while the estimate exceeds the device's free memory, gradient checkpointing (the same
    numbers, about a third slower), then 8-bit AdamW if `eight_bit_adam` (bitsandbytes importable,
    on a GPU; Adam's moments in a quarter of the memory, slightly different numbers). A resumed run
    keeps the optimizer its checkpoint was written with. LoRA runs are left as set: their memory is
    activations, and the memory warning names the settings for those. Changes `cfg` in place.
    """
    if resumed_optimizer:
        cfg.optimizer = resumed_optimizer
    if cfg.method != "dreambooth":
        return []
    notes = []

    def needed() -> float:
        return estimate_memory(cfg, model, resolution).total

    if not cfg.gradient_checkpointing and needed() > free:
        notes.append(f"Gradient checkpointing is on for this run: it needs about {needed() / GB:.1f} GB without it "
                     f"and {device_name} has {free / GB:.1f} GB free.")
        cfg.gradient_checkpointing = True
    if not resumed_optimizer and eight_bit_adam and cfg.optimizer == "adamw" and needed() > free:
        notes.append(f"The optimizer is 8-bit AdamW (bitsandbytes) for this run: it needs about {needed() / GB:.1f} GB "
                     f"with AdamW and {device_name} has {free / GB:.1f} GB free.")
        cfg.optimizer = "adamw8bit"
    return notes


def memory_notes(cfg: TrainConfig, model, resolution: int, device: torch.device,
                 resumed_optimizer: str | None = None) -> list[str]:
    """fit_to_memory on this device, then the warning if the run still does not fit."""
    import importlib.util

    free, name = available_memory(device)
    eight_bit = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    notes = fit_to_memory(cfg, model, resolution, free, name, eight_bit, resumed_optimizer)
    warning = memory_warning(cfg, model, resolution, device)
    return notes + ([warning] if warning else [])


def lower_settings(cfg: TrainConfig, resolution: int) -> str:
    """The concrete settings that cut memory the most, for this config."""
    tips = []
    if cfg.batch_size > 1:
        tips.append("batch_size 1 (with grad_accum for the same effective batch)")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing on")
    if cfg.mixed_precision == "no" and torch.cuda.is_available():
        tips.append("mixed_precision bf16 (or fp16)")
    if cfg.method == "dreambooth":
        tips.append("method lora (or optimizer adamw8bit on a GPU)")
    if resolution > 384:
        tips.append(f"resolution {max(256, resolution // 2 // 64 * 64)}")
    if cfg.train_text_encoder:
        tips.append("train_text_encoder off")
    return "to fit, try " + ", ".join(tips) if tips else "close other programs or use a machine with more memory"


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the setting.

    For work made of many small parallel regions (tiny's layers, thousands of small QR/SVD
    calls): a second thread gains little, and on a busy 2-core machine each region waits for a
    core, measured 10-30x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
