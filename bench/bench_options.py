"""Per-step cost of the identity options (issue 14) against a plain LoRA run, measured in one invocation.

Each config trains the same LoRA (the bundled photos prepared once) in a fresh child process on one thread:
on `tiny` (rank 4, 64 px) by default, or with `--layout sd15` on the full-size SD1.5 layout (random weights,
fp16 file, built once; rank 16, the trainer's default, at 256 px), where a step is the UNet's compute as a
user's is rather than `tiny`'s fixed overhead. The configs alternate, `--repeats` times, and each one's
median step time is shown with its ratio to the plain run: the median over the rounds of its median step
against the same round's plain run (the load of a shared machine drifts between rounds). The first step and
the next `--warmup` steps carry one-off costs and are not timed. Goals (issue 14): --dora at most 1.5x; --rslora,
--loraplus-ratio 16 and --background-weight 0.3 1.0x.

The validation row is a plain run with --validation-every: each validated step renders the validation prompts
(three scenes and the probe, 20 sampling steps) and scores them with the identity tracker (dlib's face metric
against the prepared crops, prepared at 256 px because dlib finds no face in 64 px ones; no CLIP-T, which
needs CLIP weights). On tiny's random weights the renders hold no face, so the face scorer's time is its
detection. The cost per scored render is that step's time less the run's median plain step, divided by the
renders; the scorer's share is the tracker's own timing of `score` (StepScores.seconds, read by wrapping the
real method). The first validation also loads the scorers, so it is shown apart. The sd15 layout skips the
validation row: one validation there is 4 renders of 20 sampling steps of the full UNet, minutes on one thread.

    python bench/bench_options.py                  # tiny: 40 steps per run, median of 3
    python bench/bench_options.py --layout sd15    # 3 steps per run (the first not timed), median of 2
    python bench/bench_options.py --smoke          # a few steps, one run each, all in this process: checks
                                                   # that every row runs (its times are not a measurement)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pivotal import step_times  # noqa: E402
from bench.bench_train import THREADS, peak_rss_mb, random_sd15_file, run_in_child  # noqa: E402  (also sets HF_HUB_OFFLINE)

# name, TrainConfig fields on top of the plain run, goal ratio (None: no goal)
CONFIGS = [
    ("plain", {}, None),
    ("dora", {"dora": True}, 1.5),
    ("rslora", {"rslora": True}, 1.0),
    ("loraplus-ratio 16", {"loraplus_ratio": 16.0}, 1.0),
    ("background-weight 0.3", {"background_weight": 0.3}, 1.0),
]
VALIDATION = "validation"


@dataclass(frozen=True)
class Layout:
    """What one layout trains, and its defaults for a run of the bench (and for --smoke)."""

    title: str
    rank: int
    resolution: int
    steps: int
    repeats: int
    warmup: int
    validation: bool  # whether the validation row runs
    smoke_steps: int


LAYOUTS = {
    "tiny": Layout("tiny", rank=4, resolution=64, steps=40, repeats=3, warmup=3, validation=True, smoke_steps=4),
    # from the smoke's CPU time: a step ~15 s on one core, a run's start, loading and caching ~55 s, building the
    # file ~1 min: 5 configs x 2 rounds x 3 steps ~ 15-18 min on an idle machine
    "sd15": Layout("full-size SD1.5 layout (random weights, fp16 file)", rank=16, resolution=256, steps=3,
                   repeats=2, warmup=0, validation=False, smoke_steps=2),
}


def settings(argv: list[str] | None = None) -> tuple[argparse.Namespace, Layout]:
    """The command line, with the layout's defaults filled in (--smoke: a few steps, one run each)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, default="tiny",
                        help="tiny (default), or sd15: the full-size SD1.5 layout, rank 16, 256 px, no validation row")
    parser.add_argument("--steps", type=int, help="LoRA steps per run (tiny 40, sd15 3)")
    parser.add_argument("--repeats", type=int, help="runs of each config, alternating, medians shown (tiny 3, sd15 2)")
    parser.add_argument("--warmup", type=int, help="steps after the first that are not timed (tiny 3, sd15 0)")
    parser.add_argument("--validation-every", type=int, default=10, help="the validation row's validation_every")
    parser.add_argument("--smoke", action="store_true",
                        help="one run each, no warm-up, every run in this process; tiny 4 steps, validation every 2; "
                             "sd15 2 steps")
    args = parser.parse_args(argv)
    layout = LAYOUTS[args.layout]
    if args.smoke:
        args.steps, args.repeats, args.warmup, args.validation_every = layout.smoke_steps, 1, 0, 2
    for name in ("steps", "repeats", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(layout, name))
    return args, layout


def one_run(base: str, dataset: str, out: str, steps: int, rank: int, resolution: int, options: dict) -> dict:
    """Train one LoRA; each step's seconds (from step 2 on) and the tracker's scoring times."""
    from training.identity import IdentityTracker
    from training.train_config import TrainConfig

    scored: list[dict] = []
    real_score = IdentityTracker.score

    def score(self, step, images):  # the real scoring, its own timings recorded
        result = real_score(self, step, images)
        scored.append({"step": step, "renders": len(images), "seconds": result.seconds,
                       "face_seconds": result.face_seconds, "identity": result.identity})
        return result

    IdentityTracker.score = score
    cfg = TrainConfig(base=base, instance_dir=dataset, output=out, steps=steps, rank=rank, resolution=resolution,
                      save_every=0, overwrite=True, resume=False, **options)
    started = time.perf_counter()
    try:
        seconds = step_times(cfg, None)
    finally:
        IdentityTracker.score = real_score  # --smoke runs the next config in this process
    return {"step_s": seconds, "scored": scored, "run_s": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb()}


