"""Write the project's train / validation / sealed test split of ``../shared/data`` (dev + extra).

Each split holds out whole generators and whole real-photo sources, so every validation or test
image comes from a generator or a photo collection that training never saw. The test split is
sealed: no choice (architecture, crop size, fusion rule, calibration, early stopping) may look at
it; figures are reported on it once a choice is made on validation.

The split is a fixed list of names, not a random draw, so that it never moves:

* **test** holds the most recent generators of the collection (DiT, SiT, Stable Cascade, the
  PixArt-alpha family, the Janus family, SD 2 unCLIP, StyleGAN3) and four real-photo sources of
  different kinds (CBSD68 and McMaster test photos, Debian MATE wallpapers, scikit-image's
  sample photos);
* **val** holds other generators and sources, small but of every kind;
* **train** keeps the rest, including the tiny 64 px sets (EDM, DCGAN faces) that are too small for
  the 256 px crops that evaluation uses.

Run from the project root; writes ``data/splits/{train,val,test}.csv`` with paths relative to
that folder (the manifests work wherever ``../shared`` sits beside the checkout)::

    .venv/bin/python data/make_splits.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import Counter
from pathlib import Path

TEST_GENERATORS = {
    "dit-xl-2", "sit-xl-2", "stable-cascade", "pixart-alpha", "pixart-alpha-lcm", "pixart-alpha-dmd",
    "janus-1.3b", "janusflow-1.3b", "sd-v2-unclip", "stylegan3-ffhq",
}
TEST_SOURCES = {"cbsd68", "mcmaster", "deb-mate-backgrounds", "pypi-scikit-image"}
VAL_GENERATORS = {
    "sd-v2-depth2img", "sd-v1-img2img", "taming-transformers", "stylegan2-ffhq", "edm2", "biggan-deep",
    "vqgan-clip", "progan",
}
VAL_SOURCES = {
    "deb-plasma-workspace-wallpapers", "gh-grip-GANimageDetection", "pypi-scikit-learn", "set14",
    "restormer-demo", "nafnet-demo",
}
COLUMNS = ["path", "label", "generator", "source", "dataset", "width", "height", "format"]


def split_of(label: int, generator: str, source: str) -> str:
    """``train``, ``val`` or ``test`` for one image, by its generator (fakes) or source (reals)."""
    if label == 1:
        return "test" if generator in TEST_GENERATORS else "val" if generator in VAL_GENERATORS else "train"
    return "test" if source in TEST_SOURCES else "val" if source in VAL_SOURCES else "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", default="data/splits", help="where the manifests go")
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for dataset in ("dev", "extra"):
        with open(shared / dataset / "manifest.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                label = int(r["label"])
                generator = r["generator"] if label == 1 else "real"
                source = r["generator"] if label == 1 else r["source"]
                path = os.path.relpath(shared / dataset / r["path"], out)
                rows[split_of(label, generator, source)].append(
                    {"path": path, "label": label, "generator": generator, "source": source, "dataset": dataset,
                     "width": r["width"], "height": r["height"], "format": r["format"]})
    for name, items in rows.items():
        with open(out / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(items)
        counts = Counter("fake" if r["label"] else "real" for r in items)
        groups = Counter(r["source"] for r in items)
        print(f"{name}: {counts['real']} real, {counts['fake']} generated, {len(groups)} sources -> {out / name}.csv")


if __name__ == "__main__":
    main()
