"""Installs OpenCV for the face crop only where this Python has none (ComfyUI-Manager runs this file
after requirements.txt; by hand: `python install.py` with ComfyUI's python, in the pack folder).

The code needs cv2.FaceDetectorYN (OpenCV 4.8 or later), which every OpenCV wheel has. pip cannot
say "any one of opencv-python, -headless, -contrib...", and two of them in one venv overwrite each
other's cv2 folder, so requirements.txt names none: the one another pack installed is used as it is
(upgraded in place, same name, when older than 4.8), and opencv-python-headless comes only where
there is no OpenCV at all.
"""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
MINIMUM = (4, 8)
DEFAULT = "opencv-python-headless"


def installed_opencv() -> dict[str, str]:
    """The OpenCV distributions in this Python, name -> version."""
    found = {}
    for name in OPENCV_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def opencv_requirement(found: dict[str, str]) -> str | None:
    """What to install: None when an OpenCV >= 4.8 is there, else one requirement (never a second name)."""
    wanted = f">={MINIMUM[0]}.{MINIMUM[1]}"
    if not found:
        return DEFAULT + wanted
    name, version = next(iter(found.items()))
    return None if version_tuple(version) >= MINIMUM else name + wanted


def main() -> int:
    found = installed_opencv()
    if len(found) > 1:
        print(f"[dreambooth] warning: more than one OpenCV is installed ({', '.join(found)}); they share one cv2 "
              "folder, so uninstall all but one and reinstall it.")
    requirement = opencv_requirement(found)
    if requirement is None:
        name, version = next(iter(found.items()))
        print(f"[dreambooth] using the installed {name} {version} for the face crop")
        return 0
    print(f"[dreambooth] installing {requirement} for the face crop")
    return subprocess.call([sys.executable, "-m", "pip", "install", requirement])


if __name__ == "__main__":
    sys.exit(main())