def measure(base: str, dataset: Path, out: Path, steps: int, layout: Layout, options: dict, fresh: bool = True) -> dict:
    """One run in a fresh process (its own allocator, caches and peak memory); fresh=False (--smoke): in this one."""
    if not fresh:
        return one_run(base, str(dataset), str(out), steps, layout.rank, layout.resolution, options)
    return run_in_child("bench_options", f"one_run({base!r}, {str(dataset)!r}, {str(out)!r}, {steps}, {layout.rank}, "
                                         f"{layout.resolution}, json.loads({json.dumps(options)!r}))",
                        setup="import json;")


def timed_steps(run: dict, warmup: int, validated: set[int]) -> list[float]:
    """Seconds of the steps after the warm-up that did no validation (step_s[i] is step i + 2)."""
    return [s for i, s in enumerate(run["step_s"]) if i >= warmup and i + 2 not in validated]


def main() -> None:
    args, layout = settings()
    started = time.perf_counter()
    from training.data import PrepareConfig, load_dataset, prepare_dataset

    configs = CONFIGS + ([(VALIDATION, {"validation_every": args.validation_every}, None)] if layout.validation else [])
    validated = set(range(args.validation_every, args.steps + 1, args.validation_every)) if layout.validation else set()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # prepared at 256 px (tiny trains at 64): the crops are the identity tracker's references, and dlib
        # finds no face in 64 px crops
        dataset = prepare_dataset(ROOT / "training" / "sample_data" / "subject", work / "dataset",
                                  PrepareConfig(resolution=256)).folder
        data = load_dataset(dataset)
        regions = sum(data.subject_map(item, 8) is not None for item in data.items)
        base = "tiny"
        if args.layout == "sd15":
            base = str(random_sd15_file(work / "sd15.safetensors"))
        if args.smoke:  # the runs' threads, as run_in_child sets them in a fresh process
            import torch

            torch.set_num_threads(THREADS)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for repeat in range(args.repeats):
            for name, options, _ in configs:
                out = work / f"{name.replace(' ', '_')}_{repeat}.safetensors"
                runs[name].append(measure(base, dataset, out, args.steps, layout, options, fresh=not args.smoke))

        def median_step(name: str) -> float:
            skip = validated if name == VALIDATION else set()
            return statistics.median(s for r in runs[name] for s in timed_steps(r, args.warmup, skip))

        def ratio(name: str) -> float:  # each round's median against that round's plain run: load drifts
            skip = validated if name == VALIDATION else set()
            return statistics.median(statistics.median(timed_steps(r, args.warmup, skip))
                                     / statistics.median(timed_steps(p, args.warmup, set()))
                                     for r, p in zip(runs[name], runs["plain"]))

        print(f"{layout.title} LoRA rank {layout.rank}, {layout.resolution} px, CPU, {THREADS} thread(s), "
              f"{args.steps} steps per run (the first {args.warmup + 1} not timed), each config in "
              f"{'this process (--smoke)' if args.smoke else 'a fresh process'}, "
              f"alternated, median of {args.repeats}; {regions} of {len(data.items)} prepared photos have a subject "
              "region")
        print(f"{'':24}{'ms/step':>9}{'vs plain':>10}{'goal':>7}")
        for name, _, goal in configs:
            ms = median_step(name)
            print(f"{name:24}{ms * 1e3:9.1f}{ratio(name):9.2f}x{f'{goal:.1f}x' if goal else '-':>7}")
        if layout.validation:
            _validation_rows(runs[VALIDATION], median_step(VALIDATION), args.validation_every, validated)
        print(f"\nthe whole bench took {time.perf_counter() - started:.0f} s")


def _validation_rows(runs: list[dict], plain_step: float, every: int, validated: set[int]) -> None:
    """Seconds per scored render: the validated steps' extra time over a plain step, split into scoring and the
    rest (rendering, saving); the first validation (scorer loading) apart."""
    first = min(validated)
    later, first_s, scoring, face, renders, faces_found = [], [], [], [], None, 0
    for run in runs:
        times = {i + 2: s for i, s in enumerate(run["step_s"])}
        by_step = {row["step"]: row for row in run["scored"]}
        for step in sorted(validated):
            if step not in times or step not in by_step:
                continue  # step 1 is not timed
            row = by_step[step]
            renders = row["renders"]
            extra = (times[step] - plain_step) / renders
            faces_found += row["identity"] is not None
            if step == first:
                first_s.append(extra)
                continue
            later.append(extra)
            scoring.append(row["seconds"] / renders)
            face.append(row["face_seconds"] / renders)
    print(f"\nvalidation every {every} steps, {renders} renders a validation (3 scenes + probe, 20 sampling steps), "
          f"scored with the identity tracker (dlib face metric; {faces_found} of "
          f"{sum(len(r['scored']) for r in runs)} validations found a face)")
    if later:
        per, score_s, face_s = statistics.median(later), statistics.median(scoring), statistics.median(face)
        print(f"{'per scored render':24}{per:9.3f} s  (scoring {score_s:.3f} s of it, {score_s / per:.0%}; "
              f"the face scorer {face_s:.3f} s; the rest renders and saves)")
    if first_s:
        print(f"{'first validation':24}{statistics.median(first_s):9.3f} s per render (it also loads the scorers)")


if __name__ == "__main__":
    main()
