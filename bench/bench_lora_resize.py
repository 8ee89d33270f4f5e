"""Rank resize: our factored SVD against the full-product SVD (what kohya's resize_lora.py does).

A rank-128 LoRA on every attention and feed-forward linear of the full SD1.5 UNet (160
layers) is written as a kohya fp16 file, then resized to rank 8 by each method in its own
fresh process (so neither inherits the other's freed memory):

- ours: `training.lora.resize` (QR of the factors, SVD of the r x r core, layers of
  one shape batched);
- reference: kohya's `resize_lora.py` method: merge `up @ down` in float32, `torch.linalg.svd`
  of the m x n product, truncate.

Prints both times (ours: median of --repeat runs), both peak-memory increases over the
process's level after loading the LoRA, their ratios, and the largest per-layer relative
Frobenius difference between the two results.

    python bench/bench_lora_resize.py [--rank-in 128] [--rank-out 8] [--every 1] [--repeat 5]

Goals: >= 40x faster, <= 0.35x the peak memory, <= 1e-3 relative error per layer.
`--every N` keeps every N-th layer for a quicker, rougher look. Timings are of this
machine at this moment: other load on the cores shows up in both numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from training import lora as lf  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def make_lora(rank: int, every: int) -> lf.LoraFile:
    """A trained-looking rank-`rank` LoRA: decaying spectrum, fp16 factors, alpha = rank / 2."""
    table = lf.module_table("sd15")
    names = [n for n in table.shapes if n.startswith("unet.") and n.endswith(TARGETS) and ".transformer_blocks." in n]
    generator = torch.Generator().manual_seed(0)
    decay = torch.exp(-torch.arange(rank, dtype=torch.float32) / (rank / 8))
    layers = {}
    for name in names[::every]:
        out_dim, in_dim = table.shapes[name]
        up = torch.randn(out_dim, rank, generator=generator) * decay * 0.02
        down = torch.randn(rank, in_dim, generator=generator) / in_dim ** 0.5
        layers[name] = lf.LoraLayer(down.half(), up.half(), alpha=rank / 2)
    return lf.LoraFile(layers, family="sd15")


def reference_resize(lora: lf.LoraFile, rank: int) -> lf.LoraFile:
    """kohya resize_lora.py's method: merge in float32, SVD of the full product, keep `rank`."""
    out = {}
    for name, layer in lora.layers.items():
        product = layer.up.float() @ layer.down.float()
        u, s, vh = torch.linalg.svd(product)  # full_matrices=True, as kohya calls it
        up = u[:, :rank] @ torch.diag(s[:rank])
        out[name] = lf.LoraLayer(vh[:rank].clone(), up, alpha=layer.scale * rank)
        del product, u, s, vh
    return lf.LoraFile(out, family=lora.family)


# ---------------------------------------------------------------- one method, in a child process


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read())[1])


class PeakMemory:
    """Peak resident memory above the level at entry, in MiB: the larger of VmHWM and a 1 ms RSS sampler."""

    def __enter__(self):
        self.start = _kib("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.sampled = max(self.sampled, _kib("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = (max(_kib("VmHWM"), self.sampled) - self.start) / 1024


def run_child(method: str, source: str, result: str, rank: int, repeat: int) -> None:
    lora = lf.read_lora(source)
    resize = (lambda: lf.resize(lora, rank=rank)[0]) if method == "ours" else (lambda: reference_resize(lora, rank))
    with PeakMemory() as memory:  # the first run, in a process that has not freed anything big yet
        start = time.perf_counter()
        resized = resize()
        times = [time.perf_counter() - start]
    for _ in range(repeat - 1):
        start = time.perf_counter()
        resize()
        times.append(time.perf_counter() - start)
    lf.write_kohya(resized, result, dtype=torch.float32)
    print(json.dumps({"seconds": statistics.median(times), "runs": times, "peak_mib": memory.peak_mib}))


def measure(method: str, source: str, result: str, rank: int, repeat: int) -> dict:
    # a fixed mmap threshold: big blocks come from and go back to the OS, so RSS shows each method's own peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", method, source, result, "--rank-out", str(rank), "--repeat", str(repeat)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-in", type=int, default=128)
    parser.add_argument("--rank-out", type=int, default=8)
    parser.add_argument("--every", type=int, default=1, help="keep every N-th layer (1 = all 160)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of our method (the median is reported)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SOURCE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child, rank=args.rank_out, repeat=args.repeat)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "rank_in.safetensors")
        lora = make_lora(args.rank_in, args.every)
        lf.write_kohya(lora, source)
        size_mib = sum(t.numel() * 2 for layer in lora.layers.values() for t in (layer.up, layer.down)) / 2**20
        print(f"input: {len(lora.layers)} SD1.5 attention/feed-forward layers, rank {args.rank_in} -> {args.rank_out}, "
              f"fp16, {size_mib:.0f} MiB; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        ours = measure("ours", source, os.path.join(tmp, "ours.safetensors"), args.rank_out, args.repeat)
        ref = measure("reference", source, os.path.join(tmp, "ref.safetensors"), args.rank_out, 1)
        ours_lora = lf.read_lora(os.path.join(tmp, "ours.safetensors"))
        ref_lora = lf.read_lora(os.path.join(tmp, "ref.safetensors"))

    worst, worst_name = 0.0, ""
    for name, layer in ours_lora.layers.items():
        expected = ref_lora.layers[name].delta(torch.float64)
        err = float((layer.delta(torch.float64) - expected).norm() / expected.norm())
        if err > worst:
            worst, worst_name = err, name
    speedup = ref["seconds"] / ours["seconds"]
    memory_ratio = ours["peak_mib"] / ref["peak_mib"]
    runs = ", ".join(f"{t:.2f}" for t in ours["runs"])
    print(f"reference (full-product SVD): {ref['seconds']:8.2f} s          peak +{ref['peak_mib']:7.1f} MiB")
    print(f"ours (QR + r x r SVD):        {ours['seconds']:8.2f} s median  peak +{ours['peak_mib']:7.1f} MiB   runs: {runs}")
    print(f"speed-up: {speedup:.1f}x (goal >= 40x)   peak memory: {memory_ratio:.3f}x of the reference (goal <= 0.35x)")
    print(f"largest per-layer relative Frobenius difference: {worst:.2e} ({worst_name}) (goal <= 1e-3)")
    ok = speedup >= 40 and memory_ratio <= 0.35 and worst <= 1e-3
    print("all goals met" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
