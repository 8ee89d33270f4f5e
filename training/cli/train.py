"""`train` and `generate` commands. `train`'s options are TrainConfig's fields: flag, help and default
come from the field, so `--help` and behaviour cannot drift apart."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from pathlib import Path

from ..progress import Cancelled
from ..prompts import PROBE_PROMPT
from ..train_config import (KEEP, METHODS, OPTIMIZERS, PIVOTAL_TOKENS, PRECISIONS, SCHEDULERS, TARGETS,
                            TrainConfig)
from .progress import TqdmProgress

BASE_HELP = "the model: an SD1.5 .safetensors checkpoint, a diffusers folder, or 'tiny' (random weights, for tests)"
REQUIRED = ("base", "instance_dir", "output")
# a field's flag where it is not --<field-name>: one output flag name across commands, --output accepted too
FLAGS = {"output": ("--out", "--output"), "validation_prompts": ("--validation-prompt",)}
HIDDEN_ALIASES = {"instance_dir": "--instance-data"}  # diffusers' name
CHOICES = {"method": METHODS, "lr_scheduler": SCHEDULERS, "optimizer": OPTIMIZERS, "mixed_precision": PRECISIONS,
           "targets": tuple(TARGETS), "keep": KEEP}
TYPES = {"bool": bool, "int": int, "float": float, "int | None": int, "float | None": float}
# what `generate` does when an option is left out (GenerateRequest's defaults; tests/test_cli.py checks they agree)
GENERATE_DEFAULTS = {"strength": 1.0, "rank": 0, "seed": 0, "steps": 25, "guidance": 7.5, "sampler": "ddim"}
SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm")  # training.sampling.SAMPLERS, without importing torch


def flag(field_name: str) -> str:
    """How the CLI writes a config field in help and messages: `instance_dir` -> `--instance-dir`."""
    return FLAGS.get(field_name, ("--" + field_name.replace("_", "-"),))[0]


def field_help(f: Field) -> str:
    """The field's help with its default; a field whose default is unset says in its help what unset means."""
    # the CLI keeps a 0 the user typed (and refuses it): only leaving a flag out means "the default"
    text = f.metadata.get("help", "").replace("0 or unset", "unset")
    if f.name == "validation_prompts":
        return ("a validation prompt (repeatable); {token} and {class} are filled in (default: the three scenes "
                "and the off-identity probe '" + PROBE_PROMPT + "')")
    if f.name in REQUIRED:
        return text
    default = f.default if f.default is not MISSING else None
    if isinstance(default, bool):
        return f"{text} (default: {'on' if default else 'off'})"
    if default is None or default == "":
        return text if default is None else f"{text} (default: none)"
    return f"{text} (default: {default})"


def groups(p: argparse.ArgumentParser) -> tuple:
    """"required" listed before "options" in --help (the parser is made with add_help=False)."""
    required, options = p.add_argument_group("required"), p.add_argument_group("options")
    options.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return required, options


def add_train_options(p: argparse.ArgumentParser) -> None:
    required, options = groups(p)
    for f in fields(TrainConfig):
        group = required if f.name in REQUIRED else options
        names = FLAGS.get(f.name, (flag(f.name),))
        common = {"dest": f.name, "help": field_help(f).replace("%", "%%")}
        if f.name == "validation_prompts":
            group.add_argument(*names, action="append", default=None, metavar="PROMPT", **common)
        elif TYPES.get(str(f.type)) is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, **common)
        else:
            group.add_argument(*names, type=TYPES.get(str(f.type), str), default=None, choices=CHOICES.get(f.name),
                               required=f.name in REQUIRED, metavar=_metavar(f), **common)
    for name, alias in HIDDEN_ALIASES.items():
        p.add_argument(alias, dest=name, help=argparse.SUPPRESS)
    options.add_argument("--pivotal", dest="pivotal_tokens", action="store_const", const=PIVOTAL_TOKENS,
                         help=f"pivotal tuning with {PIVOTAL_TOKENS} new tokens: the same as --pivotal-tokens "
                              f"{PIVOTAL_TOKENS} (default: off)")


