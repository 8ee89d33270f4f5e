"""One training loop for DreamBooth and LoRA on SD1.5, driven by accelerate.

`train(cfg)` reads top to bottom: prepare data, cache latents and text embeddings, set
up what is trained, then loop; checkpoints, validation and logging are calls out of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .errors import UserError
from .frozen import freeze_base_layers
from .models import SDModel, load_model
from .progress import Progress, ProgressFn, no_progress
from .resources import is_out_of_memory, lower_settings, memory_warning
from .safe_io import atomic_write_text
from .prompts import fill_prompt
from .train_config import TEXT_TARGETS, TARGETS, TrainConfig


@dataclass
class TrainResult:
    output: Path | None  # the written model; None when cancelled
    steps_done: int
    final_loss: float | None
    cancelled: bool = False
    reused: bool = False  # the output for this exact config already existed
    run_dir: Path | None = None
    losses: list[dict] = field(default_factory=list)

    @property
    def loss_curve(self) -> Path | None:
        path = self.run_dir / "loss.png" if self.run_dir else None
        return path if path and path.exists() else None


@dataclass
class Batchable:
    """Cached training examples: latent mean/std per image (and flip) and text embeddings."""

    latent_mean: torch.Tensor  # [N, 4, h, w]
    latent_std: torch.Tensor
    input_ids: torch.Tensor  # [N, 77] token ids (for training the text encoder)
    embeddings: torch.Tensor | None  # [N, 77, d] when the text encoder is frozen


# ---------------------------------------------------------------- the job


def train(cfg: TrainConfig, progress: ProgressFn = no_progress, should_cancel: Callable[[], bool] = lambda: False,
          model: SDModel | None = None) -> TrainResult:
    """Train, resume or reuse, as the config says. Writes only to cfg.output and cfg.run_path."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg.validate()
    fingerprint = inputs_fingerprint(cfg)
    existing = _finished_output(cfg, fingerprint)
    if existing is not None:
        return existing
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one state per process and refuses a second run with another precision;
        # a host like ComfyUI trains many times in one process
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True without CUDA: under `accelerate launch --multi_gpu` that gives gloo DDP over CPU processes
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available())
    owned = model is None
    storage = _frozen_storage_dtype(cfg)
    model = (model or load_model(cfg.base, unet_dtype=storage)).to(accelerator.device)
    if cfg.method == "lora":  # the base UNet never changes: store it as it came, compute in fp32
        model.unet.requires_grad_(False)
        freeze_base_layers(model.unet, storage, torch.float32)
    resolution = cfg.resolution or model.resolution
    warning = memory_warning(cfg, model, resolution, accelerator.device)
    if warning:
        progress(Progress("warning", 0, 0, {"note": warning}))
    instance, class_examples = _prepare_examples(cfg, model, resolution, accelerator, progress)
    if owned and cfg.method == "lora" and not cfg.validation_every and not cfg.train_text_encoder:
        _ = model.sha256  # hash the base while all its weights are here: the output names the base by it
        _release(model.vae, model.text_encoder)  # latents and embeddings are cached; the output is the LoRA alone
    trainable = _setup_trainable(cfg, model)
    optimizer = _make_optimizer(cfg, trainable)
    scheduler = _make_lr_scheduler(cfg, optimizer)  # stepped once per optimizer step, on every rank alike
    state = _resume_state(cfg, fingerprint)
    if state is not None:
        trainable.load(state.weights)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    text_encoder = accelerator.prepare(model.text_encoder) if "text_encoder" in trainable.groups else model.text_encoder
    noise_schedule = _noise_schedule(model)
    losses = list(state.losses) if state else []
    step = state.step if state else 0
    started, first_step = time.perf_counter(), step

    def train_state() -> ckpt.TrainState:
        return ckpt.TrainState(step, trainable.state(), optimizer.state_dict(), scheduler.state_dict(), losses,
                               cfg.to_json(), fingerprint)

    def save_checkpoint() -> None:
        if accelerator.is_main_process and step > 0:
            ckpt.save_checkpoint(cfg.run_path, train_state())
        accelerator.wait_for_everyone()

    unet.train()
    try:
        while step < cfg.total_steps:
            if should_cancel():
                save_checkpoint()
                return TrainResult(None, step, losses[-1]["loss"] if losses else None, cancelled=True,
                                   run_dir=cfg.run_path, losses=losses)
            generator = _step_generator(cfg.seed, accelerator.process_index, step)
            loss_value = 0.0
            for _ in range(cfg.grad_accum):
                with accelerator.accumulate(unet):
                    batch = _sample_batch(cfg, instance, class_examples, generator)
                    with accelerator.autocast():
                        loss = _loss(cfg, model, unet, text_encoder, batch, noise_schedule, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_value += float(loss.detach()) / cfg.grad_accum
            scheduler.step()
            if not math.isfinite(loss_value):
                raise UserError(f"The loss became {loss_value} at step {step + 1}; {_last_checkpoint(cfg)}. Lower the "
                                f"learning rate (now {cfg.learning_rate:g}) or train in full precision "
                                "(mixed_precision 'no').")
            step += 1
            losses.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
            info = _speed(step - first_step, cfg.total_steps - step, started) | losses[-1]
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_steps:
                save_checkpoint()
            if cfg.validation_every and step % cfg.validation_every == 0 and accelerator.is_main_process:
                info["images"] = _validation_images(cfg, model, resolution, step)
            try:
                progress(Progress("train", step, cfg.total_steps, info))
            except BaseException:  # the host's Cancel arrives as an exception from its progress bar
                save_checkpoint()
                raise
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        optimizer.zero_grad(set_to_none=True)
        raise UserError(f"Out of memory at step {step + 1}; {_last_checkpoint(cfg)} and resumes with the same "
                        f"command; {lower_settings(cfg, resolution)}.") from None
    output = None
    if accelerator.is_main_process:
        try:
            output = _write_output(cfg, model, accelerator.unwrap_model(unet), losses, fingerprint)
        except (UserError, OSError):
            # a full disk: keep the finished steps, so the same command only writes the output
            # (a LoRA checkpoint is small; a DreamBooth one may not fit either, then the last one stands)
            with contextlib.suppress(UserError, OSError):
                ckpt.save_checkpoint(cfg.run_path, train_state())
            raise
        ckpt.remove_checkpoints(cfg.run_path)  # the output supersedes them (a DreamBooth one is GBs)
    accelerator.wait_for_everyone()
    return TrainResult(output, step, losses[-1]["loss"] if losses else None, run_dir=cfg.run_path, losses=losses)


def _frozen_storage_dtype(cfg: TrainConfig) -> torch.dtype:
    """What a LoRA run keeps the frozen UNet layers in: the half precision it computes in, else
    the precision the base stores them in (upcasting fp16 is exact: the loss is the same)."""
    if cfg.method != "lora":
        return torch.float32  # DreamBooth trains every weight: fp32 master copies from the start
    if cfg.mixed_precision in ("fp16", "bf16"):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    from .models import stored_unet_dtype

    return stored_unet_dtype(cfg.base)


def _last_checkpoint(cfg: TrainConfig) -> str:
    last = ckpt.list_checkpoints(cfg.run_path)
    return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"


def _release(*modules: torch.nn.Module) -> None:
    """Free the weights of modules the loop no longer needs (their configs stay readable)."""
    for module in modules:
        module.to("meta")


def inputs_fingerprint(cfg: TrainConfig) -> str:
    """A hash of the config's result-changing fields and of its inputs (base, photos, given class images)."""
    import hashlib

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


# ---------------------------------------------------------------- reuse and resume


def _finished_output(cfg: TrainConfig, fingerprint: str) -> TrainResult | None:
    """The output already written for this exact config is reused; a different one is refused."""
    out = cfg.output_path
    if not out.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(out), framework="pt") as f:
            written = (f.metadata() or {}).get("dreambooth.config_hash")
    except Exception:
        written = None
    if written == fingerprint and not cfg.overwrite:
        return TrainResult(out, cfg.total_steps, None, reused=True, run_dir=cfg.run_path)
    if not cfg.overwrite:
        raise UserError(f"{out} already exists and was not made by this exact training config; "
                        "choose another output name or turn on overwrite.")
    return None


