"""Scan speed in whole processes: the published loop against `detector scan`, and the scale table.

Run from the repository root (`make bench` runs it with its defaults, about 20 minutes on 2 cores):

    .venv/bin/python benchmarks/scan_speed.py [--counts 1,10,100,1000] [--others-up-to 100] [--photos 3]

Every figure is a whole process timed from start to exit by this script (interpreter start,
imports, weights, workers, every image, writing the CSV), on PNG crops of 256 x 256 px cut from
the bundled samples, and on 12 MP JPEG photos (4000 x 3000) made from them, scanned in patch mode
(the scan's default: 8 patches of 256 px).

1. **The published loop against the scan's defaults** on 40 crops (issue #12): GRIP's
   one-image-at-a-time fp32 loop (``benchmarks/published_loop.py``) and ``detector scan --weights
   W`` with every other option at its default, same weights; the ratio of their times and the
   Spearman correlation of the scan's logits with the loop's fp32 logits.
2. **The scale table**: images per second for 1, 10, 100 and 1,000 crops and for the photos, for
   each backend and precision: the defaults (``precision auto``: on a CPU with VNNI/AMX, the int8
   model that ships beside the weights), PyTorch fp32 and bf16, OpenVINO int8, bf16 and fp32,
   onnxruntime fp32 (onnxruntime's int8 only with ``--onnxruntime-int8``: its calibration takes
   minutes, and it ran at a third of OpenVINO's int8 speed here). Configurations other than the
   defaults stop at ``--others-up-to`` crops.

Results: benchmarks/results/scan_speed.{json,csv}. Never run it beside a training run or another
benchmark: the CPU is shared, the numbers would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WEIGHTS = ROOT / "weights" / "resnet50nodown_dev.safetensors"
BIN = Path(sys.executable).parent


def make_crops(folder: Path, n: int, size: int = 256) -> list[Path]:
    """N crops of size x size px from the bundled samples (tiled if a sample is smaller), as PNG."""
    import numpy as np
    from PIL import Image

    from detector.images import decode_image, find_images

    sources = [decode_image(p).pixels for p in find_images([ROOT / "data" / "samples"])]
    sources = [s for s in sources if min(s.shape[:2]) >= size] or sources
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        reps = (int(np.ceil(size / src.shape[0])), int(np.ceil(size / src.shape[1])), 1)
        big = np.tile(src, reps) if min(src.shape[:2]) < size else src
        top = int(rng.integers(0, big.shape[0] - size + 1))
        left = int(rng.integers(0, big.shape[1] - size + 1))
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(big[top : top + size, left : left + size]).save(path)
        paths.append(path)
    return paths


def make_photos(folder: Path, n: int) -> list[Path]:
    """N photos of 4000 x 3000 px (12 MP) as JPEG quality 90: bundled samples resized up."""
    from PIL import Image

    from detector.images import find_images

    folder.mkdir(parents=True, exist_ok=True)
    sources = find_images([ROOT / "data" / "samples"])
    paths = []
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as im:
            big = im.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
        path = folder / f"photo_{i:02d}.jpg"
        big.save(path, quality=90)
        paths.append(path)
    return paths


def subset(crops: list[Path], n: int, folder: Path) -> Path:
    """A folder holding the first ``n`` crops (symlinks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in crops[:n]:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p)
    return folder


