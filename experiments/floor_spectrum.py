"""Arm (h), the floor every detector must beat: a logistic regression on the noise residual's spectrum.

Per image (both classes alike): the central 256 px crop, a JPEG round trip at quality 90, the
grey-level noise residual (image minus its 3x3 mean), the log-magnitude of its 2-D FFT averaged
into 64x64 bins, standardised; a class-balanced L2 logistic regression trained on
``data/splits/train.csv``, its C chosen on ``val``, reported on the sealed ``test`` split
(overall and per real-photo source) into ``experiments/floor_spectrum.json``::

    .venv/bin/python experiments/floor_spectrum.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from detector.datasets import read_labelled
from detector.evaluation import preprocess
from detector.images import decode_image
from detector.metrics import auc, auc_interval

C_GRID = (0.001, 0.01, 0.1, 1.0)


def spectrum(path: str) -> np.ndarray:
    pixels = preprocess(decode_image(path).pixels, center_crop=256, align_jpeg=90)
    grey = pixels.astype(np.float64).mean(axis=2)
    padded = np.pad(grey, 1, mode="reflect")
    h, w = grey.shape
    local_mean = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    residual = grey - local_mean
    canvas = np.zeros((256, 256))
    canvas[:h, :w] = residual  # smaller images (a few generators' tiles) are zero-padded
    mag = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(canvas))))
    return mag.reshape(64, 4, 64, 4).mean(axis=(1, 3)).ravel()


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.time()
    tables = {s: read_labelled(f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    x = {s: np.stack([spectrum(p) for p in t["path"]]) for s, t in tables.items()}
    y = {s: t["label"].to_numpy() for s, t in tables.items()}
    scaler = StandardScaler().fit(x["train"])
    fits = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x["train"]),
                                                                                     y["train"])
        fits[c] = (auc(y["val"], model.decision_function(scaler.transform(x["val"]))), model)
    best = max(C_GRID, key=lambda c: fits[c][0])
    model = fits[best][1]
    s = model.decision_function(scaler.transform(x["test"]))
    test = tables["test"]
    lo, hi = auc_interval(y["test"], s)
    per_source = {}
    for source in sorted(test.loc[y["test"] == 0, "source"].unique()):
        m = (y["test"] == 1) | (test["source"].to_numpy() == source)
        per_source[source] = {"auc": auc(y["test"][m], s[m]), "n_real": int(((y["test"] == 0) & m).sum())}
    result = {"c": best, "val_auc": fits[best][0], "test_aligned_auc": auc(y["test"], s), "test_lo": lo, "test_hi": hi,
              "n_test_real": int((y["test"] == 0).sum()), "n_test_fake": int((y["test"] == 1).sum()),
              "test_per_real_source": per_source, "cpu_minutes": (time.time() - t0) / 60}
    (Path(__file__).resolve().parent / "floor_spectrum.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
