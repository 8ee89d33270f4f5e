"""One training loop for DreamBooth and LoRA on SD1.5, driven by accelerate.

`train(cfg)` reads top to bottom: reuse or resume, cache the examples, set up what is trained,
then loop; caching (examples.py), resume (runs.py, checkpoint.py), what is trained (trainable.py),
the loss (loss.py), validation and the loss log are calls out of it.

Cancelling is one mechanism: the progress callback raises (ComfyUI's Cancel, the CLI's Ctrl-C);
the loop then saves a checkpoint at the current step and re-raises.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .errors import UserError, input_name
from .examples import batch_context, class_images_to_generate, dataset_folder, prepare_examples, sample_batch
from .identity import IdentityTracker
from .identity_loss import make_identity_loss
from .loss import denoising_loss, noise_schedule
from .loss_log import write_loss_log
from .models import SDModel, load_model
from .pivotal import Pivotal, start_pivotal
from .progress import Progress, ProgressFn, no_progress
from .resources import is_out_of_memory, lower_settings, memory_notes
from .runs import TrainResult, finished_output, inputs_fingerprint, last_checkpoint_note, resume_state, run_plan
from .train_config import TrainConfig
from .trainable import freeze_base, frozen_storage_dtype, make_lr_scheduler, make_optimizer, setup_trainable
from .validation import validation_images

__all__ = ["TrainResult", "train"]


def train(cfg: TrainConfig, progress: ProgressFn = no_progress, model: SDModel | None = None) -> TrainResult:
    """Train, resume or reuse, as the config says. Writes only to cfg.output and cfg.run_path."""
    cfg.validate()
    fingerprint = inputs_fingerprint(cfg)
    existing = finished_output(cfg, fingerprint)
    if existing is not None:
        return existing
    accelerator = _accelerator(cfg)
    owned = model is None
    storage = frozen_storage_dtype(cfg)
    model = (model or load_model(cfg.base, unet_dtype=storage)).to(accelerator.device)
    freeze_base(cfg, model, storage)
    pivotal = start_pivotal(cfg, model)  # the trigger word as new tokens, before any caption is tokenized
    caption = pivotal.caption if pivotal is not None else None
    resolution = cfg.resolution or model.resolution
    resumed = resume_state(cfg, fingerprint)
    progress(Progress("plan", 0, 0, run_plan(cfg, model, resolution, class_images_to_generate(cfg, model, resolution))))
    if resumed is not None:
        progress(Progress("resume", resumed[0].step, cfg.steps, {"checkpoint": str(resumed[1])}))
    resumed_optimizer = json.loads(resumed[0].config_json).get("optimizer") if resumed is not None else None
    for note in memory_notes(cfg, model, resolution, accelerator.device, resumed_optimizer):
        progress(Progress("warning", 0, 0, {"note": note}))
    instance, class_examples = prepare_examples(cfg, model, resolution, accelerator, progress, caption)
    if owned and cfg.method == "lora" and not (cfg.validation_every or cfg.train_text_encoder or pivotal):
        _ = model.sha256  # hash the base while all its weights are here: the output names the base by it
        # latents and embeddings are cached; the output is the LoRA alone; the identity loss decodes with the VAE
        _release(model.text_encoder, *([] if cfg.identity_weight else [model.vae]))
    trainable = setup_trainable(cfg, model, pivotal.parameter if pivotal is not None else None)
    optimizer = make_optimizer(cfg, trainable)
    scheduler = make_lr_scheduler(cfg, optimizer)
    state = resumed[0] if resumed is not None else None
    if state is not None:
        trainable.load(state.weights)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    text_encoder = accelerator.prepare(model.text_encoder) if trainable.trains_text_encoder else model.text_encoder
    schedule = noise_schedule(model)
    losses = list(state.losses) if state else []
    step = state.step if state else 0
    identity = IdentityTracker(cfg, dataset_folder(cfg), progress, step, losses)  # scores validation renders
    face_loss = make_identity_loss(cfg, model, instance.faces)  # the identity loss term; None: off
    started, first_step = time.perf_counter(), step

    def train_state() -> ckpt.TrainState:
        return ckpt.TrainState(step, trainable.state(), optimizer.state_dict(), scheduler.state_dict(), losses,
                               cfg.to_json(), fingerprint)

    def save_checkpoint() -> None:
        if accelerator.is_main_process and step > 0:
            ckpt.save_checkpoint(cfg.run_path, train_state())
        accelerator.wait_for_everyone()

    unet.train()
    restore_convs = _native_convs_on_small_grids(instance.latent_mean.shape[-1])
    try:
        while step < cfg.steps:
            if pivotal is not None and pivotal.training and step >= pivotal.freeze_at:
                pivotal.freeze(instance, text_encoder, cache=not cfg.train_text_encoder)
            generator = _step_generator(cfg.seed, accelerator.process_index, step)
            loss_value, face_terms = 0.0, []
            for _ in range(cfg.grad_accum):
                with accelerator.accumulate(unet):
                    batch = sample_batch(cfg, instance, class_examples, generator)
                    with accelerator.autocast():
                        context = batch_context(batch, text_encoder, accelerator.device)
                        due = face_loss is not None and face_loss.due(step)
                        loss = denoising_loss(cfg, model, unet, context, batch["latents"], schedule, generator,
                                              weights=batch["weights"],
                                              identity=face_loss.for_batch(batch["instance_index"]) if due else None)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_value += float(loss.detach()) / cfg.grad_accum
                if due and face_loss.last is not None:
                    face_terms.append(face_loss.last / cfg.grad_accum)
            scheduler.step()
            if not math.isfinite(loss_value):
                raise UserError(f"The loss became {loss_value} at step {step + 1}; {last_checkpoint_note(cfg)}. Lower "
                                f"the learning rate (now {cfg.lr:g}) or train in full precision "
                                f"({input_name('mixed_precision')} 'no').")
            step += 1
            losses.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
                          | ({"identity_loss": sum(face_terms)} if face_terms else {}))
            info = _speed(step - first_step, cfg.steps - step, started) | losses[-1]
            try:  # the weights are those of `step` now: a stop from here on keeps them
                if cfg.validation_every and step % cfg.validation_every == 0 and accelerator.is_main_process:
                    info["images"] = validation_images(cfg, model, resolution, step, caption)
                    losses[-1] |= identity.track(step, info["images"], trainable)  # into loss.jsonl and the event
                    info |= losses[-1]
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save_checkpoint()
                progress(Progress("train", step, cfg.steps, info))
            except BaseException:  # Cancel arrives as an exception from the progress callback
                save_checkpoint()
                raise
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        optimizer.zero_grad(set_to_none=True)
        raise UserError(f"Out of memory at step {step + 1}; {last_checkpoint_note(cfg)} and resumes with the same "
                        f"command; {lower_settings(cfg, resolution)}.") from None
    finally:
        restore_convs()
    output = kept = None
    if accelerator.is_main_process:
        kept = identity.restore_best(trainable)  # keep best-identity: that step's weights are written
        try:
            output = _write_output(cfg, model, accelerator.unwrap_model(unet), losses, fingerprint, pivotal)
        except (UserError, OSError):
            # a full disk: keep the finished steps, so the same command only writes the output
            # (a LoRA checkpoint is small; a DreamBooth one may not fit either, then the last one stands)
            with contextlib.suppress(UserError, OSError):
                if kept is None:  # else the weights in memory are the kept step's, not those of `step`
                    ckpt.save_checkpoint(cfg.run_path, train_state())
            raise
        ckpt.remove_checkpoints(cfg.run_path)  # the output supersedes them (a DreamBooth one is GBs)
    accelerator.wait_for_everyone()
    return TrainResult(output, step, losses[-1]["loss"] if losses else None, run_dir=cfg.run_path, losses=losses,
                       kept=kept)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one state per process and refuses a second run with another precision;
        # a host like ComfyUI trains many times in one process
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True without CUDA: under `accelerate launch --multi_gpu` that gives gloo DDP over CPU processes
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                       cpu=not torch.cuda.is_available())


def _native_convs_on_small_grids(latent_side: int) -> Callable[[], None]:
    """PyTorch's native CPU convolution on latent grids of 8x8 and less (64 px images, `tiny`); returns
    what restores the setting. oneDNN's per-call setup outweighs its speed there (measured at 1 thread: a
    3x3 conv forward and backward on [2, 32, 8, 8] in 0.47 ms instead of 0.67, a `tiny` step ~10% faster);
    from 16x16 on oneDNN is faster. Results differ from oneDNN's in the last bits, run to run they do not."""
    enabled = torch.backends.mkldnn.enabled
    if latent_side <= 8:
        torch.backends.mkldnn.enabled = False  # the attribute, not flags(): that also sets TF32 and warns

    def restore() -> None:
        torch.backends.mkldnn.enabled = enabled
    return restore


