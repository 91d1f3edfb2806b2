"""What a rule of "no verdict under a minimum short side" would do to the probe's operating point,
on the pool only (out of fold; the winner's saved members), never on the sealed test.

A view whose short side (as the encoder receives it, before its resize) is under the minimum gets no
verdict: it counts as neither called generated nor caught. Its logit is set far below any threshold,
so it stays in the denominators of the false-positive rates that fit the size offsets and the
threshold, as a photo not called generated (how the label's FPR would count it). For each minimum, prints the offsets,
the threshold ``fit`` would set and every condition's FPR / recall there, with the share of real /
generated views left without a verdict.

    .venv/bin/python experiments/wild_minside.py --minimum 0 64 96 128
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

import wild_probe as wp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="../shared-features/wild")
    parser.add_argument("--minimum", type=int, nargs="+", default=[0, 64, 96, 128])
    parser.add_argument("--target-fpr", type=float, default=0.05)
    args = parser.parse_args()
    record = json.loads(wp.RESULTS.read_text())
    best = record["winner"]
    edges = record["size_bands"]["chosen"]
    table, features = wp.load_features(pd.read_csv(wp.SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                       [best["train_views"]])
    oof = wp.arm_oof(args.cache, best, table, features)
    del features
    sides = wp.load_sides(table, args.cache)
    real = table["label"].to_numpy() == 0
    for minimum in args.minimum:
        judged = sides >= minimum
        offsets, shifted = wp.with_size_offsets(table, np.where(judged, oof, wp.NO_VERDICT), sides, edges,
                                                args.target_fpr)
        op = wp.operating_point(table, shifted, args.target_fpr)  # an offset leaves wp.NO_VERDICT below any threshold
        mean_recall = np.mean([op[f"op_recall_{name}"] for name in wp.CONDITIONS])
        print(f"minimum {minimum} px: offsets {' '.join(f'{o:+.2f}' for o in offsets)}, threshold "
              f"{op['op_threshold']:.3f}, mean recall {mean_recall:.3f}")
        for k, name in enumerate(wp.CONDITIONS):
            print(f"  {name:15s} FPR {op[f'op_fpr_{name}']:.3f} recall {op[f'op_recall_{name}']:.3f}; no verdict: "
                  f"{(~judged[real, k]).mean():.3f} of reals, {(~judged[~real, k]).mean():.3f} of generated")


if __name__ == "__main__":
    main()