def _resume_state(cfg: TrainConfig, fingerprint: str) -> ckpt.TrainState | None:
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
    return state


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Randomness of one step depends only on (seed, rank, step): resuming needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63))


# ---------------------------------------------------------------- data


def _prepare_examples(cfg: TrainConfig, model: SDModel, resolution: int, accelerator, progress: ProgressFn):
    from .dataset import DATASET_JSON, PrepareConfig, load_dataset, prepare_dataset

    folder = Path(cfg.instance_dir)
    if not (folder / DATASET_JSON).is_file():  # a photo folder: prepare it on the fly
        prepared = cfg.run_path / "dataset"
        if accelerator.is_main_process:
            prepare_dataset(folder, prepared, PrepareConfig(token=cfg.token, class_word=cfg.class_word,
                                                            resolution=resolution, flip=cfg.flip), progress)
        accelerator.wait_for_everyone()
        folder = prepared
    dataset = load_dataset(folder)
    items = dataset.training_items()
    images = [_open_rgb(item.image, "training image") for item in items]
    captions = [fill_prompt(item.caption, cfg.token, cfg.class_word) for item in items]
    if cfg.batch_size > len(images):
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {len(images)} images in {folder}; "
                        f"use a batch size of at most {len(images)} or add photos.")
    mirror = cfg.flip and not dataset.config.flip  # a dataset prepared with flip already holds mirrored copies
    instance = _encode(model, images, captions, resolution, cfg, progress, "cache instance latents", mirror)
    class_examples = None
    if cfg.prior_preservation:
        class_prompt = fill_prompt(cfg.class_prompt, cfg.token, cfg.class_word)
        paths = _class_image_paths(cfg, model, resolution, class_prompt, accelerator, progress)
        class_images = [_open_rgb(p, "class image") for p in paths]
        class_examples = _encode(model, class_images, [class_prompt] * len(class_images), resolution, cfg, progress,
                                 "cache class latents", cfg.flip)
    return instance, class_examples


