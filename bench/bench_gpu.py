"""Our trainer against diffusers' DreamBooth scripts on one GPU: SD1.5 size, 512 px, prior preservation.

    python bench/bench_gpu.py                 # the whole table, about 9 minutes on one GPU
    python bench/bench_gpu.py --smoke         # tiny model, 2 steps, on the CPU: the same columns

Rows: LoRA rank 16 at batch 1, 4, 8 and DreamBooth (every UNet weight) at batch 1, 4, each by
our trainer (training.train.train with a TrainConfig) and by a reference loop that does per step
what train_dreambooth_lora.py / train_dreambooth.py do with --mixed_precision bf16
(bench/bench_train.py reference_loop: VAE and text encoder every step, fp32 trained weights,
AdamW, gradient clipping); then LoRA batch 8 and DreamBooth batch 4 with gradient checkpointing
(both), channels_last and torch.compile (ours). The batch is that many subject images plus as
many class images, so a step trains 2 x batch samples.

The base is the full SD1.5 layout with random weights saved in fp16 (no download): the speed and
memory are those of SD1.5; the pictures would be noise. Each row runs in a fresh process (its
own peak memory and compile caches), is timed after its warm-up steps for --window seconds, and
is killed when it has its figures or its time box is over; rows that no longer fit in
--max-seconds are listed as skipped.

MFU (model FLOP utilisation) = samples/s x UNet FLOPs per sample / the device's dense bf16 peak.
An SD1.5 UNet forward pass at 512 px is 0.80 TFLOP; a LoRA step counts 2x that (forward and the
activation gradients), a full step 3x, gradient checkpointing 1x more (the forward again). The
reference's per-step VAE and text encoder work is not counted. Peaks: NVIDIA's datasheets
(dense bf16 tensor core: H100 SXM and H200 989 TFLOPS, A100 312, L4 121, RTX 4090 165; the
datasheets print the with-sparsity figure, twice these), or --peak-tflops.
Goals (issue 16): LoRA samples/s >= 1.5x the reference at batch 8 with <= 0.6x its peak memory;
DreamBooth samples/s >= 1.2x; LoRA at batch 8 >= 20% MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLUMNS = ["row", "trainer", "steps/s", "samples/s", "peak GiB", "MFU", "samples/s vs ref", "peak vs ref", "status"]
UNET_FORWARD_TFLOP_512 = 0.80
# Dense bf16 tensor-core TFLOPS by device name (first match wins). NVIDIA's datasheets give the
# with-sparsity figure; these are half of it: H100 SXM 1,979, H100 NVL 1,671, H100 PCIe 1,513,
# H200 1,979 (NVL 1,671), A100 624, L40S 733, L40 362, L4 242; RTX 4090: Ada whitepaper, 165.2
# with fp32 accumulate.
PEAK_BF16_TFLOPS = (("H200 NVL", 835), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989), ("H200", 989),
                    ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("4090", 165))
MARK = "BENCH "  # prefix of the lines a worker process reports on


@dataclass(frozen=True)
class Row:
    trainer: str  # "ours" | "reference"
    method: str  # "lora" | "dreambooth"
    batch: int
    variant: str = ""  # "" | "gc" (gradient checkpointing) | "channels_last" | "compile"

    @property
    def name(self) -> str:
        return f"{self.method}-b{self.batch}" + (f"+{self.variant}" if self.variant else "")

    @property
    def samples_per_step(self) -> int:
        return 2 * self.batch  # prior preservation: as many class images as subject images

    def reference(self) -> "Row":
        """The reference row this row's ratios are taken against."""
        return Row("reference", self.method, self.batch, "gc" if self.variant == "gc" else "")


@dataclass(frozen=True)
class Settings:
    base: str
    family: str  # "sd15" for MFU; anything else has no FLOP count
    dataset: str
    class_dir: str
    work: str
    resolution: int
    device: str
    precision: str  # mixed precision of both trainers: "bf16" on a GPU, "no" on the CPU
    rank: int
    warmup: int  # steps before timing starts
    steps: int  # timed steps at most
    window: float  # seconds of timed steps at most


