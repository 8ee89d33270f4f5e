"""`train` and `generate` commands."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from .train_config import METHODS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TARGETS, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


HELP = {
    "method": "lora or dreambooth",
    "base": "'tiny', an SD1.5 .safetensors checkpoint or a diffusers folder",
    "instance_dir": "the subject's photos, or a folder made by `prepare`",
    "output": "the .safetensors file to write (a LoRA or a checkpoint)",
    "steps": "training steps (default: LoRA 800, DreamBooth 400)",
    "lr": "learning rate (default: LoRA 1e-4, DreamBooth 2e-6)",
    "resolution": "training size in pixels (default: the base's own, 512 for SD1.5)",
    "prior_preservation": "train on generated class images too (DreamBooth paper)",
    "class_dir": "folder of class images to use as they are; without images there, they are generated and cached in it (default: class_images/ beside the output)",
    "validation_every": "render the validation prompts every N steps (0: never)",
    "run_dir": "checkpoints, loss log and validation images (default: <output>.run/)",
    "resume": "continue from the last checkpoint of the same run (on by default)",
    "overwrite": "replace an existing output made by another config",
}
CHOICES = {"method": METHODS, "lr_scheduler": SCHEDULERS, "optimizer": OPTIMIZERS, "mixed_precision": PRECISIONS,
           "targets": tuple(TARGETS)}


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA or a DreamBooth checkpoint on one subject")
    for f in fields(TrainConfig):
        if f.name == "validation_prompts":
            p.add_argument("--validation-prompt", dest=f.name, action="append", default=None,
                           help="a validation prompt (repeatable; default: the three scenes)")
            continue
        kind = {"bool": bool, "int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        if kind is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=HELP.get(f.name))
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, choices=CHOICES.get(f.name),
                           help=HELP.get(f.name))
    p.add_argument("--instance-data", dest="instance_dir", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample images (the three scenes by default)")
    g.add_argument("--base", default="tiny", help=HELP["base"])
    g.add_argument("--lora", help="a LoRA file to apply (any format the loader reads)")
    g.add_argument("--strength", type=float, default=1.0, help="LoRA strength (1 = as trained)")
    g.add_argument("--rank", type=int, default=0, help="resize the LoRA to this rank first (0: as trained)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); {token} and {class} are filled in")
    g.add_argument("--negative", default=None, help="negative prompt (default: the seed's)")
    g.add_argument("--scenes", action="store_true", help="render the three scenes (the default without --prompt)")
    g.add_argument("--token", default=None, help="trigger token (default: the LoRA's, else sks)")
    g.add_argument("--class-word", default=None, help="class word (default: the LoRA's, else man)")
    g.add_argument("--out", required=True, help="folder for the images")
    g.add_argument("--overwrite", action="store_true", help="replace images of the same names already in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--sampler", default="ddim", choices=("ddim", "euler", "euler_a", "dpmpp_2m", "pndm"))
    g.set_defaults(func=cmd_generate)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig(**given)


def cmd_train(args: argparse.Namespace) -> int:
    from .cli import TqdmProgress
    from .train import train

    cfg = config_from_args(args).validate()
    bar = TqdmProgress()
    result = train(cfg, progress=bar)
    bar.close()
    if result.output is None:  # another rank of `accelerate launch` wrote it
        return 0
    if result.reused:
        print(f"{result.output} already holds this exact training run; nothing to do (use --overwrite to retrain).")
    else:
        print(f"wrote {result.output} after {result.steps_done} steps, final loss {result.final_loss:.4f}")
        print(f"loss log and curve: {result.run_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .cli import TqdmProgress
    from .generate import GenerateRequest, run_generate

    request = GenerateRequest(base=args.base, lora=args.lora, strength=args.strength, rank=args.rank,
                              prompts=args.prompt, negative=args.negative, token=args.token,
                              class_word=args.class_word, out=Path(args.out), seed=args.seed, steps=args.steps,
                              guidance=args.cfg, resolution=args.resolution, sampler=args.sampler,
                              overwrite=args.overwrite)
    bar = TqdmProgress()
    written = run_generate(request, progress=bar)
    bar.close()
    for path in written:
        print(path)
    return 0
