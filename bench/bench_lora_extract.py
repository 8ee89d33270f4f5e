"""LoRA extraction: our sketched SVD against the full SVD of every difference, in the same run.

The base is the full SD1.5 layout with random weights (`build_random("sd15")`, fp16 single
file); the tuned copy adds to every extracted layer (the UNet's transformer blocks, 160+
layers) a DreamBooth-like change: a rank-16 signal with a decaying spectrum plus full-rank
noise, 2% of the weight's norm. Then, at each rank, in its own fresh process:

- ours: `training.lora.extract` (randomized range finder with power iterations, layers of one
  shape batched; its products in bfloat16 where the CPU has AMX, else float32: `--products`);
- reference: `extract(..., exact=True)`: `torch.linalg.svd` of each full m x n difference, what
  kohya's extract_lora_from_models.py and our previous version do.

Prints seconds and peak-memory increase of each, their ratios, and the largest per-layer ratio
of our Frobenius error to the optimal one (from the kept fractions: both results are projections
of the difference, so error^2 = |diff|^2 (1 - kept^2)).

    python bench/bench_lora_extract.py [--ranks 4 16 64]

Goals (issue 16): >= 10x faster, peak memory no higher, error within 1% of the optimum.
Both run on BENCH_THREADS torch threads (default 1: two OpenMP threads on two busy cores can
run 10x slower, and the full SVD suffers most).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_lora_resize import PeakMemory  # noqa: E402
from training.lora import extract, extraction_targets  # noqa: E402
from training.lora.extract import fast_product_dtype  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def make_pair(folder: Path) -> tuple[Path, Path]:
    """base.safetensors and tuned.safetensors (fp16 single files) with a known change in every target."""
    from training.models import build_random, save_single_file

    model = build_random("sd15", seed=0)
    base = save_single_file(model, folder / "base.safetensors", dtype=torch.float16)
    generator = torch.Generator().manual_seed(1)
    for name in extraction_targets("sd15"):
        weight = model.unet.get_submodule(name.split(".", 1)[1]).weight
        m, n = weight.shape[0], weight[0].numel()
        decay = torch.exp(-torch.arange(16.0) / 5)
        signal = (torch.randn(m, 16, generator=generator) * decay) @ torch.randn(16, n, generator=generator)
        noise = torch.randn(m, n, generator=generator)
        change = signal / signal.norm() * 0.8 + noise / noise.norm() * 0.6
        with torch.no_grad():
            weight += (change * 0.02 * weight.norm()).reshape(weight.shape)
    tuned = save_single_file(model, folder / "tuned.safetensors", dtype=torch.float16)
    return base, tuned


def run_child(method: str, base: str, tuned: str, rank: int, products: str) -> None:
    torch.set_num_threads(THREADS)
    with PeakMemory() as memory:
        start = time.perf_counter()
        lora, reports = extract(base, tuned, rank=rank, exact=method == "reference",
                                products=None if products == "auto" else getattr(torch, products))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": memory.peak_mib, "layers": len(lora.layers),
                      "kept": {rep.name: rep.kept for rep in reports}}))


def measure(method: str, base: Path, tuned: Path, rank: int, products: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed big blocks go back to the OS: RSS shows each peak
    cmd = [sys.executable, __file__, "--child", method, str(base), str(tuned), "--ranks", str(rank),
           "--products", products]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def error_ratio(ours: dict, ref: dict) -> tuple[float, str]:
    """The largest per-layer ratio of our Frobenius error to the full SVD's (the optimal one)."""
    worst, worst_name = 0.0, ""
    for name, kept in ours["kept"].items():
        ratio = math.sqrt(max(0.0, 1 - kept ** 2)) / max(1e-30, math.sqrt(max(0.0, 1 - ref["kept"][name] ** 2)))
        if ratio > worst:
            worst, worst_name = ratio, name
    return worst, worst_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--files", type=Path, metavar="DIR",
                        help="keep the base/tuned pair in DIR and reuse it on the next run (about 4 GB)")
    parser.add_argument("--products", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the fast sketch's products (default: bfloat16 where the CPU has AMX, else float32)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "BASE", "TUNED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child, rank=args.ranks[0], products=args.products)
        return 0

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = args.files or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        made = [folder / "base.safetensors", folder / "tuned.safetensors"]
        reused = all(p.is_file() for p in made)
        base, tuned = made if reused else make_pair(folder)
        products = str(fast_product_dtype() if args.products == "auto" else args.products).replace("torch.", "")
        how = "reused from an earlier run" if reused else f"made in {time.perf_counter() - start:.0f} s"
        print(f"full SD1.5 layout, {len(extraction_targets('sd15'))} extracted layers, fp16 files {how}; "
              f"torch {torch.__version__}, {THREADS} thread(s), sketch products in {products}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'rank':>4}  {'ours s':>8}  {'full-SVD s':>10}  {'speed-up':>8}  {'ours MiB':>8}  {'full MiB':>8}  "
              f"{'memory':>6}  worst error / optimal")
        for rank in args.ranks:
            ours = measure("ours", base, tuned, rank, args.products)
            ref = measure("reference", base, tuned, rank, args.products)
            speedup = ref["seconds"] / ours["seconds"]
            memory = ours["peak_mib"] / ref["peak_mib"]
            worst, name = error_ratio(ours, ref)
            print(f"{rank:>4}  {ours['seconds']:8.1f}  {ref['seconds']:10.1f}  {speedup:7.1f}x  {ours['peak_mib']:8.0f}  "
                  f"{ref['peak_mib']:8.0f}  {memory:5.2f}x  {worst:.4f} ({name})", flush=True)
            ok &= speedup >= 10 and memory <= 1.0 and worst <= 1.01
    print("all goals met (>= 10x, memory <= 1x, error <= 1.01x optimal)" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