def all_rows() -> list[Row]:
    """In the order they run: the headline rows first, so a short budget still gives the ratios."""
    rows = []
    for method, batches in (("lora", (1, 4, 8)), ("dreambooth", (1, 4))):
        for batch in batches:
            rows += [Row("ours", method, batch), Row("reference", method, batch)]
    for method, batch in (("lora", 8), ("dreambooth", 4)):
        rows += [Row("ours", method, batch, "gc"), Row("reference", method, batch, "gc")]
    for variant in ("channels_last", "compile"):
        rows += [Row("ours", "lora", 8, variant), Row("ours", "dreambooth", 4, variant)]
    return rows


# ---------------------------------------------------------------- FLOPs and peaks


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name, or None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def flops_per_sample(method: str, resolution: int, gradient_checkpointing: bool) -> float:
    """UNet FLOPs of one training sample of the SD1.5 UNet (forward 0.80 TFLOP at 512 px)."""
    passes = (2 if method == "lora" else 3) + (1 if gradient_checkpointing else 0)
    return passes * UNET_FORWARD_TFLOP_512 * 1e12 * (resolution / 512) ** 2


# ---------------------------------------------------------------- one row (in the worker)


def run_row(row: Row, s: Settings, emit) -> None:
    """Train `row` for warmup + steps steps, calling emit(dict) once per step."""
    import torch

    cuda = s.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def on_step(step: int) -> None:
        emit({"step": step, "t": time.perf_counter(), "peak": torch.cuda.max_memory_allocated() if cuda else None})

    steps = s.warmup + s.steps
    dataset, class_dir = Path(s.dataset), Path(s.class_dir)
    if row.trainer == "reference":
        from bench.bench_train import reference_loop

        reference_loop(s.base, dataset, class_dir, s.resolution, steps, method=row.method, rank=s.rank,
                       batch=row.batch, device=s.device, mixed_precision=s.precision,
                       gradient_checkpointing=row.variant == "gc", on_step=on_step)
        return
    from training.train import train
    from training.train_config import TrainConfig

    speed = {"gradient_checkpointing": row.variant == "gc"}
    if row.variant in ("channels_last", "compile"):
        speed[row.variant] = True
    cfg = TrainConfig(method=row.method, base=s.base, instance_dir=str(dataset), class_dir=str(class_dir),
                      output=str(Path(s.work) / f"ours_{row.name}.safetensors"), steps=steps, rank=s.rank,
                      batch_size=row.batch, resolution=s.resolution, prior_preservation=True,
                      num_class_images=len(list(class_dir.glob("class_*.png"))), mixed_precision=s.precision,
                      save_every=0, overwrite=True, resume=False, **speed)
    def progress(event) -> None:
        if event.stage == "train":
            on_step(event.step)
        elif event.stage == "warning":  # e.g. gradient checkpointing turned on because memory is short
            emit({"note": str(event.info.get("note", ""))})

    train(cfg, progress=progress)


def worker(spec: str) -> None:
    """The body of a row's own process: report the device, then one line per step."""
    import torch

    job = json.loads(spec)
    row, s = Row(**job["row"]), Settings(**job["settings"])
    if s.device == "cpu":
        torch.set_num_threads(1)  # as in --smoke: two threads on shared cores can run 10x slower
    name = torch.cuda.get_device_name(0) if s.device.startswith("cuda") else "CPU"
    print(MARK + json.dumps({"device": name}), flush=True)
    run_row(row, s, lambda event: print(MARK + json.dumps(event), flush=True))
    print(MARK + json.dumps({"done": True}), flush=True)


# ---------------------------------------------------------------- measuring (in the parent)


@dataclass
class Result:
    row: Row
    status: str = "ok"
    steps_per_s: float | None = None
    peak_bytes: float | None = None
    device: str = ""

    @property
    def samples_per_s(self) -> float | None:
        return None if self.steps_per_s is None else self.steps_per_s * self.row.samples_per_step


