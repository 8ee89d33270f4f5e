"""`python -m training prepare` and `python -m training class-images`: thin shells over
`dataset.prepare_dataset` and `class_images.ensure_class_images`. Bad input raises
UserError, which `cli.main` prints as one line."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .progress import TqdmProgress


def add_commands(sub) -> None:
    """Add `prepare` and `class-images` to the `python -m training` subparsers."""
    from ..data import ClassImageConfig
    from ..data import CROP_MODES, PrepareConfig

    d = PrepareConfig()
    p = sub.add_parser("prepare", help="crop and caption a folder of photos of the subject, with a report")
    p.add_argument("dir", help="folder of photos (jpg, jpeg, png, webp, bmp, tif); name.txt beside a photo is its caption")
    p.add_argument("--out", "--output", required=True, help="output folder: crops, captions, dataset.json, contact_sheet.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names in an --out folder that prepare did not make")
    p.add_argument("--token", default=d.token, help=f"the rare token that names the subject (default {d.token})")
    p.add_argument("--class-word", default=d.class_word, help=f"what the subject is: man, woman, dog... (default {d.class_word})")
    p.add_argument("--resolution", default=str(d.resolution), help=f"square side in pixels, a multiple of 8 (default {d.resolution})")
    p.add_argument("--crop", default=d.crop, help=f"{' | '.join(CROP_MODES)} (default {d.crop})")
    p.add_argument("--flip", action="store_true", help="also write a mirrored copy of every crop")
    p.add_argument("--repeats", default=str(d.repeats), help="times each image is seen per epoch (default 1)")
    p.add_argument("--caption-template", default=d.caption_template,
                   help=f"caption for photos without a .txt (default '{d.caption_template}')")
    p.set_defaults(func=cmd_prepare)

    c = ClassImageConfig()
    q = sub.add_parser("class-images", help="generate (or top up) the class images for prior preservation")
    q.add_argument("--base", required=True, help="'tiny', a .safetensors checkpoint or a diffusers folder")
    q.add_argument("--class-word", default=c.class_word, help=f"(default {c.class_word})")
    q.add_argument("--num", default=str(c.num), help=f"how many class images the folder should hold (default {c.num})")
    q.add_argument("--out", "--output", required=True, help="cache folder; images go to a subfolder keyed by model and settings")
    q.add_argument("--prompt", default=c.prompt, help=f"class prompt (default '{c.prompt}')")
    q.add_argument("--negative", default=c.negative, help="negative prompt (default none)")
    q.add_argument("--steps", default=str(c.steps), help=f"sampling steps (default {c.steps})")
    q.add_argument("--guidance", default=str(c.guidance), help=f"classifier-free guidance (default {c.guidance})")
    q.add_argument("--sampler", default=c.sampler, help=f"ddim | euler | euler_a | dpmpp_2m | pndm (default {c.sampler})")
    q.add_argument("--seed", default=str(c.seed), help=f"seed of image 0; image i uses seed + i (default {c.seed})")
    q.add_argument("--resolution", default=None, help="image side (default: the model's own, 512 for SD1.5)")
    q.add_argument("--batch-size", default=str(c.batch_size), help=f"images per sampling call (default {c.batch_size})")
    q.set_defaults(func=cmd_class_images)


def _number(value: str | None, flag: str, kind=int):
    """Parse a numeric flag here, so a bad value is one line naming the flag (not argparse's usage)."""
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{flag} must be {what}, got '{value}'.") from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data import PrepareConfig, prepare_dataset

    cfg = PrepareConfig(token=args.token, class_word=args.class_word,
                        resolution=_number(args.resolution, "--resolution"), crop=args.crop, flip=args.flip,
                        repeats=_number(args.repeats, "--repeats"), caption_template=args.caption_template)
    bar = TqdmProgress()
    try:
        report = prepare_dataset(Path(args.dir), Path(args.out), cfg, progress=bar, overwrite=args.overwrite)
    finally:
        bar.close()
    print(report.text())
    return 0


def cmd_class_images(args: argparse.Namespace) -> int:
    from ..data import ClassImageConfig, ensure_class_images
    from ..models import load_model
    from ..sampling import SAMPLERS, make_generator

    if args.sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{args.sampler}'.")
    cfg = ClassImageConfig(class_word=args.class_word, prompt=args.prompt, negative=args.negative,
                           num=_number(args.num, "--num"), steps=_number(args.steps, "--steps"),
                           guidance=_number(args.guidance, "--guidance", float), sampler=args.sampler,
                           seed=_number(args.seed, "--seed"), batch_size=_number(args.batch_size, "--batch-size"),
                           resolution=_number(args.resolution, "--resolution") or 512)
    cfg.validate()  # before the (slow) model load
    model = load_model(args.base)
    if args.resolution is None:
        cfg.resolution = model.resolution
    bar = TqdmProgress()
    try:
        report = ensure_class_images(make_generator(model, cfg.sampler), model.sha256, Path(args.out), cfg, progress=bar)
    finally:
        bar.close()
    print(report.text())
    return 0
