"""`evaluate` and `demo` commands."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..eval import DEFAULT_FACE_DETECTOR, FACE_DETECTORS
from .progress import TqdmProgress


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="identity and prompt-fidelity scores of generated images")
    p.add_argument("--images", required=True,
                   help="folder of generated images: its prompts.json (written by `generate` and `demo`) gives "
                        "method, rank, scene and prompt; else names like lora_r4_forest_0.png give the first three")
    p.add_argument("--references", required=True, help="folder of the subject's own photos")
    p.add_argument("--out", "--output", default=None, help="folder for report.json, table.txt, grid.png, chart.png "
                                               "(default: <images>/evaluation)")
    p.add_argument("--prompts", default=None,
                   help="JSON file: image name -> {prompt, scene, method, rank} (default: <images>/prompts.json)")
    p.add_argument("--clip", default=None, help="a local CLIP folder or clip_vision .safetensors (CLIP-I, CLIP-T)")
    p.add_argument("--dino", default=None, help="a local facebook/dino-vits16 folder (DINO score)")
    p.add_argument("--token", default="sks", help="the trigger token, left out of the prompt for CLIP-T")
    p.add_argument("--face-detector", default=DEFAULT_FACE_DETECTOR, choices=FACE_DETECTORS,
                   help="dlib detector: hog (fast), cnn (finds more faces) or hog+cnn (cnn where hog finds none); "
                        "default %(default)s")
    p.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="the three-scene test end to end (on tiny: about a minute, pictures are noise)")
    d.add_argument("--base", default="tiny",
                   help="'tiny' (random weights), an SD1.5 .safetensors or a diffusers folder")
    d.add_argument("--out", "--output", default="demo_output", help="output folder; a re-run into it reuses finished work")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps per method (default: tiny 200; a real base the trainer's: "
                        "LoRA 800, DreamBooth 400)")
    d.add_argument("--quick", action="store_true", help="LoRA only, 20 steps, 4 class images: check the pipeline")
    d.add_argument("--photos", default=None, help="the subject's photos (default: the bundled sample, 6 photos)")
    d.add_argument("--clip", default=None, help="a local CLIP folder for CLIP-I / CLIP-T scores")
    d.add_argument("--dino", default=None, help="a local DINO ViT folder for the DINO score")
    d.set_defaults(func=cmd_demo)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..eval.report import OUTPUT_NAMES  # torch loads here, not when the CLI starts
    from ..eval.run import run_evaluate
    out = Path(args.out) if args.out else Path(args.images) / "evaluation"
    bar = TqdmProgress()
    try:  # an open bar would be redrawn after the error line
        report = run_evaluate(args.images, args.references, out, prompts_file=args.prompts, clip=args.clip,
                              dino=args.dino, token=args.token, face_detector=args.face_detector, progress=bar)
    finally:
        bar.close()
    print(report.table().rstrip())
    written = [name for name in OUTPUT_NAMES if (out / name).is_file()]
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import NOISE_NOTE, DemoConfig, run_demo

    given = {k: v for k, v in (("steps", args.steps), ("photos", args.photos)) if v is not None}
    config = (DemoConfig.quick if args.quick else DemoConfig)(base=args.base, clip=args.clip, dino=args.dino, **given)
    if args.base == "tiny":
        print(f"note: {NOISE_NOTE}", flush=True)
    bar = TqdmProgress()
    try:
        result = run_demo(args.out, config=config, progress=bar)
    finally:
        bar.close()
    print(result.evaluation.table().rstrip())
    for run in result.runs:
        print(f"model: {run.path}" + (" (reused)" if run.reused else ""))
    if result.base_is_noise:
        print(f"note: {NOISE_NOTE}")
    print(f"report: {result.report}  ({result.total_seconds:.0f} s)")
    print(f"output folder: {result.out_dir.resolve()}")
    return 0
