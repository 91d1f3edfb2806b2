"""Arms of the CLIP-probe experiment: train each on data/splits/train.csv, choose on val, report test.

Every arm is trained with :func:`detector.training.probe.train_probe` (the code behind
``detector train --arch clip-probe:...``) and measured on the sealed test split under three
conditions: images as stored; JPEG-aligned (both classes centre-cropped to 256 px and re-encoded
at quality 90); PNG-only (only the PNG files of both classes, as stored). Results go to
``experiments/probe_arms.json``; the choice between arms is made on validation AUC only.

    .venv/bin/python experiments/probe_arms.py [--arms NAME,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from detector.backbones import create_backbone
from detector.datasets import read_labelled
from detector.metrics import auc, auc_interval
from detector.probe import ProbeDetector
from detector.training.probe import FeatureCache, ProbeTrainConfig, embed_images, image_logits, train_probe

ENCODER = "clip:onnx:weights/clip_vitb16.int8.onnx"
PHOTOS = "../shared-photos/manifest.csv"  # data/collect_photos.py --out ../shared-photos
ARMS = {
    "embeds-crop4": dict(feature="embeds", views=4, view_mode="crop"),
    "embeds-resize1": dict(feature="embeds", views=1, view_mode="resize"),
    "cls-crop4": dict(feature="cls", views=4, view_mode="crop"),
    "embeds-crop4-trainq90": dict(feature="embeds", views=4, view_mode="crop", align_jpeg=90),
    "cls-resize1": dict(feature="cls", views=1, view_mode="resize"),
    "tokens-resize1": dict(feature="tokens", views=1, view_mode="resize"),
    "embeds-resize1-trainq90": dict(feature="embeds", views=1, view_mode="resize", align_jpeg=90),
    # + the 75 real photos of 12 more sources that data/collect_photos.py gathers (training only)
    "embeds-resize1-photos": dict(feature="embeds", views=1, view_mode="resize", extra_train=PHOTOS),
    # the same data, other features of the same encoder: the CLS token before the projection, the patch tokens
    "cls-resize1-photos": dict(feature="cls", views=1, view_mode="resize", extra_train=PHOTOS),
    "tokens-resize1-photos": dict(feature="tokens", views=1, view_mode="resize", extra_train=PHOTOS),
    # the class tokens of blocks 5, 7, 9 and 11: the set that probe_layers.py's screen chose on validation
    "clsblocks-resize1-photos": dict(feature="cls-blocks:5,7,9,11", views=1, view_mode="resize", extra_train=PHOTOS),
}
CONDITIONS = {"stored": dict(), "aligned": dict(center_crop=256, align_jpeg=90)}


def auc_rows(table, logits: np.ndarray) -> dict:
    """AUC with interval overall, per real source (all fakes against it) and per generator."""
    y = table["label"].to_numpy()
    out = {"all": _auc(y, logits)}
    for source in sorted(table.loc[y == 0, "source"].unique()):
        m = (y == 1) | (table["source"].to_numpy() == source)
        out[f"real:{source}"] = _auc(y[m], logits[m])
    for gen in sorted(table.loc[y == 1, "generator"].unique()):
        m = (y == 0) | (table["generator"].to_numpy() == gen)
        out[f"gen:{gen}"] = _auc(y[m], logits[m])
    return out


def test_rows(probe: ProbeDetector, table, logits: np.ndarray) -> dict:
    """:func:`auc_rows` and the accuracy of each class at the probe's calibrated verdict."""
    y = table["label"].to_numpy()
    out = auc_rows(table, logits)
    labels = np.array([probe.label(z) for z in logits])
    out["acc_real"] = float(np.mean(labels[y == 0] == "real"))
    out["acc_fake"] = float(np.mean(labels[y == 1] == "fake"))
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> dict:
    lo, hi = auc_interval(y, s, n_boot=1000)
    return {"auc": auc(y, s), "lo": lo, "hi": hi, "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default="runs/probe_arms")
    args = parser.parse_args()
    base_train, val_t, test_t = (read_labelled(f"data/splits/{s}.csv") for s in ("train", "val", "test"))
    results_path = (Path(__file__).resolve().parent / "probe_arms.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.arms.split(","):
        arm = dict(ARMS[name])
        extra = arm.pop("extra_train", None)
        train_t = base_train if extra is None else pd.concat([base_train, read_labelled(extra)], ignore_index=True)
        t0 = time.time()
        cfg = ProbeTrainConfig(train=["data/splits/train.csv"] + ([extra] if extra else []), val=["data/splits/val.csv"],
                               output_dir=f"{args.out}/{name}", backbone=ENCODER, cache_dir=f"{args.out}/features",
                               threads=2, **arm)
        record = train_probe(cfg, train_table=train_t, val_table=val_t)
        train_minutes = (time.time() - t0) / 60
        detector = ProbeDetector.from_checkpoint(f"{args.out}/{name}/probe.safetensors", device="cpu", threads=2)
        backbone = create_backbone(ENCODER, feature=arm["feature"], threads=2)
        row = {"arm": ARMS[name], "val_auc": record["val_auc"], "c": record["c"], "c_grid": record["c_grid"],
               "calibration": record["calibration"], "train_cpu_minutes": train_minutes, "test": {}}
        for cond, pre in CONDITIONS.items():
            settings = {"backbone": backbone.config.fingerprint, "feature": arm["feature"], "views": arm["views"],
                        "view_mode": arm["view_mode"], "input_size": 224, "align_jpeg": pre.get("align_jpeg"),
                        "center_crop": pre.get("center_crop")}
            if not pre:
                settings = {k: v for k, v in settings.items() if k != "center_crop"}
            cache = FeatureCache(f"{args.out}/features", settings)
            feats = embed_images(list(test_t["path"]), backbone, cache, views=arm["views"], view_mode=arm["view_mode"],
                                 **pre)
            logits = image_logits(detector.probe, feats)
            row["test"][cond] = test_rows(detector, test_t, logits)
            if cond == "stored":
                png = (test_t["format"] == "PNG").to_numpy() if "format" in test_t else None
                if png is None:
                    fmt = pd.read_csv("data/splits/test.csv")["format"].to_numpy()
                    png = fmt == "PNG"
                row["test"]["png_only"] = test_rows(detector, test_t[png].reset_index(drop=True), logits[png])
        results[name] = row
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
        t = row["test"]
        print(f"{name}: val {row['val_auc']:.3f} | test stored {t['stored']['all']['auc']:.3f} "
              f"aligned {t['aligned']['all']['auc']:.3f} png-only {t['png_only']['all']['auc']:.3f} "
              f"({train_minutes:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
