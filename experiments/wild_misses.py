"""Where does the shipped probe miss on the sealed test split? (#18)

Reads the scores CSV of ``detector evaluate data/splits/wild_test.csv --wild`` (as stored) and
prints, at the threshold stored in the probe's checkpoint, the recall of the label per generator
family with the median image width, and the recall on small (at most 320 px wide) against wider
images. Nothing here is a choice: it only describes the final measurement. Run from the
repository root::

    .venv/bin/python experiments/wild_misses.py runs/wild_test/scores.csv

(The campaign-2 comparison of a linear and an MLP head, ``experiments/wild_heads.py`` up to commit
00143f3, moved into ``experiments/wild_probe.py cv --heads linear mlp``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from detector.checkpoints import read_metadata  # noqa: E402

SMALL = 320  # px: the class-conditional ImageNet samples most misses come from are at most this wide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores", help="scores.csv of `detector evaluate` on the sealed test split")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "clip_probe_vitb16.safetensors"),
                        help="the probe whose stored threshold is applied")
    args = parser.parse_args(argv)
    threshold = read_metadata(args.weights)["calibration"]["threshold"]
    scores = pd.read_csv(args.scores, keep_default_na=False)
    column = next(c for c in scores.columns if c.startswith("logit_"))
    fakes = scores[(scores["label"].astype(int) == 1) & (scores["error"] == "")].copy()
    fakes["caught"] = fakes[column].astype(float) >= threshold
    fakes["width"] = fakes["width"].astype(float)
    table = fakes.groupby("family").agg(n=("caught", "size"), recall=("caught", "mean"), median_width=("width", "median"))
    print(f"sealed test as stored: recall {fakes['caught'].mean():.3f} of {len(fakes)} at threshold {threshold:.3f}")
    small = fakes["width"] <= SMALL
    print(f"  images of width <= {SMALL} px: {int(small.sum())}, recall {fakes.loc[small, 'caught'].mean():.3f}; "
          f"wider: {int((~small).sum())}, recall {fakes.loc[~small, 'caught'].mean():.3f}")
    print(table[table["n"] >= 5].sort_values("recall").to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
