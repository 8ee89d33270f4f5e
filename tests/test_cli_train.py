"""`python -m training train` as a user runs it (issue 17 items 2, 3): the header block before the
first step, Ctrl-C / SIGTERM keeping a checkpoint of the current step, and the rerun resuming from it
to the same bits as a run that was never stopped (CPU). Subprocesses, stderr a pipe (plain lines)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli_runner
from fixture_paths import ROOT
from training.checkpoint import list_checkpoints

STEPS = 6
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset


def train_argv(dataset: Path, out: Path, *extra) -> list[str]:
    """A LoRA run on tiny whose first --save-every checkpoint (100) comes long after its last step."""
    return [sys.executable, "-m", "training", "train", "--base", "tiny", "--instance-dir", str(dataset),
            "--out", str(out), "--steps", str(STEPS), "--rank", "4", "--seed", "3", "--save-every", "100",
            *map(str, extra)]


def run(argv: list[str], text: bool = True) -> subprocess.CompletedProcess:
    """A run waited for, through tests/cli_runner.py (a fork of a preloaded interpreter, stderr a file)."""
    assert argv[:3] == [sys.executable, "-m", "training"], argv
    return cli_runner.run(argv[3:], cwd=ROOT, env=ENV, timeout=900, text=text)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> tuple[Path, str, bytes]:
    """The uninterrupted run: its output, its stderr as text and as the bytes written."""
    out = tmp_path_factory.mktemp("cli_reference") / "reference.safetensors"
    done = run(train_argv(dataset, out), text=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, cli_runner.pipe_text(done.stderr), done.stderr


def stop_after_first_step(argv: list[str], signum: int) -> tuple[subprocess.CompletedProcess, str]:
    """Start the run (forked by tests/cli_runner.py, stdout and stderr pipes), send `signum` to it once its
    first training step is reported; (the finished process, stderr)."""
    assert argv[:3] == [sys.executable, "-m", "training"], argv
    proc = cli_runner.start(argv[3:], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.time() + 600
    for line in proc.stderr:  # plain lines: stderr is a pipe
        seen.append(line)
        if line.startswith("train: "):
            proc.send_signal(signum)
            break
        assert time.time() < deadline, "no training step within 10 minutes"
    out, rest = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "".join(seen) + rest), "".join(seen) + rest


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:3]


def test_the_header_says_what_the_run_will_do_before_the_first_step(reference, dataset):
    out, stderr, raw = reference
    lines = stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("train: "))
    header = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines[:first_step] if ":" in line}
    assert header["base"] == "tiny (tiny, float32)", header
    assert header["method"].startswith("lora, rank 4, alpha 4")
    assert header["resolution"] == "64" and header["steps"] == f"{STEPS}, batch 1"
    assert header["lr"].startswith("0.0001, constant schedule")
    assert header["prior preservation"] == "off"
    assert header["output"] == str(out) and header["run folder"] == f"{out}.run"
    assert b"\r" not in raw  # a log, not a terminal: no carriage-return redraws (text mode would hide them)


def test_the_header_counts_the_class_images_to_generate(dataset, tmp_path):
    done = run(train_argv(dataset, tmp_path / "prior.safetensors", "--prior-preservation", "--num-class-images", "2",
                          "--class-steps", "1", "--steps", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prior preservation: on: 2 class images, 2 to generate now" in done.stderr, done.stderr[-3000:]
    again = run(train_argv(dataset, tmp_path / "prior2.safetensors", "--prior-preservation", "--num-class-images", "2",
                           "--class-steps", "1", "--steps", "1", "--class-dir", tmp_path / "class_images"))
    assert "prior preservation: on: 2 class images, 0 to generate now" in again.stderr, again.stderr[-3000:]


def test_ctrl_c_keeps_the_current_step_and_the_rerun_resumes_to_the_same_bits(reference, dataset, tmp_path):
    out = tmp_path / "subject.safetensors"
    argv = train_argv(dataset, out)
    stopped, stderr = stop_after_first_step(argv, signal.SIGINT)
    assert stopped.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and not out.exists()
    kept = list_checkpoints(Path(f"{out}.run"))
    assert len(kept) == 1, kept
    step = int(kept[0].stem.split("_")[1])
    assert 1 <= step < STEPS
    assert stderr.strip().splitlines()[-1] == (f"stopped at step {step}; kept checkpoint {kept[0]}; "
                                               "run the same command again to resume")

    resumed = run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = resumed.stderr.splitlines()
    said = lines.index(f"resuming from step {step} (checkpoint {kept[0]})")
    assert said < next(i for i, line in enumerate(lines) if line.startswith("train: "))
    assert f"train: {step + 1}/{STEPS}" in resumed.stderr and f"train: {step}/{STEPS}" not in resumed.stderr
    assert_same_weights(reference[0], out)


def test_sigterm_stops_the_same_way(dataset, tmp_path):
    out = tmp_path / "subject.safetensors"
    stopped, stderr = stop_after_first_step(train_argv(dataset, out), signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    kept = list_checkpoints(Path(f"{out}.run"))
    assert len(kept) == 1 and f"kept checkpoint {kept[0]}" in stderr.strip().splitlines()[-1], stderr[-2000:]