def _metavar(f: Field) -> str | None:
    if f.name in CHOICES:
        return None  # argparse lists the choices
    return {"output": "FILE", "base": "BASE", "instance_dir": "DIR", "class_dir": "DIR", "run_dir": "DIR"}.get(
        f.name, TYPES.get(str(f.type), str).__name__.upper().replace("STR", "TEXT"))


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA or a DreamBooth checkpoint on one subject", add_help=False,
                       description="Train a LoRA or a DreamBooth checkpoint on one subject. Ctrl-C stops at the next "
                                   "step with a checkpoint; the same command resumes from it.")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    d = GENERATE_DEFAULTS
    command = sub.add_parser("generate", help="sample images (the three scenes by default)", add_help=False,
                       description="Sample images, the three scenes by default; writes <scene>_<seed>.png and "
                                   "prompts.json (what `evaluate` reads) into --out.")
    req, g = groups(command)
    req.add_argument("--base", required=True, metavar="BASE", help=BASE_HELP)
    req.add_argument("--out", "--output", dest="out", required=True, metavar="DIR", help="folder for the images")
    g.add_argument("--lora", metavar="FILE", help="a LoRA file to apply (any format the loader reads) (default: none)")
    g.add_argument("--strength", type=float, default=None,
                   help=f"LoRA strength: 1 as trained, 0 off (default: {d['strength']:g})")
    g.add_argument("--rank", type=int, default=None,
                   help=f"resize the LoRA to this rank first; 0: as trained (default: {d['rank']})")
    g.add_argument("--prompt", action="append", metavar="PROMPT",
                   help="a prompt (repeatable); {token} and {class} are filled in (default: the three scenes)")
    g.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (default: the seed's)")
    g.add_argument("--scenes", action="store_true", help="render the three scenes (what happens without --prompt)")
    g.add_argument("--token", default=None, help="trigger token (default: the LoRA's, else sks)")
    g.add_argument("--class-word", default=None, help="class word (default: the LoRA's, else man)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace images of the same names already in --out (default: off)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"seed of the starting noise; each image of one call uses it (default: {d['seed']})")
    g.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: {d['steps']})")
    g.add_argument("--cfg", dest="guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default: {d['guidance']:g})")
    g.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                   help="image side in pixels, a multiple of 8 (default: the base's own, 512 for SD1.5)")
    g.add_argument("--sampler", default=None, choices=SAMPLERS, help=f"the sampler (default: {d['sampler']})")
    command.set_defaults(func=cmd_generate)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of what the user typed; a 0 they typed stays 0 (the config would read it as
    "the method's default", which a command line must not do silently), so validation refuses it."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**given)
    for name, value in given.items():
        if value == 0 and not isinstance(value, bool) and getattr(cfg, name) != value:
            setattr(cfg, name, value)
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train

    cfg = config_from_args(args)
    bar = TqdmProgress()
    try:
        result = train(cfg, progress=bar)
    except Cancelled:
        raise Cancelled(stopped_message(cfg)) from None
    finally:
        bar.close()
    if result.output is None:  # another rank of `accelerate launch` wrote it
        return 0
    if result.reused:
        print(f"{result.output} already holds this exact training run; nothing to do (pass --overwrite to retrain).")
    else:
        print(f"wrote {result.output} after {result.steps_done} steps, final loss {result.final_loss:.4f}")
        if cfg.identity_weight:
            from ..identity_loss import identity_summary

            print(identity_summary(cfg.identity_weight, cfg.identity_every, result.losses))
        from ..identity import identity_report

        validated = identity_report(cfg, result)
        if validated:
            print(validated)
        print(f"loss log and curve: {result.run_dir}")
    return 0


def stopped_message(cfg: TrainConfig) -> str:
    """Where a stopped run can go on from: the checkpoint the loop kept at the step it stopped."""
    from ..checkpoint import list_checkpoints

    kept = list_checkpoints(cfg.run_path)
    if not kept:
        return "stopped before the first step; nothing to keep; run the same command again to start"
    step = int(kept[-1].stem.rsplit("_", 1)[-1])
    return f"stopped at step {step}; kept checkpoint {kept[-1]}; run the same command again to resume"


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generate import GenerateRequest, run_generate

    chosen = {k: getattr(args, k) for k in GENERATE_DEFAULTS if getattr(args, k) is not None}
    request = GenerateRequest(base=args.base, lora=args.lora, prompts=args.prompt, negative=args.negative,
                              token=args.token, class_word=args.class_word, out=Path(args.out),
                              resolution=args.resolution, overwrite=args.overwrite, **chosen)
    bar = TqdmProgress()
    try:
        written = run_generate(request, progress=bar)
    finally:
        bar.close()
    for path in written:
        print(path)
    return 0
