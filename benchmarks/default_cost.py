"""What the default detector costs on large photos, beside each of its members (issue #19).

Whole processes, timed from start to exit (interpreter, imports, weights, every image, the CSV), on
12 MP JPEG photos (4000 x 3000, quality 90, made from the bundled samples as in
``benchmarks/scan_speed.py``):

* ``default``: ``detector scan FOLDER`` as a user types it: the model set of weights/detector.json,
  whose voting member (the CLIP probe) is the only one computed;
* ``members all``: the same set with its weight-0 member (the ResNet-50) computed and reported too,
  which is what every default scan cost before the weight-0 member was skipped;
* ``probe alone`` and ``resnet alone``: each member given alone with ``--weights`` (the ResNet at
  ``precision auto``: its int8 export on CPUs with VNNI/AMX).

Run from the repository root, never beside another heavy job::

    .venv/bin/python benchmarks/default_cost.py [--photos 8]

Results: benchmarks/results/default_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scan_speed import BIN, ROOT, machine, make_photos, timed  # noqa: E402

WEIGHTS = ROOT / "weights"
CONFIGS = {
    "default": [],
    "members all": ["--members", "all"],
    "probe alone": ["--weights", str(WEIGHTS / "clip_probe_vitb16.safetensors")],
    "resnet alone": ["--weights", str(WEIGHTS / "resnet50nodown_dev.safetensors")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_photos(folder, args.photos)
        for name, extra in CONFIGS.items():
            out = Path(tmp) / f"{name.replace(' ', '_')}.csv"
            print(f"{name}: {args.photos} photos of 12 MP ...", file=sys.stderr, flush=True)
            seconds = timed([str(BIN / "detector"), "scan", str(folder), "-o", str(out), "-q", *extra])
            record = json.loads(Path(f"{out}.json").read_text())["detector"]
            computed = list(record["members"]) if "members" in record else [Path(str(record["weights"])).stem]
            rows.append({"config": name, "photos": args.photos, "seconds": round(seconds, 2),
                         "seconds_per_photo": round(seconds / args.photos, 3), "computed": computed})
            print(f"  {seconds:.1f} s ({seconds / args.photos:.2f} s per photo), computed: {', '.join(computed)}",
                  file=sys.stderr, flush=True)
    result = {"machine": machine(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    (HERE / "results" / "default_cost.json").write_text(json.dumps(result, indent=1))
    print("| configuration | models computed | seconds for %d photos | per photo |" % args.photos)
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {', '.join(r['computed'])} | {r['seconds']:.1f} | {r['seconds_per_photo']:.2f} |")


if __name__ == "__main__":
    main()
