"""`pip install .` into a fresh venv (issue 17 item 8): the package and its data install, and the CLI
runs from another folder with nothing of the checkout on sys.path.

The venv is plain (no --system-site-packages) and gets no pip of its own; the outer venv's
site-packages come in through a .pth file *after* the fresh one, for torch & co. and for pip
itself, so no network is needed. The checkout is copied first, so the build's build/ and
*.egg-info stay out of the working tree. `training` resolving to the fresh venv is asserted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from fixture_paths import ROOT

OUTER_SITE = Path(sysconfig.get_paths()["purelib"])


def _run(argv: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{argv} exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def test_pip_install_into_a_fresh_venv_runs_from_any_folder(tmp_path):
    started = time.monotonic()
    source = tmp_path / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info",
                                                                "demo_output", "out"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           tmp_path).stdout.strip())
    (fresh_site / "outer_venv.pth").write_text(f"{OUTER_SITE}\n")

    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", source], tmp_path, timeout=300)
    shutil.rmtree(source)  # nothing may still point at the checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = _run([python, "-c", "import training; print(training.__file__)"], elsewhere).stdout.strip()
    assert Path(where).is_relative_to(fresh_site), f"training came from {where}, not the fresh venv"
    installed = Path(where).parent
    for data in ("configs/tiny/unet/config.json", "configs/clip_tokenizer/vocab.json",
                 "configs/face_detector/face_detection_yunet_2023mar.onnx", "sample_data/subject"):
        assert (installed / data).exists(), f"package data missing from the wheel: {data}"
    assert not (installed / "configs" / "__init__.py").exists()

    usage = _run([python, "-m", "training", "--help"], elsewhere).stdout
    assert usage.startswith("usage: ") and "train" in usage and "generate" in usage
    info = _run([venv / "bin" / "sd15-subject", "info", "tiny"], elsewhere).stdout
    assert "tiny" in info and "sha256" in info, info
    took = time.monotonic() - started
    print(f"fresh venv install + two commands: {took:.1f} s")
    assert took < 120, f"{took:.0f} s"
