"""Encode every image of the training pool once per view that the in-the-wild campaign (#18) compares.

Per image, three views, each short side resized to 224 and centre-cropped (the scan view that won the
first campaign: native crops lost to it as scan and as training views, experiments/EXPERIMENTS.md):

* ``stored_resize``: the file as stored;
* ``arrival_resize``: one arrival (:func:`detector.training.arrival.arrive`: crop, downscale,
  JPEG/WebP/PNG), the same arrival as the first campaign's (salt 1);
* ``arrival2_resize``: a second, independent arrival (salt 2), so that training can see two.

Per view the feature is ``cls+tokens-blocks:0,...,11`` of the default encoder (CLIP ViT-B/16 int8):
the class token and the mean patch token after every block, from one forward pass, so that the
cross-validation can compare block sets and token kinds by slicing, without encoding again.

Arrivals are seeded by the file's SHA-256, so a rerun gives the same views; features are cached per
file under ``--cache`` (outside the repository), so a killed run resumes where it stopped::

    .venv/bin/python experiments/wild_features.py data/splits/wild_pool.csv
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector.backbones import create_backbone  # noqa: E402
from detector.checkpoints import file_sha256  # noqa: E402
from detector.datasets import read_labelled  # noqa: E402
from detector.images import ImageError, decode_image  # noqa: E402
from detector.patches import encoder_views  # noqa: E402
from detector.training.arrival import ArrivalRecipe, arrive  # noqa: E402
from detector.training.probe import FeatureCache  # noqa: E402

VIEWS = ("stored_resize", "arrival_resize", "arrival2_resize")
ENCODER = "clip:onnx:weights/clip_vitb16.int8.onnx"
BLOCKS = tuple(range(12))
FEATURE = "cls+tokens-blocks:" + ",".join(map(str, BLOCKS))
WIDTH = 768  # per block and part
RECIPE = ArrivalRecipe()
MAX_PIXELS = 80_000_000


def seeded(sha256: str, salt: int) -> np.random.Generator:
    digest = hashlib.sha256(f"arrival:{salt}:{sha256}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def views_of(path: str, sha256: str, size: int = 224) -> np.ndarray:
    """The views ``(3, size, size, 3)`` of one file, in the order of ``VIEWS``."""
    pixels = decode_image(path, max_pixels=MAX_PIXELS).pixels
    arrivals = [arrive(pixels, seeded(sha256, salt), RECIPE)[0] for salt in (1, 2)]
    return np.concatenate([encoder_views(p, size=size, n=1, mode="resize") for p in (pixels, *arrivals)])


def feature_columns(blocks: tuple[int, ...], parts: tuple[str, ...]) -> np.ndarray:
    """Column indices, in a cached feature vector, of the feature ``parts`` of ``blocks`` in the
    order :mod:`detector.backbones` gives them (every block's class token, then every block's mean)."""
    offsets = {"cls": 0, "tokens": len(BLOCKS) * WIDTH}
    return np.concatenate([offsets[part] + BLOCKS.index(b) * WIDTH + np.arange(WIDTH)
                           for part in parts for b in blocks])


def cache_for(folder: str | Path) -> FeatureCache:
    return FeatureCache(folder, {"encoder": "clip_vitb16.int8.onnx", "feature": FEATURE, "views": list(VIEWS),
                                 "recipe": RECIPE.to_dict()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--cache", default="../shared-features/wild")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    paths = []
    for manifest in args.manifests:
        paths.extend(read_labelled(manifest)["path"].tolist())
    cache = cache_for(args.cache)
    backbone = create_backbone(ENCODER, feature=FEATURE, threads=args.threads)
    shas = [file_sha256(p) for p in paths]
    todo = [i for i, s in enumerate(shas) if cache.get(s) is None]
    print(f"{len(paths)} images, {len(paths) - len(todo)} cached, {len(todo)} to encode", flush=True)

    def load(i: int):
        try:
            return i, views_of(paths[i], shas[i]), ""
        except (ImageError, OSError, ValueError) as err:
            return i, None, str(err)

    start = time.time()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for n, (i, views, error) in enumerate(pool.map(load, todo), start=1):
            if views is None:
                print(f"skipped {paths[i]}: {error}", flush=True)
                continue
            cache.put(shas[i], backbone.features(views))
            if n % 100 == 0:
                print(f"{n}/{len(todo)} ({time.time() - start:.0f} s)", flush=True)
    print(f"done: {len(todo)} encoded in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
