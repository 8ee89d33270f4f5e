"""install.py beside another pack's OpenCV: a venv where opencv-contrib-python 4.x came first keeps it as its
only cv2 distribution, and the face crop finds the faces in the sample photos with it.

Slow (a fresh venv and a 68 MB wheel): runs only with RUN_SLOW=1, and needs the wheel from a package index
or $OPENCV_WHEELS (a folder with opencv_contrib_python-4.*.whl).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = "opencv-contrib-python==4.10.0.84"
OUTER_SITE = Path(sysconfig.get_paths()["purelib"])
PIP = [sys.executable, "-m", "pip"]

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="slow (a fresh venv, a 68 MB wheel): RUN_SLOW=1")

CV2_DISTRIBUTIONS = """
import json
from importlib import metadata
print(json.dumps(sorted({d.metadata["Name"] for d in metadata.distributions()
                         if any(str(f).startswith("cv2/") for f in d.files or [])})))
"""

DETECT = """
import json, sys
import cv2
from PIL import Image
from training.data.crop import detect_faces
photos = sorted(p for p in __import__("pathlib").Path(sys.argv[1]).glob("*.jpg"))
faces = {p.name: len(detect_faces(Image.open(p))) for p in photos}
print(json.dumps({"cv2": cv2.__file__, "version": cv2.__version__, "faces": faces}))
"""


def run(argv, cwd: Path = ROOT, timeout: int = 300, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**clean, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env})
    assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def fresh_venv(venv: Path) -> Path:
    """A plain venv; pip is this one's, pointed at it with --python (saves bootstrapping a pip per venv)."""
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    return venv / "bin" / "python"


def test_install_keeps_another_packs_opencv_and_the_face_crop_works(tmp_path):
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    wheels = ["--find-links", os.environ["OPENCV_WHEELS"]] if os.environ.get("OPENCV_WHEELS") else []
    run([*PIP, "--python", python, "install", "-q", *wheels, CONTRIB])  # another pack's OpenCV, installed first

    # Our requirements name no OpenCV wheel; install.py sees contrib >= 4.8 and installs nothing.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert not [line for line in lines if line.strip().lower().startswith("opencv")]
    said = run([python, ROOT / "install.py"], cwd=ROOT)
    assert "using the installed opencv-contrib-python 4.10" in said, said
    assert json.loads(run([python, "-c", CV2_DISTRIBUTIONS])) == ["opencv-contrib-python"]
    listed = run([*PIP, "--python", python, "list", "--format", "json"])
    assert [p["name"] for p in json.loads(listed) if p["name"].lower().startswith("opencv")] == ["opencv-contrib-python"]

    # The face crop with that cv2; numpy and pillow come from this venv, after the fresh one on sys.path.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "outer.pth").write_text(str(OUTER_SITE) + "\n")
    found = json.loads(run([python, "-c", DETECT, ROOT / "training" / "sample_data" / "subject"]).splitlines()[-1])
    assert Path(found["cv2"]).is_relative_to(site) and found["version"].startswith("4.10"), found
    assert found["faces"] and all(count >= 1 for count in found["faces"].values()), found


def test_install_adds_the_headless_wheel_where_there_is_no_opencv(tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])  # with a pip of its own: install.py runs `python -m pip`
    python = venv / "bin" / "python"
    said = run([python, ROOT / "install.py"], cwd=ROOT)
    assert "installing opencv-python-headless>=4.8" in said, said
    assert json.loads(run([python, "-c", CV2_DISTRIBUTIONS])) == ["opencv-python-headless"]
