"""Huge photos: peak memory of `--mode full` and time of `--mode patches`, against pixel count.

    .venv/bin/python benchmarks/huge_images.py            # about 10 minutes on a 2-core CPU

Each measurement runs `detector scan` (default settings but the mode) in a fresh process on one
synthetic JPEG (quality 90) of the given size, made by tiling the bundled sample photos with a
little noise so that no two tiles are identical. It reports wall time and the process's peak
resident memory (decode workers included). Results go to benchmarks/results/huge_images.json/.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (mode, width, height): full mode is about 167 GFLOPs per 256x256 px, so it is measured up to the
# 24-megapixel memory bound; patch mode costs the same whatever the size.
CASES = [
    ("patches", 1000, 1000),
    ("patches", 4000, 3000),
    ("patches", 6000, 4000),
    ("full", 512, 512),
    ("full", 1024, 1024),
    ("full", 6000, 4000),
]


def make_jpeg(path: Path, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    from detector.images import decode_image, find_images

    sources = [decode_image(p).pixels for p in find_images([ROOT / "data" / "samples"])]
    sources = [s[:256, :256] for s in sources if min(s.shape[:2]) >= 256]
    rng = np.random.default_rng(0)
    canvas = np.empty((height, width, 3), np.uint8)
    k = 0
    for top in range(0, height, 256):
        for left in range(0, width, 256):
            tile = sources[k % len(sources)].astype(np.int16) + rng.integers(-3, 4, size=(256, 256, 3))
            h, w = min(256, height - top), min(256, width - left)
            canvas[top : top + h, left : left + w] = np.clip(tile[:h, :w], 0, 255)
            k += 1
    Image.fromarray(canvas).save(path, quality=90)


def _child(image: str, mode: str, out: str) -> None:
    from detector.hardware import tune_process
    from detector.inference import Detector
    from detector.patches import PatchSettings
    from detector.scanning import ScanOptions, scan

    det = Detector.from_checkpoint(ROOT / "weights" / "resnet50nodown_dev.safetensors")
    tune_process(det.device)  # as `detector scan` does
    t0 = time.perf_counter()
    scan([image], det, Path(out).with_suffix(".csv"), ScanOptions(patches=PatchSettings(mode=mode), progress=False))
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": max(own, kids) / 1024,
                                     "precision": det.precision}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "huge_images"))
    ap.add_argument("--skip-full-24mp", action="store_true", help="Leave out the slowest case (minutes).")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, w, h in CASES:
            if args.skip_full_24mp and mode == "full" and w * h > 20e6:
                continue
            image = Path(tmp) / f"{w}x{h}.jpg"
            if not image.exists():
                make_jpeg(image, w, h)
            out = Path(tmp) / f"{mode}_{w}x{h}.json"
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import benchmarks.huge_images as b; "
                    f"b._child({str(image)!r}, {mode!r}, {str(out)!r})")
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            r = json.loads(out.read_text())
            row = {"mode": mode, "width": w, "height": h, "megapixels": w * h / 1e6, **r}
            print(row, file=sys.stderr)
            rows.append(row)
    import pandas as pd

    df = pd.DataFrame(rows)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".json").write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
