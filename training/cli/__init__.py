"""`python -m training <command>`: a thin shell over the library.

Every command prints one line and exits 1 on bad input (a UserError), and renders the
engine's progress callbacks with tqdm. The command modules import the engine (torch,
diffusers) inside their `cmd_*` functions, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import UserError, inputs_named_by
from ..progress import Cancelled
from . import dataset, evaluate, lora, train
from .progress import close_all, stop_on_signals, stop_requested


def cmd_info(args: argparse.Namespace) -> int:
    from ..models import describe

    print(describe(args.base))
    return 0


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="say what a base model is (family, dtype, parameters, sha256)")
    p.add_argument("base", help="'tiny', a .safetensors checkpoint or a diffusers folder")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Personalize Stable Diffusion 1.5 on one subject (DreamBooth or LoRA), offline.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    add_info_command(sub)
    dataset.add_commands(sub)  # prepare, class-images
    train.add_commands(sub)  # train, generate
    lora.add_commands(sub)  # lora info | resize | extract | convert
    evaluate.add_commands(sub)  # evaluate, demo
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever a library defaults to
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with stop_on_signals(), inputs_named_by(train.flag):  # messages name inputs by their flags
        try:
            return int(args.func(args) or 0)
        except UserError as exc:
            close_all()
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Cancelled as exc:  # Ctrl-C or SIGTERM, at a progress event: the work stopped cleanly
            close_all()
            print(str(exc) or "stopped; run the same command again to finish", file=sys.stderr)
            return 128 + (stop_requested() or signal.SIGINT)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside any progress event
            close_all()
            print("error: quit at once; run the same command again (a training run resumes from its last "
                  "checkpoint).", file=sys.stderr)
            return 128 + signal.SIGINT