class Meter:
    """Step reports -> steps/s after the warm-up; says when it has enough."""

    def __init__(self, s: Settings):
        self.s, self.steps, self.peak, self.notes = s, [], None, []

    def add(self, step: int, t: float, peak: float | None) -> bool:
        self.steps.append((step, t))
        self.peak = peak if self.peak is None or (peak or 0) > self.peak else self.peak
        warm = [t0 for n, t0 in self.steps if n == self.s.warmup]
        return step >= self.s.warmup + self.s.steps or bool(warm and t - warm[0] >= self.s.window)

    def result(self, row: Row, status: str, device: str) -> Result:
        warm = [(n, t) for n, t in self.steps if n == self.s.warmup]
        if not warm or self.steps[-1][0] <= self.s.warmup:
            return Result(row, status if status != "ok" else "no timed step", None, self.peak, device)
        (n0, t0), (n1, t1) = warm[0], self.steps[-1]
        status = "; ".join(["ok"] + self.notes)  # a setting the trainer changed by itself is part of the row
        return Result(row, status, (n1 - n0) / (t1 - t0), self.peak, device)


def measure_in_child(row: Row, s: Settings, timeout: float) -> Result:
    """Run the row in a fresh process; end it (and what it started) once its figures are in."""
    log = Path(s.work) / f"{row.trainer}_{row.name}.log"
    job = json.dumps({"row": asdict(row), "settings": asdict(s)})
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", job], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        meter, device, status, deadline = Meter(s), "", "timeout", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:  # the process ended
                status = "ok" if proc.wait() == 0 else "failed"
                break
            if not line.startswith(MARK):
                continue
            event = json.loads(line[len(MARK):])
            device = event.get("device", device)
            if "note" in event:
                meter.notes.append(event["note"])
            if "step" in event and meter.add(event["step"], event["t"], event["peak"]):
                status = "ok"
                break
            if event.get("done"):
                status = "ok"
                break
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if status == "failed":
        text = log.read_text(errors="replace")
        tail = [x for x in text.splitlines() if x.strip()][-1:] or ["no output"]
        status = "out of memory" if "out of memory" in text.lower() else f"failed: {tail[0][:80]}"
    return meter.result(row, status, device)


def measure_here(row: Row, s: Settings) -> Result:
    """Run the row in this process (the smoke mode: fixed steps, nothing to cut short)."""
    meter = Meter(s)
    try:
        run_row(row, s, lambda e: meter.notes.append(e["note"]) if "note" in e else
                meter.add(e["step"], e["t"], e["peak"]))
    except Exception as exc:  # one bad row is a line of the table, not the end of the others
        return Result(row, f"failed: {str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}")
    return meter.result(row, "ok", "CPU")


# ---------------------------------------------------------------- setup and the table


def setup(work: Path, smoke: bool, resolution: int, num_class: int = 4) -> tuple[str, str, Path, Path]:
    """The base file (SD1.5 layout, random weights, fp16), the prepared photos and plain class images."""
    import numpy as np
    from PIL import Image

    from bench.bench_train import random_sd15_file
    from training.data import PrepareConfig, prepare_dataset

    if smoke:
        base, family = "tiny", "tiny"
    else:
        # reused from an earlier run with the same --work
        base, family = str(random_sd15_file(work / "sd15_random_fp16.safetensors")), "sd15"
    dataset = work / f"dataset_{resolution}"
    if not (dataset / "dataset.json").is_file():  # flip: 12 images, enough for batch 8
        prepare_dataset(ROOT / "training" / "sample_data" / "subject", dataset,
                        PrepareConfig(resolution=resolution, crop="center", flip=True))
    class_dir = work / f"class_images_{resolution}"
    class_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_class):  # the speed does not depend on what the class images show
        path = class_dir / f"class_{i:04d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(path)
    return base, family, dataset, class_dir


