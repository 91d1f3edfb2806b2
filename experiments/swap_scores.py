"""Copy a `detector evaluate` folder with one model's raw scores taken from another evaluation.

When one model of a pair is retrained, the other's scores need not be computed again (the
no-downsample ResNet-50 takes minutes per split on this CPU): this writes ``OUT/scores.csv`` and
``OUT/run.json`` from ``BASE`` with the ``logit_<NAME>`` column replaced, row by row on the image
path, by the same column of ``NEW``; ``fusion_rules.py OUT ...`` then reads it::

    .venv/bin/python experiments/swap_scores.py runs/eval/val runs/eval/val_newprobe \
        clip_probe_vitb16 runs/eval/val_swapped
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

SCORING = ("patches", "fusion", "align_jpeg", "center_crop", "max_pixels")  # what makes a raw score


def main(base: str, new: str, name: str, out: str) -> None:
    col = f"logit_{name}"
    scores = pd.read_csv(Path(base) / "scores.csv")
    fresh = pd.read_csv(Path(new) / "scores.csv").set_index("path")[col]
    if set(scores["path"]) != set(fresh.index):
        sys.exit(f"{base} and {new} did not score the same images")
    scores[col] = scores["path"].map(fresh)
    run = json.loads((Path(base) / "run.json").read_text())
    new_run = json.loads((Path(new) / "run.json").read_text())
    if any(run["settings"].get(k) != new_run["settings"].get(k) for k in SCORING):
        sys.exit(f"{base} and {new} scored with different settings")
    replaced = next(m for m in new_run["models"] if m["name"] == name)
    run["models"] = [replaced if m["name"] == name else m for m in run["models"]]
    run["swapped"] = {"model": name, "from": new}
    Path(out).mkdir(parents=True, exist_ok=True)
    scores.to_csv(Path(out) / "scores.csv", index=False)
    (Path(out) / "run.json").write_text(json.dumps(run, indent=1))
    print(f"{out}: {len(scores)} rows, {col} from {new}")


if __name__ == "__main__":
    main(*sys.argv[1:])
