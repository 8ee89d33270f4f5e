"""`python -m training <command>`: a thin shell over the library.

Every command prints one line and exits 1 on bad input (a UserError), and renders the
engine's progress callbacks with tqdm.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import UserError
from .progress import Progress


class TqdmProgress:
    """Renders `Progress` events as one tqdm bar per stage, on stderr."""

    open_renderers: list["TqdmProgress"] = []  # closed by `main` before it prints an error

    def __init__(self) -> None:
        self._bar = None
        self._stage = None
        TqdmProgress.open_renderers.append(self)

    def __call__(self, event: Progress) -> None:
        from tqdm import tqdm

        if event.stage == "warning":
            self.close()
            print(f"warning: {event.info.get('note', '')}", file=sys.stderr)
            return
        if event.stage != self._stage or self._bar is None:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr, dynamic_ncols=True)
        self._bar.n = event.step
        shown = {k: v for k, v in event.info.items() if isinstance(v, (int, float, str)) and k in ("loss", "lr", "note")}
        if shown:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False)
        self._bar.refresh()
        if event.step >= event.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_info(args: argparse.Namespace) -> int:
    from .models import describe

    print(describe(args.base))
    return 0


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="say what a base model is (family, dtype, parameters, sha256)")
    p.add_argument("base", help="'tiny', a .safetensors checkpoint or a diffusers folder")
    p.set_defaults(func=cmd_info)


def _optional(module: str, adder: str) -> Callable | None:
    """Command groups live beside their modules; import them by name."""
    import importlib

    try:
        return getattr(importlib.import_module(f".{module}", __package__), adder)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(module):
            return None
        raise


COMMAND_GROUPS = [
    ("cli_dataset", "add_dataset_commands"),  # prepare, class-images
    ("cli_train", "add_train_commands"),  # train, generate
    ("cli_lora", "add_lora_commands"),  # lora info | resize | extract | convert
    ("cli_evaluate", "add_evaluate_commands"),  # evaluate, demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Personalize Stable Diffusion 1.5 on one subject (DreamBooth or LoRA), offline.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    add_info_command(sub)
    for module, adder in COMMAND_GROUPS:
        add = _optional(module, adder)
        if add is not None:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever a library defaults to
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        _close_progress()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress()
        print("error: interrupted; run the same command again to resume where it stopped.", file=sys.stderr)
        return 130


def _close_progress() -> None:
    """An open bar would be drawn again after the error line; close them so the error is the last line."""
    for renderer in TqdmProgress.open_renderers:
        renderer.close()
