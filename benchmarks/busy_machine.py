"""A scan on a machine that another program keeps busy: sized to every core, or to the free ones.

`detector scan` measures what other programs use while it starts and gives its network threads and
decode workers only the cores left (detector.workers). This times the same scan of 40 crops of
256 px (whole processes, default weights and precision) on the idle machine and while another
process spins on one core, with the old sizing forced (``--threads`` = every core, 2 decode
workers: what the command did before) and with the default sizing.

    .venv/bin/python benchmarks/busy_machine.py [--images 40] [--repeats 3]

Each figure is the median of ``--repeats`` runs (single runs of the same scan vary by 1-2 s here).

Results: benchmarks/results/busy_machine.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "busy_machine.json"))
    args = ap.parse_args()

    from benchmarks.scan_speed import WEIGHTS, machine, make_crops, run_scan
    from detector.workers import usable_cores

    every_core = ["--threads", str(usable_cores()), "--workers", "2"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        make_crops(folder, args.images)
        for busy in (False, True):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                times: dict[str, list[float]] = {"every core (before)": [], "free cores (default)": []}
                for _ in range(args.repeats):  # interleaved, so that drift hits both alike
                    for sizing, extra in (("every core (before)", every_core), ("free cores (default)", [])):
                        seconds, csv = run_scan(folder, WEIGHTS, extra, Path(tmp) / "out.csv")
                        times[sizing].append(seconds)
                record = json.loads(Path(f"{csv}.json").read_text())["detector"]
                for sizing, runs in times.items():
                    rows.append({"other_process_on_one_core": busy, "sizing": sizing, "images": args.images,
                                 "median_seconds": statistics.median(runs), "runs": runs,
                                 "backend": record.get("backend"), "precision": record.get("precision")})
                    print(f"{'busy' if busy else 'idle'} machine, {sizing}: median {statistics.median(runs):.1f} s "
                          f"of {', '.join(f'{t:.1f}' for t in runs)} ({record.get('backend')} "
                          f"{record.get('precision')})", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