def _open_rgb(path: Path, what: str):
    """An image from a folder the user may have edited; a bad one is one line naming it, not a traceback."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"The {what} {path} cannot be read ({str(exc).splitlines()[0][:100]}); "
                        f"remove or replace it in {Path(path).parent}.") from None


def _class_image_paths(cfg: TrainConfig, model: SDModel, resolution: int, class_prompt: str, accelerator,
                       progress: ProgressFn) -> list[Path]:
    """A folder that already holds images is used as it is (made by the Class Images node or
    `class-images`, or the user's own); otherwise the images are generated once into a cache."""
    from .class_images import ClassImageConfig, ensure_class_images, list_images
    from .sampling import make_generator

    given = list_images(Path(cfg.class_dir)) if cfg.class_dir else []
    if given:
        return given[: cfg.num_class_images]
    root = Path(cfg.class_dir) if cfg.class_dir else cfg.run_path.parent / "class_images"
    icfg = ClassImageConfig(class_word=cfg.class_word, prompt=class_prompt, negative=cfg.class_negative,
                            num=cfg.num_class_images, resolution=resolution, steps=cfg.class_steps, seed=cfg.seed)
    if accelerator.is_main_process:
        ensure_class_images(make_generator(model), model.sha256, root, icfg, progress)
    accelerator.wait_for_everyone()
    return ensure_class_images(make_generator(model), model.sha256, root, icfg).images[: cfg.num_class_images]


@torch.no_grad()
def _encode(model: SDModel, images: list, captions: list[str], resolution: int, cfg: TrainConfig,
            progress: ProgressFn, stage: str, mirror: bool = False) -> Batchable:
    """VAE latents once per image (and its mirror image), text embeddings once per caption."""
    from PIL import ImageOps

    if mirror:
        images = images + [ImageOps.mirror(im) for im in images]
        captions = captions + captions
    means, stds = [], []
    device, dtype = next(model.vae.parameters()).device, next(model.vae.parameters()).dtype
    for i, image in enumerate(images):
        pixels = _to_tensor(image, resolution).to(device, dtype)
        dist = model.vae.encode(pixels[None]).latent_dist
        means.append(dist.mean[0].float().cpu())
        stds.append(dist.std[0].float().cpu())
        progress(Progress(stage, i + 1, len(images)))
    ids = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    embeddings = None
    if not cfg.train_text_encoder:
        unique = {c: None for c in captions}
        for caption in unique:
            one = ids[captions.index(caption)][None].to(device)
            unique[caption] = model.text_encoder(one)[0][0].float().cpu()
        embeddings = torch.stack([unique[c] for c in captions])
    return Batchable(torch.stack(means), torch.stack(stds), ids, embeddings)


def _to_tensor(image, resolution: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return array / 127.5 - 1.0


def _sample_batch(cfg: TrainConfig, instance: Batchable, class_examples: Batchable | None,
                  generator: torch.Generator) -> dict:
    """Instance examples, then class examples (prior preservation), in one batch."""
    parts = [(instance, torch.randint(len(instance.input_ids), (cfg.batch_size,), generator=generator))]
    if class_examples is not None:
        parts.append((class_examples, torch.randint(len(class_examples.input_ids), (cfg.batch_size,), generator=generator)))
    mean = torch.cat([src.latent_mean[idx] for src, idx in parts])
    std = torch.cat([src.latent_std[idx] for src, idx in parts])
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    ids = torch.cat([src.input_ids[idx] for src, idx in parts])
    emb = None if instance.embeddings is None else torch.cat([src.embeddings[idx] for src, idx in parts])
    return {"latents": latents, "input_ids": ids, "embeddings": emb}


# ---------------------------------------------------------------- what is trained


@dataclass
class Trainable:
    """What one method trains: the modules it touches and their trainable parameters."""

    modules: dict[str, torch.nn.Module]  # "unet", "text_encoder"
    groups: dict[str, list[torch.nn.Parameter]]  # trainable params per module

    def named(self) -> dict[str, torch.nn.Parameter]:
        """Trainable params by qualified name ("unet.<param>", "text_encoder.<param>")."""
        wanted = {id(p) for params in self.groups.values() for p in params}
        return {f"{prefix}.{name}": p for prefix, module in self.modules.items()
                for name, p in module.named_parameters() if id(p) in wanted}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for params in self.groups.values() for p in params]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named().items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        named = self.named()
        missing = sorted(set(named) - set(weights))
        if missing:
            raise UserError(f"The checkpoint does not match this training setup (it lacks {missing[0]}); "
                            "delete the run folder to start over.")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(weights[name])


def _setup_trainable(cfg: TrainConfig, model: SDModel) -> Trainable:
    """Freeze everything, then open what this method trains."""
    for module in model.components().values():
        module.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()
    if cfg.method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        model.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=TARGETS[cfg.targets]))
        if cfg.train_text_encoder:
            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=TEXT_TARGETS),
                                    model.text_encoder)
        generator = torch.Generator().manual_seed(cfg.seed)
        for module in (model.unet, model.text_encoder):
            for name, p in module.named_parameters():
                trained = "lora_" in name and (module is model.unet or cfg.train_text_encoder)
                p.requires_grad_(trained)
                if trained:  # down-weights ~ N(0, 1/rank) in fp32 whatever the base's precision, up-weights 0
                    init = torch.randn(p.shape, generator=generator) / cfg.rank if "lora_A" in name else \
                        torch.zeros(p.shape)
                    p.data = init.to(p.device)
    else:
        model.unet.requires_grad_(True)
        model.text_encoder.requires_grad_(cfg.train_text_encoder)
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    groups = {name: [p for p in m.parameters() if p.requires_grad] for name, m in modules.items()}
    groups = {name: params for name, params in groups.items() if params}
    for p in (p for params in groups.values() for p in params):
        p.data = p.data.float()  # fp32 master weights; mixed precision autocasts the compute
    return Trainable(modules, groups)


