"""Benchmark: prepare 15 photos of 2048x2048 (face crop, 512) — target under 10 s on 2 cores.

Prints the cold run, the re-run on unchanged inputs (cache), and a reference in the same
call: a plain full-size decode + resize of the same files, the least any preparation does.

    python bench/bench_prepare.py [--photos 15] [--size 2048]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.data import PrepareConfig, prepare_dataset  # noqa: E402

SUBJECT = ROOT / "training" / "sample_data" / "subject"


def make_photos(folder: Path, count: int, size: int) -> list[Path]:
    """`count` JPEGs of size x size made from the bundled subject photos (mirrored / shifted variants)."""
    sources = sorted(SUBJECT.glob("*.jpg"))
    paths = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as im:
            photo = im.convert("RGB")
        if (i // len(sources)) % 2:
            photo = ImageOps.mirror(photo)
        shift = (i // len(sources)) * 24
        photo = photo.crop((shift, 0, photo.width, photo.height - shift)).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"photo_{i:02d}.jpg"
        photo.save(path, quality=92)
        paths.append(path)
    return paths


def reference(paths: list[Path], resolution: int) -> None:
    for path in paths:
        with Image.open(path) as im:
            im.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=15)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    cfg = PrepareConfig(resolution=512, crop="face")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "photos", Path(tmp) / "out"
        src.mkdir()
        paths = make_photos(src, args.photos, args.size)

        t0 = time.perf_counter()
        reference(paths, cfg.resolution)
        t_ref = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = prepare_dataset(src, out, cfg)
        t_cold = time.perf_counter() - t0

        t0 = time.perf_counter()
        again = prepare_dataset(src, out, cfg)
        t_warm = time.perf_counter() - t0

    print(f"prepare {args.photos} photos of {args.size}x{args.size} (crop=face, 512):")
    print(f"  cold run      {t_cold:6.2f} s   (target < 10 s; faces found {report.faces_found}/{report.kept})")
    print(f"  re-run        {t_warm:6.2f} s   (reused {again.reused}/{again.kept}; target about 1 s)")
    print(f"  reference     {t_ref:6.2f} s   (full decode + resize only)")
    print(f"  ratio cold / reference: {t_cold / t_ref:.2f}")


if __name__ == "__main__":
    main()