def _release(*modules: torch.nn.Module) -> None:
    """Free the weights of modules the loop no longer needs (their configs stay readable)."""
    for module in modules:
        module.to("meta")


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Randomness of one step depends only on (seed, rank, step): resuming needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63))


def _speed(done: int, left: int, started: float) -> dict:
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    return {"it_per_s": rate, "eta_s": left / rate if rate else None, "elapsed_s": elapsed}


def _write_output(cfg: TrainConfig, model: SDModel, unet, losses: list[dict], fingerprint: str,
                  pivotal: Pivotal | None) -> Path:
    """The LoRA file (kohya keys) or the DreamBooth single-file checkpoint, with what made it in metadata;
    with pivotal tuning the LoRA carries the token embedding, and the standalone embedding file is written first."""
    from .models import save_single_file

    meta = {
        "dreambooth.token": cfg.token,
        "dreambooth.class_word": cfg.class_word,
        "dreambooth.method": cfg.method,
        "dreambooth.config": cfg.to_json(),
        "dreambooth.config_hash": fingerprint,
        "dreambooth.base_sha256": model.sha256,
        "dreambooth.steps": str(cfg.steps),
        "dreambooth.final_loss": f"{losses[-1]['loss']:.6g}" if losses else "",
    }
    write_loss_log(cfg.run_path, losses)
    if cfg.method == "lora":
        from peft.utils import get_peft_model_state_dict

        from .lora.write import LORAPLUS_KEY, kohya_metadata, peft_state_to_lora, write_kohya

        def base_weight(name: str) -> torch.Tensor:  # the frozen weight under a peft layer; DoRA's dora_scale needs it
            component, path = name.split(".", 1)
            return getattr(model, component).get_submodule(path).base_layer.weight

        te_state = get_peft_model_state_dict(model.text_encoder) if cfg.train_text_encoder else None
        variant = {"lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "use_dora": cfg.dora}
        loraplus = {LORAPLUS_KEY: f"{cfg.loraplus_ratio:g}"} if cfg.loraplus_ratio > 1 else {}
        lora = peft_state_to_lora(get_peft_model_state_dict(unet), te_state, variant, loraplus, base_weight)
        if pivotal is not None:
            from .embedding import write_embedding_file

            embedding = pivotal.embedding()
            lora.embeddings[embedding.trigger] = embedding.vectors
            meta |= embedding.metadata()
            write_embedding_file(embedding, embedding_output(cfg), {"dreambooth.config_hash": fingerprint,
                                                                   "dreambooth.base_sha256": model.sha256})
        meta = kohya_metadata(lora, title=cfg.output_path.stem, steps=cfg.steps, token=cfg.token,
                              class_word=cfg.class_word, base_sha256=model.sha256, base_name=Path(cfg.base).name,
                              training=json.loads(cfg.to_json()), resolution=cfg.resolution or model.resolution) | meta
        return write_kohya(lora, cfg.output_path, metadata=meta)
    return save_single_file(model, cfg.output_path, metadata=meta)


def embedding_output(cfg: TrainConfig) -> Path:
    """Where pivotal tuning's standalone embedding file goes: `<output stem>_embedding.safetensors`, beside
    the output or in `embedding_dir`."""
    from .embedding import embedding_path

    path = embedding_path(cfg.output_path)
    return Path(cfg.embedding_dir) / path.name if cfg.embedding_dir else path