def _make_optimizer(cfg: TrainConfig, trainable: Trainable) -> torch.optim.Optimizer:
    groups = [{"params": trainable.groups["unet"], "lr": cfg.learning_rate}]
    if "text_encoder" in trainable.groups:
        groups.append({"params": trainable.groups["text_encoder"], "lr": cfg.text_encoder_lr or cfg.learning_rate})
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes and a GPU; pip install bitsandbytes, "
                            "or choose 'adamw'.") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("optimizer 'prodigy' needs prodigyopt; pip install prodigyopt, or choose 'adamw'.") from None
        return Prodigy(groups, weight_decay=1e-2)
    return torch.optim.AdamW(groups, weight_decay=1e-2, fused=True)  # one kernel for all params: ~10% a LoRA step


def _make_lr_scheduler(cfg: TrainConfig, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.total_steps)


# ---------------------------------------------------------------- the loss


def _noise_schedule(model: SDModel):
    from diffusers import DDPMScheduler

    config = {k: v for k, v in model.scheduler_config.items() if k != "_class_name"}
    return DDPMScheduler.from_config(config)


def _loss(cfg: TrainConfig, model: SDModel, unet, text_encoder, batch: dict, schedule,
          generator: torch.Generator) -> torch.Tensor:
    device = next(unet.parameters()).device
    latents = batch["latents"].to(device) * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(device)
    t = torch.randint(0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = schedule.add_noise(latents, noise, t)
    if batch["embeddings"] is not None:
        context = batch["embeddings"].to(device)
    else:
        context = text_encoder(batch["input_ids"].to(device))[0]
    pred = unet(noisy, t, context).sample
    target = noise if model.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, t)
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        per_example = per_example * _min_snr_weight(schedule, t, cfg.min_snr_gamma, model.prediction_type)
    if cfg.prior_preservation:
        instance_loss, class_loss = per_example.chunk(2)
        return instance_loss.mean() + cfg.prior_loss_weight * class_loss.mean()
    return per_example.mean()


