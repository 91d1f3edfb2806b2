"""What a rule of "no verdict under a minimum short side" would do to the probe's operating point,
on the pool only (out of fold; the winner's saved members), never on the sealed test.

A view whose short side (as the encoder receives it, before its resize) is under the minimum gets no
verdict: it counts as neither called generated nor caught. Its logit is set far below any threshold,
so it stays in the denominators of the false-positive rates that fit the size offsets and the
threshold, as a photo not called generated (how the label's FPR would count it). For each minimum (and,
with ``--all-bands``, each of ``bands``' candidate band sets), prints the offsets, the threshold ``fit``
would set and every condition's FPR / recall there, with the share of real / generated views left
without a verdict, then the candidate with the best mean recall over the conditions (campaign 12's rule:
ties to the smaller minimum, then to fewer bands).

    .venv/bin/python experiments/wild_minside.py --minimum 0 64 96 128
    .venv/bin/python experiments/wild_minside.py --minimum 0 40 48 56 64 --all-bands
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
    parser.add_argument("--all-bands", action="store_true",
                        help="try every band set of `bands` (default: the one it chose)")
    args = parser.parse_args()
    record = json.loads(wp.RESULTS.read_text())
    best = record["winner"]
    band_sets = wp.BAND_CANDIDATES if args.all_bands else (tuple(record["size_bands"]["chosen"]),)
    table, features = wp.load_features(pd.read_csv(wp.SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                       [best["train_views"]])
    oof = wp.arm_oof(args.cache, best, table, features)
    del features
    sides = wp.load_sides(table, args.cache)
    real = table["label"].to_numpy() == 0
    print(f"pool: {real.sum()} real, {(~real).sum()} generated images with out-of-fold logits")
    rows = []
    for minimum in args.minimum:
        judged = sides >= minimum
        for edges in band_sets:
            offsets, shifted = wp.with_size_offsets(table, np.where(judged, oof, wp.NO_VERDICT), sides, edges,
                                                    args.target_fpr)
            op = wp.operating_point(table, shifted, args.target_fpr)  # an offset leaves NO_VERDICT below any threshold
            mean_recall = float(np.mean([op[f"op_recall_{name}"] for name in wp.CONDITIONS]))
            rows.append({"minimum": minimum, "edges": list(edges), "mean_recall": mean_recall})
            print(f"minimum {minimum} px, edges {list(edges)}: offsets {' '.join(f'{o:+.2f}' for o in offsets)}, "
                  f"threshold {op['op_threshold']:.3f}, mean recall {mean_recall:.3f}")
            for k, name in enumerate(wp.CONDITIONS):
                print(f"  {name:15s} FPR {op[f'op_fpr_{name}']:.3f} recall {op[f'op_recall_{name}']:.3f}; no verdict: "
                      f"{(~judged[real, k]).mean():.3f} of reals, {(~judged[~real, k]).mean():.3f} of generated")
    chosen = max(rows, key=lambda r: (round(r["mean_recall"], 3), -r["minimum"], -len(r["edges"])))
    print(f"best mean recall: minimum {chosen['minimum']} px, edges {chosen['edges']} ({chosen['mean_recall']:.3f})")


if __name__ == "__main__":
    main()
