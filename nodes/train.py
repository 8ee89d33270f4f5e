"""Train Subject: LoRA or DreamBooth on a prepared dataset, inside the ComfyUI server.

The trained file goes to models/loras (LoRA) or models/checkpoints (DreamBooth); the run
folder (checkpoints, loss log, validation images) to output/dreambooth/runs/<name>/, so
ComfyUI never lists a training checkpoint in its model combos.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..training.train_config import (KEEP, METHODS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainConfig, field_help,
                                     method_defaults_text)
from .class_images import CLASS_IMAGES
from .dataset import SUBJECT_DATASET
from .host import (CATEGORY, HostProgress, blank_image, check_output_name, deleted_since_written,
                   empty_cache, file_signature, first_model_folder, free_host_models, model_choices, model_file,
                   name_in_model_folder, output_folder, pils_to_tensor, remember_written, send_event, user_errors,
                   view_ref)

PROGRESS_EVENT = "dreambooth.train.progress"
MODEL_FOLDER = {"lora": "loras", "dreambooth": "checkpoints"}


def _help(name: str) -> str:
    """The config field's help text, as a tooltip."""
    text = field_help(name)
    return text[0].upper() + text[1:] + "."


class TrainSubject:
    DESCRIPTION = ("Trains the subject into Stable Diffusion 1.5: a LoRA (models/loras) or a DreamBooth checkpoint "
                   "(models/checkpoints). Connect its file name output to Load Subject LoRA or Load Subject "
                   "Checkpoint. Queueing again with nothing changed reuses the finished file; Cancel keeps a "
                   "checkpoint and the next queue resumes from it. Frees the loaded models first.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("model_file", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The written file's name, relative to models/loras (LoRA) or models/checkpoints (DreamBooth).",
                       "Loss and learning rate against step.",
                       "What was trained, reused or resumed, and where the files are.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (model_choices("checkpoints"), {"tooltip":
                               "The SD1.5 checkpoint to train on (e.g. v1-5-pruned-emaonly.safetensors)."}),
                "dataset": (SUBJECT_DATASET, {"tooltip": "From Prepare Subject Dataset."}),
                "method": (list(METHODS), {"default": TrainConfig.method, "tooltip":
                           "lora: a small file of low-rank updates (fast, little memory); dreambooth: the whole "
                           "UNet is trained and a full checkpoint written (needs ~16 GB of GPU memory)."}),
                "rank": ("INT", {"default": TrainConfig.rank, "min": 1, "max": 1024, "tooltip":
                         "LoRA rank: capacity of the update. The seed's rank 4 did not learn the face; 16 to 64 "
                         "is a better start. Ignored by DreamBooth."}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                          "LoRA alpha; the update is scaled by alpha / rank. 0 = equal to rank (scale 1)."}),
                "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-7, "tooltip":
                                  f"0 = the method's default: {method_defaults_text('lr')} (the seed used 2e-5 "
                                  "with a linear schedule)."}),
                "lr_scheduler": (list(SCHEDULERS), {"default": TrainConfig.lr_scheduler, "tooltip":
                                 _help("lr_scheduler")}),
                "optimizer": (list(OPTIMIZERS), {"default": TrainConfig.optimizer, "tooltip":
                              "adamw: the usual; adamw8bit: less memory (needs bitsandbytes and a GPU); prodigy: "
                              "sets its own step size (use learning_rate 1; needs prodigyopt)."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                          f"Training steps; 0 = the method's default ({method_defaults_text('steps')})."}),
                "batch_size": ("INT", {"default": TrainConfig.batch_size, "min": 1, "max": 64, "tooltip":
                               "Subject images per step (plus as many class images with prior preservation)."}),
                "train_text_encoder": ("BOOLEAN", {"default": TrainConfig.train_text_encoder, "tooltip":
                                       "Also train the text encoder (better identity, more memory, easier to "
                                       "overfit)."}),
                "prior_loss_weight": ("FLOAT", {"default": TrainConfig.prior_loss_weight, "min": 0.0, "max": 10.0,
                                                "step": 0.05, "tooltip":
                                      "Weight of the class-image loss when class images are connected."}),
                "seed": ("INT", {"default": TrainConfig.seed, "min": 0, "max": 2**31 - 1,
                                 "control_after_generate": False,
                         "tooltip": "Seed of the LoRA initialisation, the noise and the timesteps."}),
                "precision": (list(PRECISIONS), {"default": TrainConfig.mixed_precision, "tooltip":
                              _help("mixed_precision")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": TrainConfig.gradient_checkpointing, "tooltip":
                                           "Recompute activations in the backward pass: much less memory, about "
                                           "30% slower. Turn on for DreamBooth on GPUs under 24 GB."}),
                "output_name": ("STRING", {"default": "subject_lora", "tooltip":
                                "File name of the result (no folders), written as <name>.safetensors into "
                                "models/loras or models/checkpoints."}),
                "validation_every": ("INT", {"default": TrainConfig.validation_every, "min": 0, "max": 100000,
                                             "tooltip":
                                     "Render the three test scenes and a purple-hair probe every N steps (0 = never) "
                                     "and score them (face found, identity distance to the dataset's crops); the "
                                     "images and the identity line appear in the live chart and in the run folder."}),
                "overwrite": ("BOOLEAN", {"default": TrainConfig.overwrite, "tooltip":
                              "Replace an existing file of that name made by different settings. Off: such a "
                              "file is never overwritten."}),
            },
            "optional": {
                "class_images": (CLASS_IMAGES, {"tooltip":
                                 "From Class Images: turns on prior preservation. Not connected: no prior "
                                 "preservation."}),
                "pivotal_tokens": ("INT", {"default": TrainConfig.pivotal_tokens, "min": 0, "max": 16, "tooltip":
                                   _help("pivotal_tokens") + " The embedding file goes to models/embeddings."}),
                "save_every": ("INT", {"default": TrainConfig.save_every, "min": 0, "max": 100000, "tooltip":
                               _help("save_every") + " A cancelled or crashed run resumes from the last one."}),
                "background_weight": ("FLOAT", {"default": TrainConfig.background_weight, "min": 0.0, "max": 1.0,
                                                "step": 0.05, "tooltip": _help("background_weight")}),
                "identity_weight": ("FLOAT", {"default": TrainConfig.identity_weight, "min": 0.0, "max": 100.0,
                                              "step": 0.1, "tooltip": _help("identity_weight")}),
                "keep": (list(KEEP), {"default": TrainConfig.keep, "tooltip": _help("keep") + " Needs "
                         "validation_every above 0."}),
                "dora": ("BOOLEAN", {"default": TrainConfig.dora, "tooltip": _help("dora")}),
                "rslora": ("BOOLEAN", {"default": TrainConfig.rslora, "tooltip": _help("rslora")}),
                "loraplus_ratio": ("FLOAT", {"default": TrainConfig.loraplus_ratio, "min": 0.0, "max": 64.0,
                                             "step": 1.0, "tooltip": _help("loraplus_ratio")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, checkpoint="", method="lora", output_name="", **_):
        # The base file's content (size, mtime); the dataset and class images come by link and
        # their nodes track their content. A trained file deleted since must be trained again.
        try:
            output = first_model_folder(MODEL_FOLDER[method]) / f"{check_output_name(output_name)}.safetensors"
            if deleted_since_written(output):
                return float("nan")
            return file_signature(model_file("checkpoints", checkpoint))
        except Exception:  # noqa: BLE001 - reported when the node runs
            return float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, output_name):
        try:
            check_output_name(output_name)
        except Exception as exc:  # noqa: BLE001 - shown by ComfyUI before anything runs
            return str(exc)
        return True

    def train(self, checkpoint, dataset, method, rank, alpha, learning_rate, lr_scheduler, optimizer, steps,
              batch_size, train_text_encoder, prior_loss_weight, seed, precision, gradient_checkpointing, output_name,
              validation_every, overwrite, class_images=None, pivotal_tokens=TrainConfig.pivotal_tokens,
              save_every=TrainConfig.save_every, background_weight=TrainConfig.background_weight,
              identity_weight=TrainConfig.identity_weight, keep=TrainConfig.keep, dora=TrainConfig.dora,
              rslora=TrainConfig.rslora, loraplus_ratio=TrainConfig.loraplus_ratio, unique_id=None):
        import torch

        from ..training.train import train

        stem = check_output_name(output_name)
        base = model_file("checkpoints", checkpoint)
        output = first_model_folder(MODEL_FOLDER[method]) / f"{stem}.safetensors"
        prior = class_images is not None and class_images.get("count", 0) > 0
        cfg = TrainConfig(
            method=method, base=str(base), instance_dir=dataset["folder"], output=str(output),
            token=dataset["token"], class_word=dataset["class_word"], resolution=dataset["resolution"],
            steps=steps, batch_size=batch_size, lr=learning_rate, lr_scheduler=lr_scheduler,  # 0: the method's
            optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
            train_text_encoder=train_text_encoder, rank=rank, alpha=alpha, prior_preservation=prior,
            prior_loss_weight=prior_loss_weight,
            num_class_images=class_images["count"] if prior else TrainConfig.num_class_images,
            class_prompt=class_images["prompt"] if prior else TrainConfig.class_prompt,
            class_dir=class_images["folder"] if prior else None,  # used as it is
            mixed_precision=precision, seed=seed, validation_every=validation_every, save_every=save_every,
            run_dir=str(output_folder("runs", stem)), overwrite=overwrite, pivotal_tokens=pivotal_tokens,
            embedding_dir=str(first_model_folder("embeddings")) if pivotal_tokens else None,
            background_weight=background_weight, identity_weight=identity_weight, keep=keep, dora=dora,
            rslora=rslora, loraplus_ratio=loraplus_ratio)
        watch = TrainingWatch(unique_id)
        started = time.perf_counter()
        with user_errors():
            cfg.validate()
            free_host_models()
            with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
                result = train(cfg, watch)
            empty_cache()  # the trainer's copy of the model is gone
        remember_written(output)
        report = train_report(cfg, result, watch.resumed_from, time.perf_counter() - started, class_images)
        report += "".join(f"\nwarning: {note}" for note in watch.warnings)
        curve = result.loss_curve or Path(cfg.run_path) / "loss.png"
        ui = {"text": [report]}
        if curve.is_file():
            from PIL import Image

            with Image.open(curve) as im:
                curve_image = pils_to_tensor([im.convert("RGB")])
            ref = view_ref(curve)
            if ref:
                ui["images"] = [ref]
        else:
            curve_image = blank_image()
        name = name_in_model_folder(MODEL_FOLDER[method], output)
        return {"ui": ui, "result": (name, curve_image, report)}


class TrainingWatch:
    """The trainer's progress callback: ComfyUI's progress bar (and Cancel), live events for the
    web extension, and which step a resumed run started from."""

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self.bar = HostProgress(node_id)
        self.resumed_from: int | None = None
        self.warnings: list[str] = []

    def __call__(self, event) -> None:
        if event.stage == "warning":
            note = event.info.get("note", "")
            logging.warning("[DreamBooth] %s", note)
            self.warnings.append(note)
            return
        if event.stage == "resume":
            self.resumed_from = event.step
        if event.stage == "train":
            info = event.info
            send_event(PROGRESS_EVENT, {
                "node": self.node_id, "step": event.step, "total": event.total, "loss": info.get("loss"),
                "lr": info.get("lr"), "it_per_s": info.get("it_per_s"), "eta_s": info.get("eta_s"),
                "identity_loss": info.get("identity_loss"), "identity": info.get("identity"),
                "images": [ref for ref in map(view_ref, info.get("images") or []) if ref],
            })
        self.bar(event)  # last: on Cancel it raises, and the trainer saves a checkpoint


def train_report(cfg, result, resumed_from: int | None, seconds: float, class_images: dict | None) -> str:
    method = "LoRA" if cfg.method == "lora" else "DreamBooth"
    lines = []
    if result.reused:
        lines.append(f"Reused {cfg.output}: it was trained with exactly these settings and inputs; nothing to do "
                     "(change a setting, or delete the file, to train again).")
    else:
        what = f"{method} rank {cfg.rank}, alpha {cfg.alpha:g}" if cfg.method == "lora" else method
        lines.append(f"Trained {what}: {result.steps_done} steps in {seconds:.0f} s"
                     + (f", final loss {result.final_loss:.4f}" if result.final_loss is not None else "") + ".")
        if resumed_from:
            lines.append(f"Resumed from step {resumed_from} (the checkpoint of a cancelled or interrupted run).")
        lines.append(f"Wrote {cfg.output}")
    text_encoder = "trained" if cfg.train_text_encoder else "frozen"
    lines.append(f"  base {Path(cfg.base).name}; {cfg.steps} steps, lr {cfg.lr:g} "
                 f"({cfg.lr_scheduler}), batch {cfg.batch_size}, {cfg.resolution} px, text encoder {text_encoder}")
    if cfg.prior_preservation and class_images:
        lines.append(f"  prior preservation: {class_images['count']} class images \"{class_images['prompt']}\", "
                     f"weight {cfg.prior_loss_weight:g}")
    else:
        lines.append("  prior preservation: off (connect Class Images to turn it on)")
    if cfg.pivotal_tokens:
        from ..training.pivotal import freeze_step
        from ..training.train import embedding_output

        lines.append(f"  pivotal tuning: '{cfg.token}' is {cfg.pivotal_tokens} new tokens, trained for the first "
                     f"{freeze_step(cfg)} steps at lr {cfg.pivotal_lr:g}; embedding file {embedding_output(cfg)}")
    if cfg.identity_weight and not result.reused:
        from ..training.identity_loss import identity_summary

        lines.append("  " + identity_summary(cfg.identity_weight, cfg.identity_every, result.losses))
    from ..training.identity import identity_report

    validated = identity_report(cfg, result)
    if validated:
        lines.append("  " + validated)
    lines.append(f"  run folder (checkpoints, loss log, validation images): {cfg.run_path}")
    return "\n".join(lines)
