"""Where a short scan's time goes: interpreter, imports, weights, decode workers, first batch, the rest.

A scan of a handful of images pays its fixed cost in full. This runs the steps of `detector scan
--weights W FOLDER` (the command's own functions, in its order) in a fresh process and stamps the
time since the process was launched at each step; the parent also times the process to its exit.

    .venv/bin/python benchmarks/startup.py [--images 1,10] [--repeats 3] [--precision auto]

Prints, per image count, the median over repeats of each step's seconds. Results:
benchmarks/results/startup.json. Run it on a quiet machine (no training beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WEIGHTS = ROOT / "weights" / "resnet50nodown_dev.safetensors"
STEPS = ("interpreter", "import detector.cli", "import torch, cores", "import scan", "weights loaded",
         "first image decoded", "first row written", "scan done", "exit")


def child(folder: str, out: str, precision: str) -> None:
    """The scan command's steps, each stamped with seconds since the parent launched this process."""
    launched = float(os.environ["STARTUP_LAUNCHED"])
    stamps = {"interpreter": time.time() - launched}
    from detector import cli

    stamps["import detector.cli"] = time.time() - launched
    threads, workers = cli._share_cpus(2, None)  # imports torch while measuring what other programs use
    stamps["import torch, cores"] = time.time() - launched
    from detector.scanning import ScanOptions, scan

    stamps["import scan"] = time.time() - launched
    ensemble = cli._load_models((str(WEIGHTS),), None, "auto", precision, None, "auto", threads)
    stamps["weights loaded"] = time.time() - launched
    scan_start = time.time() - launched
    summary = scan([folder], ensemble, Path(out) / "scan.csv", ScanOptions(workers=workers, progress=False))
    stamps["first image decoded"] = scan_start + summary.first_decoded
    stamps["first row written"] = scan_start + summary.first_row
    stamps["scan done"] = time.time() - launched
    member = ensemble.members[0]
    (Path(out) / "stamps.json").write_text(json.dumps({"stamps": stamps, "backend": member.runtime.backend,
                                                       "precision": member.precision}))
    if os.environ.get("STARTUP_TEARDOWN") != "1":
        os._exit(0)  # as the `detector` command ends (detector.cli.run); STARTUP_TEARDOWN=1 measures the old way


def run_once(folder: Path, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "STARTUP_LAUNCHED": repr(time.time())}
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import benchmarks.startup as b; "
                f"b.child({str(folder)!r}, {out!r}, {precision!r})")
        launched = time.time()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
        exit_at = time.time() - launched
        record = json.loads((Path(out) / "stamps.json").read_text())
    record["stamps"]["exit"] = exit_at
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="1,10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = ap.parse_args()

    from benchmarks.scan_speed import machine, make_crops

    results = {"machine": machine(), "precision": args.precision, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.images.split(",")):
            folder = Path(tmp) / f"crops{n}"
            make_crops(folder, n)
            runs = [run_once(folder, args.precision) for _ in range(args.repeats)]
            median = {s: statistics.median(r["stamps"][s] for r in runs) for s in STEPS}
            results["runs"][n] = {"backend": runs[0]["backend"], "precision": runs[0]["precision"],
                                  "median_seconds_since_launch": median, "all": [r["stamps"] for r in runs]}
            print(f"{n} crop(s) of 256 px, {runs[0]['backend']} {runs[0]['precision']}, median of {args.repeats}:")
            previous = 0.0
            for step in STEPS:
                print(f"  {step:<22} at {median[step]:6.2f} s  (+{median[step] - previous:5.2f} s)")
                previous = median[step]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