def timed(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of one process, start to exit; its output is kept only if it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds


def scan_logits(csv: Path) -> dict[str, float]:
    import pandas as pd

    table = pd.read_csv(csv)
    return {str(Path(p).resolve()): float(z) for p, z in zip(table["path"], table["logit"])}


def run_scan(folder: Path, weights: Path, extra: list[str], out: Path) -> tuple[float, Path]:
    for stale in (out, Path(f"{out}.json")):
        stale.unlink(missing_ok=True)
    cmd = [str(BIN / "detector"), "scan", str(folder), "--weights", str(weights), "-o", str(out), "-q", *extra]
    return timed(cmd), out


def published_vs_scan(crops: list[Path], tmp: Path, n: int = 40) -> dict:
    """Issue #12's comparison: the published loop and `detector scan` defaults, whole processes."""
    from scipy.stats import spearmanr

    folder = subset(crops, n, tmp / f"crops{n}")
    out = tmp / "published.json"
    env = {**os.environ, "DETECTOR_KEEP_FREED_MEMORY": "0"}  # nothing of ours in its process
    published_s = timed([sys.executable, str(ROOT / "benchmarks" / "published_loop.py"), str(WEIGHTS), str(folder),
                         str(out)], env=env)
    reference = json.loads(out.read_text())["logits"]
    scan_s, csv = run_scan(folder, WEIGHTS, [], tmp / "defaults40.csv")
    fast = scan_logits(csv)
    keys = sorted(reference)
    record = json.loads(Path(f"{csv}.json").read_text())["detector"]
    return {"images": n, "published_loop_seconds": published_s, "scan_defaults_seconds": scan_s,
            "speedup": published_s / scan_s, "scan_backend": record.get("backend"),
            "scan_precision": record.get("precision"),
            "spearman_vs_fp32": float(spearmanr([reference[k] for k in keys], [fast[k] for k in keys]).statistic),
            "max_abs_logit_diff": max(abs(reference[k] - fast[k]) for k in keys)}


def configurations(tmp: Path, onnxruntime_int8: bool) -> list[tuple[str, Path, list[str]]]:
    """(name, weights, extra scan options) of every backend and precision measured."""
    from detector.hub import int8_companion

    exported = tmp / "export"
    cmd = [str(BIN / "detector"), "export", "--format", "onnx", "--format", "openvino", str(WEIGHTS), "-o", str(exported)]
    if onnxruntime_int8:
        cmd += ["--int8", "--calibration", str(ROOT / "data" / "samples")]
    timed(cmd)
    shipped = int8_companion(WEIGHTS)
    configs = [("defaults", WEIGHTS, []),
               ("torch fp32", WEIGHTS, ["--backend", "torch", "--precision", "fp32"]),
               ("torch bf16", WEIGHTS, ["--backend", "torch", "--precision", "bf16"])]
    if shipped is not None:
        configs.append(("openvino int8", shipped, ["--precision", "int8"]))
    configs += [("openvino bf16", exported, ["--backend", "openvino", "--precision", "bf16"]),
                ("openvino fp32", exported, ["--backend", "openvino", "--precision", "fp32"]),
                ("onnxruntime fp32", exported, ["--backend", "onnxruntime", "--precision", "fp32"])]
    if onnxruntime_int8:
        configs.append(("onnxruntime int8", exported, ["--backend", "onnxruntime", "--precision", "int8"]))
    return configs


def scale_table(crops: list[Path], photos: Path, counts: list[int], others_up_to: int, tmp: Path,
                onnxruntime_int8: bool) -> list[dict]:
    rows = []
    for name, weights, extra in configurations(tmp, onnxruntime_int8):
        for n in counts + ["photos"]:
            if n != "photos" and name != "defaults" and n > others_up_to:
                continue
            folder = photos if n == "photos" else subset(crops, n, tmp / f"crops{n}")
            images = len(list(folder.iterdir()))
            print(f"  {name}: {images} {'photos of 12 MP' if n == 'photos' else 'crops of 256 px'} ...",
                  file=sys.stderr, flush=True)
            seconds, csv = run_scan(folder, weights, extra, tmp / "scale.csv")
            record = json.loads(Path(f"{csv}.json").read_text())["detector"]
            rows.append({"config": name, "backend": record.get("backend"), "precision": record.get("precision"),
                         "input": "12 MP photo, 8 patches" if n == "photos" else "256 px crop",
                         "images": images, "seconds": seconds, "images_per_s": images / seconds})
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    import torch

    from detector.hardware import cpu_has_bf16, cpu_has_int8_dot

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "bf16": cpu_has_bf16(), "int8_dot": cpu_has_int8_dot(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,10,100,1000", help="Crop counts of the scale table.")
    ap.add_argument("--others-up-to", type=int, default=100,
                    help="Largest crop count for configurations other than the defaults.")
    ap.add_argument("--photos", type=int, default=3, help="12 MP photos in the scale table.")
    ap.add_argument("--onnxruntime-int8", action="store_true", help="Also calibrate and time onnxruntime's int8.")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scan_speed"))
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))

    import pandas as pd

    results: dict = {"machine": machine(), "weights": str(WEIGHTS.relative_to(ROOT)),
                     "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("making images ...", file=sys.stderr, flush=True)
        crops = make_crops(tmp / "all", max(counts + [40]))
        photos = tmp / "photos"
        make_photos(photos, args.photos)
        print("published loop vs scan defaults, 40 crops ...", file=sys.stderr, flush=True)
        results["published_vs_scan"] = published_vs_scan(crops, tmp)
        print("scale table ...", file=sys.stderr, flush=True)
        results["scale"] = scale_table(crops, photos, counts, args.others_up_to, tmp, args.onnxruntime_int8)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = pd.DataFrame(results["scale"])
    table.to_csv(out.with_suffix(".csv"), index=False)
    m, c = results["machine"], results["published_vs_scan"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, bf16 {m['bf16']}, int8 dot products "
          f"{m['int8_dot']}, GPU {m['gpu']}; torch {m['torch']}, python {m['python']}; {results['when']}")
    print(f"40 crops of 256 px, whole processes: published loop {c['published_loop_seconds']:.1f} s, `detector scan` "
          f"defaults ({c['scan_backend']} {c['scan_precision']}) {c['scan_defaults_seconds']:.1f} s: "
          f"{c['speedup']:.1f}x; Spearman vs fp32 {c['spearman_vs_fp32']:.4f}")
    wide = table.assign(column=[f"{n} {'photos' if 'photo' in i else 'crops'}" for n, i in
                                zip(table["images"], table["input"])])
    wide = wide.pivot_table(index="config", columns="column", values="images_per_s", sort=False)
    print("images per second (whole processes, start to exit):")
    print(wide.to_string(float_format=lambda v: f"{v:.2f}", na_rep="-"))


if __name__ == "__main__":
    main()
