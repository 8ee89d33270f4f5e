"""bench/bench_gpu.py cannot rot: its CPU smoke mode runs every row and prints the GPU table's columns."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import cli_runner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import COLUMNS, Meter, Row, Settings, all_rows, flops_per_sample, peak_tflops  # noqa: E402


def parse_table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The markdown table of the bench's output: its header and one dict per row."""
    lines = [x for x in text.splitlines() if x.startswith("|")]
    assert len(lines) > 2, text
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return header, rows


def test_peak_table_and_flop_count():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA L4") == 121
    assert peak_tflops("NVIDIA L40S") == 362
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165
    assert peak_tflops("Some Other GPU") is None
    assert flops_per_sample("lora", 512, False) == pytest.approx(1.6e12)
    assert flops_per_sample("dreambooth", 512, True) == pytest.approx(3.2e12)
    assert flops_per_sample("lora", 256, False) == pytest.approx(0.4e12)


def test_meter_times_only_steps_after_the_warmup():
    s = Settings(base="tiny", family="tiny", dataset="", class_dir="", work="", resolution=64, device="cpu",
                 precision="no", rank=16, warmup=2, steps=100, window=5.0)
    meter = Meter(s)
    assert not meter.add(1, 100.0, None)  # the first steps are slow (allocation, autotuning): not timed
    assert not meter.add(2, 110.0, None)
    assert not meter.add(3, 111.0, None)
    assert meter.add(6, 115.0, None)  # 5 s after the warm-up: enough
    result = meter.result(Row("ours", "lora", 4), "ok", "CPU")
    assert result.steps_per_s == pytest.approx(4 / 5)
    assert result.samples_per_s == pytest.approx(8 * 4 / 5)  # 4 subject + 4 class images a step


def test_smoke_prints_every_row_with_the_gpu_columns():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = cli_runner.run_script(ROOT / "bench" / "bench_gpu.py", ["--smoke"], cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    header, rows = parse_table(run.stdout)
    assert header == COLUMNS
    assert [(r["row"], r["trainer"]) for r in rows] == [(r.name, r.trainer) for r in all_rows()]
    names = {r["row"] for r in rows}
    assert {"lora-b1", "lora-b4", "lora-b8", "dreambooth-b1", "dreambooth-b4", "lora-b8+gc",
            "dreambooth-b4+gc", "lora-b8+channels_last", "lora-b8+compile"} <= names
    for r in rows:
        if "compile" in r["row"]:
            assert r["status"].startswith("skipped"), r
            continue
        assert r["status"].startswith("ok"), r  # "ok; <note>" when the trainer changed a setting by itself
        batch = int(r["row"].split("-b")[1].split("+")[0])
        steps, samples = float(r["steps/s"]), float(r["samples/s"])
        assert steps > 0 and samples == pytest.approx(2 * batch * steps, rel=0.02), r
        if r["trainer"] == "ours":
            assert r["samples/s vs ref"].endswith("x") and float(r["samples/s vs ref"][:-1]) > 0, r
        else:
            assert r["samples/s vs ref"] == "-", r


def test_options_smoke_prints_every_option_against_plain_and_the_validation_cost():
    """bench/bench_options.py (issue 14) cannot rot: every option trains and gets a ratio to the plain run."""
    from bench.bench_options import CONFIGS, VALIDATION

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = cli_runner.run_script(ROOT / "bench" / "bench_options.py", ["--smoke"], cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for name in [c[0] for c in CONFIGS] + [VALIDATION]:
        row = next((x for x in lines if x.startswith(name + " ")), None)
        assert row is not None, run.stdout
        ms, ratio = row[len(name):].split()[:2]
        assert float(ms) > 0 and ratio.endswith("x") and float(ratio[:-1]) > 0, row
    assert next(x for x in lines if x.startswith("plain ")).split()[2] == "1.00x"
    per_render = next(x for x in lines if x.startswith("per scored render"))
    assert float(per_render.split()[3]) > 0 and "scoring" in per_render, run.stdout


def test_options_layouts_fill_in_their_defaults_and_sd15_skips_validation():
    """`--layout sd15` trains rank 16 at 256 px without the validation row; explicit values win over defaults."""
    from bench.bench_options import settings

    args, layout = settings([])
    assert (args.layout, layout.rank, layout.resolution, layout.validation) == ("tiny", 4, 64, True)
    assert (args.steps, args.repeats, args.warmup) == (40, 3, 3)
    args, layout = settings(["--layout", "sd15"])
    assert (layout.rank, layout.resolution, layout.validation) == (16, 256, False)
    assert (args.steps, args.repeats, args.warmup) == (3, 2, 0)
    assert settings(["--layout", "sd15", "--steps", "6"])[0].steps == 6
    assert (settings(["--layout", "sd15", "--smoke"])[0].steps, settings(["--smoke"])[0].steps) == (2, 4)
