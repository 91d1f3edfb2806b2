"""The in-the-wild campaign (#18), follow-up: does a non-linear head on the same CLIP features raise
recall at the shipped operating point, and which generated images does the linear probe miss?

Same pool, folds, views and group weights as ``experiments/wild_probe.py cv``. For each head, the
out-of-fold logits give the operating threshold the way ``wild_probe.py fit`` sets it (the stricter
of the two conditions' 5%-FPR points, sources weighted) and, at that threshold, FPR and recall as
stored and after an arrival. Heads:

* ``linear``: the shipped probe (logistic regression, C=0.001, stored + arrival resized views);
* ``mlp``: one hidden layer of 256 GELU units with dropout, AdamW (weight decay 0.05), 40 epochs,
  on the same standardised features and weights.

Then prints, per generator family of the sealed test evaluation's ``--scores`` (as stored), the recall
of the shipped label and the median width, which shows where the misses are. Run from the
repository root::

    .venv/bin/python experiments/wild_heads.py --features cls-0,1,2,3,4,5,6,7,8,9,10,11 --scores runs/wild_test/scores.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from detector.metrics import auc  # noqa: E402
from detector.probe import LinearProbe  # noqa: E402
from detector.training.calibration import thresholds_at_fpr  # noqa: E402
from detector.training.probe import group_weights  # noqa: E402
from wild_probe import SPLITS, VIEWS, folds, load_features  # noqa: E402

TRAIN = ("stored_resize", "arrival_resize")
SCAN = ("stored_resize", "arrival_resize")  # the scan view under each condition


def class_balanced(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = w.copy()
    for cls in (0, 1):
        w[y == cls] *= 0.5 / w[y == cls].sum()
    return w * len(w)


def linear_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float = 0.001):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=w)
    return model.decision_function


def mlp_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, decay: float = 0.05, epochs: int = 40):
    import torch

    torch.manual_seed(0)
    xt, yt, wt = (torch.tensor(a, dtype=torch.float32) for a in (x, y, w))
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(),
                              torch.nn.Dropout(0.3), torch.nn.Linear(256, 1))
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=decay)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 256):
            b = order[i:i + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[b])[:, 0], yt[b], weight=wt[b])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()

    def decide(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.tensor(z, dtype=torch.float32))[:, 0].numpy()
    return decide


HEADS = {"linear": linear_head, "mlp": mlp_head}


def out_of_fold(head, table: pd.DataFrame, features: np.ndarray) -> np.ndarray:
    """``(n, 2)`` out-of-fold logits of the scan view under each condition (stored, arrival)."""
    y = table["label"].to_numpy()
    w = group_weights(table["group"])
    train_idx, scan_idx = [VIEWS.index(v) for v in TRAIN], [VIEWS.index(v) for v in SCAN]
    z = LinearProbe.normalise(features.reshape(-1, features.shape[2])).reshape(features.shape)
    out = np.zeros((len(table), 2))
    for tr, te in folds(table):
        x = np.concatenate([z[tr, v] for v in train_idx])
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        yy = np.tile(y[tr], len(train_idx))
        ww = class_balanced(yy, np.tile(w[tr], len(train_idx)) / len(train_idx))
        decide = head((x - mean) / scale, yy, ww)
        for k, v in enumerate(scan_idx):
            out[te, k] = decide((z[te, v] - mean) / scale)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="../shared-features/wild")
    parser.add_argument("--features", default="cls-5,7,9,11", help="feature set, as wild_probe.py cv names them")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--scores", help="a sealed-test scores CSV of `detector evaluate` (per-family misses)")
    parser.add_argument("--threshold", type=float, default=None, help="the shipped threshold (default: read from weights)")
    args = parser.parse_args(argv)
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, args.features)
    y = table["label"].to_numpy()
    real = y == 0
    w = group_weights(table["group"])
    print(f"pool: {int(real.sum())} real, {int((~real).sum())} generated; 5-fold grouped CV")
    for name in args.heads:
        t0 = time.time()
        logits = out_of_fold(HEADS[name], table, features)
        t = max(thresholds_at_fpr(logits[real, k], (0.05,), w[real])["0.05"] for k in (0, 1))
        cells = []
        for k, condition in enumerate(("stored", "arrival")):
            s = logits[:, k]
            cells.append(f"{condition}: AUC {auc(y, s):.4f} FPR {(s[real] >= t).mean():.3f} "
                         f"recall {(s[~real] >= t).mean():.3f}")
        print(f"{name:7s} " + " | ".join(cells) + f"  [{time.time() - t0:.0f} s]", flush=True)
    if args.scores:
        scores = pd.read_csv(args.scores, keep_default_na=False)
        column = next(c for c in scores.columns if c.startswith("logit_"))
        threshold = args.threshold
        if threshold is None:
            from detector.checkpoints import read_metadata

            threshold = read_metadata(ROOT / "weights" / "clip_probe_vitb16.safetensors")["calibration"]["threshold"]
        fakes = scores[(scores["label"].astype(int) == 1) & (scores["error"] == "")].copy()
        fakes["caught"] = fakes[column].astype(float) >= threshold
        fakes["width"] = fakes["width"].astype(float)
        table = fakes.groupby("family").agg(n=("caught", "size"), recall=("caught", "mean"),
                                            median_width=("width", "median"))
        print(f"\nsealed test as stored: recall {fakes['caught'].mean():.3f} of {len(fakes)} at threshold {threshold:.3f}")
        small = fakes["width"] <= 320
        print(f"  images of width <= 320 px: {int(small.sum())}, recall {fakes.loc[small, 'caught'].mean():.3f}; "
              f"wider: {int((~small).sum())}, recall {fakes.loc[~small, 'caught'].mean():.3f}")
        print(table[table["n"] >= 5].sort_values("recall").to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