def _min_snr_weight(schedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alphas = schedule.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# ---------------------------------------------------------------- reporting and output


def _speed(done: int, left: int, started: float) -> dict:
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    return {"it_per_s": rate, "eta_s": left / rate if rate else None, "elapsed_s": elapsed}


def _validation_images(cfg: TrainConfig, model: SDModel, resolution: int, step: int) -> list[Path]:
    from .safe_io import atomic_save_image
    from .sampling import generate_images

    prompts = [fill_prompt(p, cfg.token, cfg.class_word) for p in cfg.validation_prompts]
    was_training = model.unet.training
    model.unet.eval()
    images = generate_images(model, prompts, cfg.validation_negative, list(range(len(prompts))),
                             resolution=resolution, steps=20)
    model.unet.train(was_training)
    folder = cfg.run_path / "validation"
    return [atomic_save_image(im, folder / f"step_{step:07d}_{i}.png") for i, im in enumerate(images)]


def _write_output(cfg: TrainConfig, model: SDModel, unet, losses: list[dict], fingerprint: str) -> Path:
    from .models import save_single_file

    meta = {
        "dreambooth.token": cfg.token,
        "dreambooth.class_word": cfg.class_word,
        "dreambooth.method": cfg.method,
        "dreambooth.config": cfg.to_json(),
        "dreambooth.config_hash": fingerprint,
        "dreambooth.base_sha256": model.sha256,
        "dreambooth.steps": str(cfg.total_steps),
        "dreambooth.final_loss": f"{losses[-1]['loss']:.6g}" if losses else "",
    }
    _write_loss_log(cfg.run_path, losses)
    if cfg.method == "lora":
        from peft.utils import get_peft_model_state_dict

        from .lora_format import kohya_metadata, peft_state_to_lora, write_kohya

        te_state = get_peft_model_state_dict(model.text_encoder) if cfg.train_text_encoder else None
        lora = peft_state_to_lora(get_peft_model_state_dict(unet), te_state, cfg.lora_alpha)
        meta = kohya_metadata(lora, title=cfg.output_path.stem, steps=cfg.total_steps, token=cfg.token,
                              class_word=cfg.class_word, base_sha256=model.sha256, base_name=Path(cfg.base).name,
                              training=json.loads(cfg.to_json()), resolution=cfg.resolution or model.resolution) | meta
        return write_kohya(lora, cfg.output_path, metadata=meta)
    return save_single_file(model, cfg.output_path, metadata=meta)


def _write_loss_log(run_dir: Path, losses: list[dict]) -> None:
    atomic_write_text(run_dir / "loss.jsonl", "".join(json.dumps(r) + "\n" for r in losses))
    if losses:
        plot_loss(losses, run_dir / "loss.png")


def plot_loss(losses: list[dict], path: Path, size: tuple[int, int] = (640, 320)) -> Path:
    """Loss (raw and a moving mean) and learning rate against step, as a PNG (PIL: no plotting library to load)."""
    from PIL import Image, ImageDraw

    from .safe_io import atomic_save_image

    steps = [r["step"] for r in losses]
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    mean = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
    lrs = [r["lr"] for r in losses]
    width, height = size
    left, right, top, bottom = 56, width - 56, 24, height - 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, right, bottom], outline="#888")

    def scaler(lo: float, hi: float, a: float, b: float):
        span = (hi - lo) or 1.0
        return lambda v: a + (v - lo) / span * (b - a)

    x = scaler(steps[0], steps[-1], left, right) if len(steps) > 1 else (lambda v: (left + right) / 2)
    y = scaler(min(values), max(values), bottom, top)
    y_lr = scaler(0.0, max(lrs) or 1.0, bottom, top)
    for series, scale, colour, w in ((values, y, "#9ab", 1), (mean, y, "#157", 2), (lrs, y_lr, "#c73", 1)):
        points = [(x(s), scale(v)) for s, v in zip(steps, series)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=w)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
    draw.text((left, 4), f"loss (blue, mean of {window} dark)", fill="#157")
    draw.text((right - 110, 4), "learning rate (orange)", fill="#c73")
    draw.text((4, top), f"{max(values):.3g}", fill="#157")
    draw.text((4, bottom - 10), f"{min(values):.3g}", fill="#157")
    draw.text((right + 4, top), f"{max(lrs):.2g}", fill="#c73")
    draw.text((left, bottom + 8), f"step {steps[0]}", fill="#444")
    draw.text((right - 60, bottom + 8), f"step {steps[-1]}", fill="#444")
    return atomic_save_image(image, path)
