"""Does a CLIP probe gain from the CLS token of earlier blocks? A screen on validation, not a product feature.

The shipped probe reads the CLS token of CLIP ViT-B/16's last block (probe_arms.py,
``cls-resize1-photos``). Detectors built on frozen CLIP report that intermediate blocks carry more
of the low-level traces that generation leaves (Koutlis & Papadopoulos, ECCV 2024, "Leveraging
representations from intermediate encoder-blocks for synthetic image detection"). This encodes the
train (+ the 75 collected photos), val and test images once, with the class token after every
block of the same int8 encoder (feature ``cls-blocks:0,...,11``), and fits the same class-balanced
logistic probe (C chosen on validation) on the CLS token of several sets of blocks. Choice on
validation only; test printed for the record.

    .venv/bin/python experiments/probe_layers.py

Results: experiments/probe_layers.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from detector.backbones import create_backbone
from detector.datasets import read_labelled
from detector.metrics import auc, auc_interval
from detector.training.probe import C_GRID, FeatureCache, embed_images, fit_probe, image_logits

ENCODER = "weights/clip_vitb16.int8.onnx"
PHOTOS = "../shared-photos/manifest.csv"
OUT = Path("runs/probe_layers")
BLOCKS = 12
SETS = {"11": [11], "9,11": [9, 11], "7,9,11": [7, 9, 11], "5,7,9,11": [5, 7, 9, 11], "3,5,7,9,11": [3, 5, 7, 9, 11],
        "all": list(range(BLOCKS)), "7": [7], "5": [5]}


def main() -> None:
    splits = {s: read_labelled(f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    splits["train"] = pd.concat([splits["train"], read_labelled(PHOTOS)], ignore_index=True)
    # every block's class token, side by side (the feature detector.backbones calls cls-blocks)
    feature = "cls-blocks:" + ",".join(str(b) for b in range(BLOCKS))
    encoder = create_backbone(f"clip:onnx:{ENCODER}", feature=feature, threads=2)
    cache = FeatureCache(OUT / "features", {"backbone": encoder.config.fingerprint, "feature": feature, "views": 1,
                                            "view_mode": "resize"})
    t0 = time.time()
    feats, labels = {}, {}
    for name, table in splits.items():
        f = embed_images(list(table["path"]), encoder, cache, views=1, view_mode="resize")
        keep = [i for i, x in enumerate(f) if x is not None]
        feats[name] = [f[i] for i in keep]
        labels[name] = table["label"].to_numpy()[keep]
    encode_minutes = (time.time() - t0) / 60
    results = {"encode_minutes": encode_minutes, "n": {k: len(v) for k, v in labels.items()}, "sets": {}}
    for set_name, blocks in SETS.items():
        cols = np.concatenate([np.arange(b * 768, (b + 1) * 768) for b in blocks])
        part = {k: [x[:, cols] for x in v] for k, v in feats.items()}
        val_auc = {c: auc(labels["val"], image_logits(fit_probe(part["train"], labels["train"], c=c), part["val"]))
                   for c in C_GRID}
        best = max(C_GRID, key=lambda c: (val_auc[c], -abs(np.log(c))))
        probe = fit_probe(part["train"], labels["train"], c=best)
        test_logits = image_logits(probe, part["test"])
        lo, hi = auc_interval(labels["test"], test_logits)
        row = {"blocks": blocks, "c": best, "val_auc": val_auc[best],
               "test_auc": auc(labels["test"], test_logits), "test_lo": lo, "test_hi": hi}
        results["sets"][set_name] = row
        print(f"blocks {set_name:<12} C={best:<5g} val {row['val_auc']:.3f} | test (as stored) {row['test_auc']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]", flush=True)
    (Path(__file__).resolve().parent / "probe_layers.json").write_text(json.dumps(results, indent=1))
    print(f"encoding: {encode_minutes:.1f} min; images {results['n']}")


if __name__ == "__main__":
    main()
