"""Images per second of `detector scan` with --engine local and --engine ray on this machine (one
node, the same cores), whole commands timed end to end, plus the scan's own figure (from its first
decode to its last row, without process start and model loading); then a scale table on paper:
the Ray run's per-actor throughput times the actors a node of N CPUs runs.

    .venv/bin/python benchmarks/ray_scan.py [--images N]

Images: the first N of ../shared/data/dev (real photos and generated images of many sizes), else
the bundled samples repeated. Results: benchmarks/results/ray_scan.json. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEV = ROOT / ".." / "shared" / "data" / "dev"


def _images(folder: Path, n: int) -> str:
    found = sorted(p for p in DEV.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if DEV.is_dir() else []
    source = "../shared/data/dev"
    if not found:
        found, source = sorted((ROOT / "data" / "samples").glob("*.[pj][np]g")), "data/samples (repeated)"
    for i in range(n):
        shutil.copy(found[i % len(found)], folder / f"{i:04d}{found[i % len(found)].suffix}")
    return source


def _run(engine: str, folder: Path, out: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "detector"), "scan", str(folder), "--engine", engine, "-o", str(out), "-q"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    line = next(l for l in proc.stderr.splitlines() if " scanned (" in l)
    n, seconds = int(line.split()[0]), float(re.search(r" in ([0-9.]+) s ", line).group(1))
    record = json.loads(Path(f"{out}.json").read_text())
    return {"engine": engine, "images": n, "wall_seconds": round(wall, 2), "scan_seconds": seconds,
            "images_per_second_wall": round(n / wall, 3), "images_per_second_scan": round(n / seconds, 3),
            "engine_record": record.get("engine")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        source = _images(folder, args.images)
        runs = [_run(engine, folder, Path(tmp) / f"{engine}.csv", env) for engine in ("local", "ray")]
    ray_run = runs[1]
    actors = ray_run["engine_record"]["actors"]
    cpus = ray_run["engine_record"]["cpus_per_actor"]
    per_actor = ray_run["images_per_second_scan"] / actors
    paper = [{"node_cpus": c, "actors": c // cpus, "images_per_second": round(per_actor * (c // cpus), 2)}
             for c in (8, 32, 96)]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "images_from": source,
              "runs": runs, "per_actor_images_per_second": round(per_actor, 3), "cpus_per_actor": cpus,
              "paper_scale_per_node": paper,
              "note": "paper figures assume each actor keeps its measured rate (linear in actors): an upper bound "
                      "that ignores memory bandwidth and storage"}
    for r in runs:
        print(f"{r['engine']:5}  {r['images']} images  {r['wall_seconds']:6.1f} s whole command "
              f"({r['images_per_second_wall']:.2f}/s)  {r['scan_seconds']:6.1f} s scanning ({r['images_per_second_scan']:.2f}/s)")
    print(f"ray: {actors} actors x {cpus} CPU: {per_actor:.2f} images/s per actor")
    for row in paper:
        print(f"  on paper, a node of {row['node_cpus']} CPUs: {row['actors']} actors -> {row['images_per_second']} images/s")
    out = ROOT / "benchmarks" / "results" / "ray_scan.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
