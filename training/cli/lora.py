"""`python -m training lora info | resize | extract | convert`: thin shells over `training.lora`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .progress import TqdmProgress

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def _check_out(source: str | None, out: str, overwrite: bool = False) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors; LoRAs are only written as safetensors.")
    if source is not None and Path(source).resolve() == path.resolve():
        raise UserError(f"--out {out} is the input file; give a new file name so the original stays intact.")
    if path.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; give a new file name, or add --overwrite to replace it.")
    return path


def cmd_info(args: argparse.Namespace) -> int:
    from ..lora import lora_info  # torch loads here, not when the CLI starts

    print(lora_info(args.file))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from ..lora import format_report, read_lora, resize, write_kohya  # torch loads here, not when the CLI starts

    out = _check_out(args.file, args.out, args.overwrite)
    lora = read_lora(args.file)
    bar = TqdmProgress()
    small, report = resize(lora, rank=args.rank, keep_energy=args.keep_energy, progress=bar)
    bar.close()
    target = f"rank {args.rank}" if args.keep_energy is None else f"keep {args.keep_energy} of the Frobenius norm"
    meta = {"dreambooth.resized_from": Path(args.file).name, "dreambooth.resize_target": target}
    write_kohya(small, out, dtype=_dtype(args.dtype), metadata=meta)
    print(format_report(report))
    print(f"wrote {out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ..lora import extract, format_report, write_kohya  # torch loads here, not when the CLI starts
    from ..models import file_sha256

    out = _check_out(None, args.out, args.overwrite)
    bar = TqdmProgress()
    lora, report = extract(args.base, args.tuned, rank=args.rank, keep_energy=args.keep_energy,
                           text_encoder=args.text_encoder, min_diff=args.min_diff, progress=bar)
    bar.close()
    meta = {}
    if Path(args.base).is_file():
        meta = {"ss_sd_model_name": Path(args.base).name, "ss_new_sd_model_hash": file_sha256(args.base),
                "dreambooth.base_sha256": file_sha256(args.base)}
    write_kohya(lora, out, dtype=_dtype(args.dtype), metadata=meta)
    for note in lora.notes:
        print(f"note: {note}")
    print(format_report(report))
    print(f"wrote {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..embedding import embedding_path
    from ..lora import read_lora, write_kohya  # torch loads here, not when the CLI starts

    out = _check_out(args.file, args.out, args.overwrite)
    lora = read_lora(args.file)
    dropped: list[str] = []
    if args.drop_embedding:  # diffusers' load_lora_weights refuses a file with bundle_emb keys
        dropped, lora = list(lora.embeddings), lora.without_embeddings()
    write_kohya(lora, out, dtype=_dtype(args.dtype))
    print(f"{args.file}: {lora.source_format}, {len(lora.layers)} layers -> kohya")
    if args.drop_embedding and not dropped:
        print("note: --drop-embedding: the file carries no embedding; nothing dropped")
    standalone = embedding_path(args.file)
    for trigger in dropped:
        where = "" if standalone.is_file() else f" ({standalone.name} is not beside {Path(args.file).name})"
        print(f"dropped embedding {trigger}: load {standalone.name} with load_textual_inversion(..., "
              f"token={trigger!r}){where}")
    for note in lora.notes:
        print(f"note: {note}")
    for key, reason in lora.unmapped.items():
        print(f"not converted: {key} ({reason})")
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    """Register `lora info|resize|extract|convert` on the top-level subparsers."""
    lora = sub.add_parser("lora", help="inspect, resize, extract or convert LoRA files")
    commands = lora.add_subparsers(dest="lora_command", metavar="lora_command", required=True)

    p = commands.add_parser("info", help="format, base, modules, ranks, alpha, metadata, keys that do not map")
    p.add_argument("file", help="a LoRA .safetensors (kohya, diffusers, peft or ComfyUI format)")
    p.set_defaults(func=cmd_info)

    p = commands.add_parser("resize", help="lower the rank (SVD on the factors)")
    p.add_argument("file", help="the LoRA to resize (any format `lora info` reads)")
    _add_targets(p)
    p.add_argument("--out", "--output", required=True, help="the new .safetensors file (kohya format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_resize)

    p = commands.add_parser("extract", help="a LoRA from a DreamBooth model and its base")
    p.add_argument("--base", required=True, help="the base: 'tiny', a .safetensors checkpoint or a diffusers folder")
    p.add_argument("--tuned", required=True, help="the fine-tuned model, same forms as --base")
    _add_targets(p)
    p.add_argument("--text-encoder", action="store_true", help="also extract the text encoder's layers")
    p.add_argument("--min-diff", type=float, default=0.0,
                   help="leave out layers whose largest change is at most this (default: 0)")
    p.add_argument("--out", "--output", required=True, help="the LoRA .safetensors to write (kohya format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_extract)

    p = commands.add_parser("convert", help="any readable LoRA format -> kohya")
    p.add_argument("file", help="the LoRA to convert (kohya, diffusers, peft or ComfyUI format)")
    p.add_argument("--out", "--output", required=True, help="the kohya .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16", help="precision of the written weights "
                                                                            "(default: fp16)")
    p.add_argument("--drop-embedding", action="store_true",
                   help="leave out the bundled embedding (bundle_emb keys), for diffusers' load_lora_weights, which "
                        "refuses bundle_emb keys; load the embedding with "
                        "load_textual_inversion(<stem>_embedding.safetensors) (default: off, A1111/Forge read "
                        "the bundled one)")
    p.set_defaults(func=cmd_convert)


def _add_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, help="the rank to keep (an upper bound when --keep-energy is given too)")
    p.add_argument("--keep-energy", type=float, help="keep this fraction (0-1] of each layer's Frobenius norm, like kohya's sv_fro")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16",
                   help="precision of the written weights (default: fp16)")