def table(results: list[Result], s: Settings, peak: float | None) -> str:
    by_row = {r.row: r for r in results}

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        mfu = None
        if peak and r.samples_per_s and s.family == "sd15":
            mfu = r.samples_per_s * flops_per_sample(r.row.method, s.resolution, r.row.variant == "gc") / (peak * 1e12)
        ref = by_row.get(r.row.reference()) if r.row.trainer == "ours" else None
        cells = [r.row.name, r.row.trainer, num(r.steps_per_s, ".2f"), num(r.samples_per_s, ".2f"),
                 num(r.peak_bytes and r.peak_bytes / 1024**3, ".2f"), "-" if mfu is None else f"{100 * mfu:.1f}%",
                 ratio(r.samples_per_s, ref and ref.samples_per_s), ratio(r.peak_bytes, ref and ref.peak_bytes),
                 r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "diffusers", "peft", "transformers", "accelerate"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model at 64 px, 1 warm-up + 2 timed steps, CPU, "
                                                             "every row in this process (what the test runs)")
    parser.add_argument("--max-seconds", type=float, default=540, help="the whole run, setup included (540)")
    parser.add_argument("--row-seconds", type=float, default=75, help="time box of one row (75; compile rows 3x)")
    parser.add_argument("--window", type=float, default=10, help="seconds of timed steps per row (10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing starts (3)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per row at most (200)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from the table)")
    parser.add_argument("--rows", help="comma-separated row names to run, e.g. lora-b8,lora-b8+gc (default: all)")
    parser.add_argument("--work", help="folder for the base file, photos and logs; kept, and reused next time "
                                       "(default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--isolate", action="store_true", help="with --smoke: each row in its own process, as on a GPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    started = time.monotonic()
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("No CUDA GPU is visible; run with --smoke for the CPU check of this script.")
    rows = [r for r in all_rows() if not args.rows or r.name in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        resolution = 64 if args.smoke else 512
        if args.smoke:
            torch.set_num_threads(1)  # tiny's small layers gain nothing from a second (shared) core
        base, family, dataset, class_dir = setup(work, args.smoke, resolution)
        s = Settings(base=base, family=family, dataset=str(dataset), class_dir=str(class_dir), work=str(work),
                     resolution=resolution, device="cuda" if cuda else "cpu", precision="bf16" if cuda else "no",
                     rank=16, warmup=1 if args.smoke else args.warmup, steps=2 if args.smoke else args.steps,
                     window=float("inf") if args.smoke else args.window)
        results = []
        for row in rows:
            left = args.max_seconds - (time.monotonic() - started)
            if args.smoke and row.variant == "compile":
                results.append(Result(row, "skipped (--smoke: no torch.compile on the CPU)"))
            elif left < 20:
                results.append(Result(row, "skipped (--max-seconds)"))
            elif args.smoke and not args.isolate:
                results.append(measure_here(row, s))
            else:
                box = args.row_seconds * (3 if row.variant == "compile" else 1)
                results.append(measure_in_child(row, s, min(box, left)))
            r = results[-1]
            print(f"{r.row.trainer:>9} {r.row.name:<24} {r.status:<10} "
                  f"{'' if r.steps_per_s is None else f'{r.steps_per_s:.2f} steps/s'}", file=sys.stderr, flush=True)
    device = next((r.device for r in results if r.device), "CPU")
    peak = args.peak_tflops or peak_tflops(device)
    peak_note = (f"{peak:g} TFLOPS dense bf16 ({'--peak-tflops' if args.peak_tflops else 'NVIDIA datasheet'})"
                 if peak else "unknown (give --peak-tflops)")
    print(f"{device}; {versions()}\n{'SD1.5 layout, random weights, fp16 file' if family == 'sd15' else 'tiny'}, "
          f"{resolution} px, prior preservation, LoRA rank {s.rank}, mixed precision {s.precision}; "
          f"{s.warmup} warm-up step(s), then {s.steps} timed steps" + (f" or {s.window:g} s" if s.window < 1e9 else "")
          + f"; peak {peak_note}; "
          f"{time.monotonic() - started:.0f} s in all\n")
    print(table(results, s, peak))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"name": r.row.name} for r in results], indent=1))


if __name__ == "__main__":
    main()
