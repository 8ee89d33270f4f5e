"""Step time of a pivotal-tuning LoRA run against a plain LoRA run: same data, same settings, one process.

While the new tokens train, the instance captions go through the text encoder every step (its
backward too, down to the embedding); after the freeze step they are cached again, as in a plain
run. Goals (issue 13): at most 1.3x the plain step time while the embedding trains, 1.0x after.

    python bench/bench_pivotal.py                        # tiny, 64 px, CPU
    python bench/bench_pivotal.py --base sd15 --resolution 512   # full-size random SD1.5 layout (GPU)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def step_times(cfg, model) -> list[float]:
    """Seconds of each training step (between consecutive progress events of the loop)."""
    from training.train import train

    marks: list[float] = []

    def progress(event) -> None:
        if event.stage == "train":
            marks.append(time.perf_counter())

    train(cfg, progress=progress, model=model)
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", help="tiny, or sd15 for the full-size random SD1.5 layout")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (the embedding trains the first half)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating (medians shown)")
    args = parser.parse_args()

    import torch

    from training.data import PrepareConfig, prepare_dataset
    from training.models import build_random, build_tiny
    from training.pivotal import freeze_step
    from training.train_config import TrainConfig

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))  # stable ratios on shared cores
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare_dataset(ROOT / "training" / "sample_data" / "subject", Path(tmp) / "dataset",
                                  PrepareConfig(resolution=args.resolution)).folder
        kw = dict(instance_dir=str(dataset), steps=args.steps, rank=4, resolution=args.resolution, save_every=0,
                  overwrite=True, resume=False)
        runs: dict[str, list[list[float]]] = {"plain": [], "pivotal": []}
        for repeat in range(args.repeats):
            for kind in runs:
                model = build_tiny() if args.base == "tiny" else build_random(args.base, seed=0)
                extra = {"pivotal_tokens": 2} if kind == "pivotal" else {}
                cfg = TrainConfig(output=str(Path(tmp) / f"{kind}{repeat}.safetensors"), **kw, **extra)
                runs[kind].append(step_times(cfg, model.to(device)))
        cut = freeze_step(TrainConfig(pivotal_tokens=2, **kw)) - 1  # times[i] is step i+2; the freeze is after `cut`+1

        def median(kind: str, part: slice) -> float:
            return statistics.median(t for times in runs[kind] for t in times[part])

        skip = 2  # the first steps carry one-off costs (allocator, kernels)
        training, frozen = slice(skip, cut - 1), slice(cut + 1, None)
        plain_a, plain_b = median("plain", training), median("plain", frozen)
        piv_a, piv_b = median("pivotal", training), median("pivotal", frozen)
        print(f"{args.base} at {args.resolution} px on {device}, {args.steps} steps (embedding trains steps 1-"
              f"{cut + 1}), LoRA rank 4, median of {args.repeats} runs each")
        print(f"{'':28}{'plain (ms)':>12}{'pivotal (ms)':>14}{'ratio':>8}")
        print(f"{'while the embedding trains':28}{plain_a * 1e3:12.1f}{piv_a * 1e3:14.1f}{piv_a / plain_a:7.2f}x")
        print(f"{'after the freeze':28}{plain_b * 1e3:12.1f}{piv_b * 1e3:14.1f}{piv_b / plain_b:7.2f}x")


if __name__ == "__main__":
    main()
