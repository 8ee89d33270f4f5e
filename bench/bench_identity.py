"""What the identity loss costs: LoRA step time and peak memory with the term every step (K=1), every
fourth step (K=4) and off, on the full-size SD1.5 layout (random weights) at 256 px on the CPU, each run
in a fresh process (peak = that process's VmHWM). With K=1 the term is computed on the steps whose
timestep is at most 600 of 1000 (about 60%); the table splits step time by whether it was.

    python bench/bench_identity.py                  # 5 steps per run
    python bench/bench_identity.py --checkpointing  # + K=1 with gradient checkpointing (UNet and VAE decoder)
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

from bench.bench_train import THREADS, random_sd15_file, run_in_child  # noqa: E402


def one_run(base: str, dataset: str, out: str, steps: int, resolution: int, weight: float, every: int,
            checkpointing: bool) -> dict:
    """Train `steps` LoRA steps; each step's seconds and whether it computed the term."""
    from training.train import train
    from training.train_config import TrainConfig

    marks: list[float] = []

    def progress(event) -> None:
        if event.stage == "train":
            marks.append(time.perf_counter())

    cfg = TrainConfig(base=base, instance_dir=dataset, output=out, steps=steps, rank=4, resolution=resolution,
                      save_every=0, overwrite=True, resume=False, identity_weight=weight, identity_every=every,
                      gradient_checkpointing=checkpointing)
    started = time.perf_counter()
    result = train(cfg, progress=progress)
    # step 1 carries one-off costs (first autograd graph, allocator growth): left out of the times
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    computed = ["identity_loss" in row for row in result.losses[1:]]
    return {"step_s": seconds, "computed": computed, "run_s": time.perf_counter() - started}


def measure(base: Path, dataset: Path, work: Path, steps: int, resolution: int, weight: float, every: int,
            checkpointing: bool) -> dict:
    out = work / f"w{weight}_k{every}_c{int(checkpointing)}.safetensors"
    return run_in_child("bench_identity", f"one_run({str(base)!r}, {str(dataset)!r}, {str(out)!r}, {steps}, "
                                          f"{resolution}, {weight}, {every}, {checkpointing})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="LoRA steps per run (the first is not timed)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true",
                        help="also K=1 with gradient checkpointing (UNet and VAE decoder)")
    args = parser.parse_args()
    from training.data import PrepareConfig, prepare_dataset

    runs = [("off", 0.0, 1, False), ("K=1", 1.0, 1, False), ("K=4", 1.0, 4, False)]
    if args.checkpointing:
        runs += [("K=1, checkpointing", 1.0, 1, True)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = work / "dataset"
        prepare_dataset(ROOT / "training" / "sample_data" / "subject", dataset,
                        PrepareConfig(resolution=args.resolution))
        base = random_sd15_file(work / "sd15.safetensors")
        print(f"LoRA rank 4 on the full-size SD1.5 layout (random weights, fp16 file), {args.resolution} px, CPU, "
              f"{THREADS} thread(s), {args.steps} steps (the first not timed)")
        print(f"{'':22}{'s/step':>9}{'with term':>11}{'without':>9}{'computed':>10}{'peak RSS MB':>13}")
        plain = None
        for name, weight, every, checkpointing in runs:
            r = measure(base, dataset, work, args.steps, args.resolution, weight, every, checkpointing)
            with_term = [s for s, c in zip(r["step_s"], r["computed"]) if c]
            without = [s for s, c in zip(r["step_s"], r["computed"]) if not c]
            mean = statistics.mean(r["step_s"])
            plain = plain or mean
            print(f"{name:22}{mean:9.2f}{_mean(with_term):>11}{_mean(without):>9}"
                  f"{sum(r['computed']):>6}/{len(r['computed']):<3}{r['peak_rss_mb']:13.0f}"
                  f"   ({mean / plain:.2f}x the step time without the term)", flush=True)


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" if values else "-"


if __name__ == "__main__":
    main()
