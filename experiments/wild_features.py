"""Encode every image of the training pool once per view that the in-the-wild campaign (#18) compares.

Per image, several views, each short side resized to 224 and centre-cropped (the scan view that won the
first campaign: native crops lost to it as scan and as training views, experiments/EXPERIMENTS.md):

* ``stored_resize``: the file as stored;
* ``arrival_resize``: one arrival (:func:`detector.training.arrival.arrive`: crop, downscale,
  JPEG/WebP/PNG), the same arrival as the first campaign's (salt 1);
* ``arrival2_resize``: a second, independent arrival (salt 2), so that training can see two;
* ``closeup_resize`` (view set ``closeup``, its own cache folder): a close-up (salt 3): a square of
  128-512 native pixels, re-encoded as JPEG (q 70-100), WebP or PNG; what a user's crop of a large
  photo is, and what the random area crops of an arrival almost never reach;
* ``thumb_resize`` (view set ``thumb``, its own cache folder): a thumbnail (salt 4): half the time a
  crop of half the area or more, then the whole downscaled to a short side of 96-384 px, re-encoded
  as JPEG (q 70-100), WebP or PNG; what a web thumbnail or a benchmark's 256 px real image is (campaign
  6 tried it as a training view and it lost: experiments/EXPERIMENTS.md);
* view set ``wild`` (its own cache folder): the four conditions of ``detector evaluate --wild``
  (:data:`detector.evaluation.conditions.WILD_CONDITIONS`: centre 256 px crop + JPEG 90, 50%
  downscale, JPEG 75, a screenshot-like PNG re-save), made by the same code as the evaluation's, so
  that an operating point can be set on the pool's out-of-fold scores under exactly those conditions.

Beside each view set's features, the size (height, width) of every view before the resize is kept
(a second cache, ``shapes``), for operating points that depend on how large an image arrives.

Per view the feature is ``cls+tokens-blocks:0,...,11`` of the default encoder (CLIP ViT-B/16 int8):
the class token and the mean patch token after every block, from one forward pass, so that the
cross-validation can compare block sets and token kinds by slicing, without encoding again.

Arrivals are seeded by the file's SHA-256, so a rerun gives the same views; features are cached per
file under ``--cache`` (outside the repository), so a killed run resumes where it stopped::

    .venv/bin/python experiments/wild_features.py data/splits/wild_pool.csv
    .venv/bin/python experiments/wild_features.py data/splits/wild_pool.csv --views closeup
    .venv/bin/python experiments/wild_features.py data/splits/wild_pool.csv --views wild
    .venv/bin/python experiments/wild_features.py data/splits/wild_pool.csv --views thumb
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
from detector.evaluation.conditions import WILD_CONDITIONS, condition_rng, parse_perturbations  # noqa: E402
from detector.patches import encoder_views  # noqa: E402
from detector.training.arrival import ArrivalRecipe, arrive  # noqa: E402
from detector.training.probe import FeatureCache  # noqa: E402

ENCODER = "clip:onnx:weights/clip_vitb16.int8.onnx"
BLOCKS = tuple(range(12))
FEATURE = "cls+tokens-blocks:" + ",".join(map(str, BLOCKS))
WIDTH = 768  # per block and part
RECIPE = ArrivalRecipe()
CLOSEUP = ArrivalRecipe(crop_p=1.0, crop_side=(128, 512), downscale_p=0.0, jpeg_p=0.7, jpeg_quality=(70, 100),
                        webp_p=0.1, webp_quality=(70, 100))
THUMB = ArrivalRecipe(crop_p=0.5, crop_area=(0.5, 1.0), downscale_p=1.0, short_side=(96, 384), jpeg_p=0.4,
                      jpeg_quality=(70, 100), webp_p=0.1, webp_quality=(70, 100))
# view set -> (its views, the recipe of its arrivals, the seed salt of each arrival); each set has its own cache
VIEW_SETS = {
    "arrivals": (("stored_resize", "arrival_resize", "arrival2_resize"), RECIPE, (1, 2)),
    "closeup": (("closeup_resize",), CLOSEUP, (3,)),
    "wild": (("center256+jpeg90_resize", "resize0.5_resize", "jpeg75_resize", "screenshot1080_resize"), None, ()),
    "thumb": (("thumb_resize",), THUMB, (4,)),
}
VIEWS = tuple(v for views, _, _ in VIEW_SETS.values() for v in views)
WILD = parse_perturbations(WILD_CONDITIONS)  # the view set "wild", in the order of its names
MAX_PIXELS = 80_000_000


def seeded(sha256: str, salt: int) -> np.random.Generator:
    digest = hashlib.sha256(f"arrival:{salt}:{sha256}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def views_of(path: str, sha256: str, view_set: str = "arrivals", size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """The views ``(k, size, size, 3)`` of one file in ``view_set``, in the order of its names, and
    the ``(k, 2)`` height and width of each before it was resized to ``size``."""
    names, recipe, salts = VIEW_SETS[view_set]
    pixels = decode_image(path, max_pixels=MAX_PIXELS).pixels
    if recipe is None:  # the evaluation's conditions, seeded as `detector evaluate` seeds them (seed 0)
        kept = [c.apply(pixels, condition_rng(0, sha256, c.name)) for c in WILD]
    else:
        arrivals = [arrive(pixels, seeded(sha256, salt), recipe)[0] for salt in salts]
        kept = ([pixels] if names[0] == "stored_resize" else []) + arrivals
    shapes = np.array([p.shape[:2] for p in kept])
    return np.concatenate([encoder_views(p, size=size, n=1, mode="resize") for p in kept]), shapes


def feature_columns(blocks: tuple[int, ...], parts: tuple[str, ...]) -> np.ndarray:
    """Column indices, in a cached feature vector, of the feature ``parts`` of ``blocks`` in the
    order :mod:`detector.backbones` gives them (every block's class token, then every block's mean)."""
    offsets = {"cls": 0, "tokens": len(BLOCKS) * WIDTH}
    return np.concatenate([offsets[part] + BLOCKS.index(b) * WIDTH + np.arange(WIDTH)
                           for part in parts for b in blocks])


def cache_for(folder: str | Path, view_set: str = "arrivals", what: str = "features") -> FeatureCache:
    """The cache of ``view_set``'s features, or with ``what="shapes"`` of its views' sizes."""
    names, recipe, _ = VIEW_SETS[view_set]
    made_by = {"recipe": recipe.to_dict()} if recipe is not None else {"conditions": list(WILD_CONDITIONS)}
    settings = {"encoder": "clip_vitb16.int8.onnx", "feature": FEATURE, "views": list(names), **made_by}
    return FeatureCache(folder, settings if what == "features" else {**settings, "what": what})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--cache", default="../shared-features/wild")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", default="arrivals", choices=list(VIEW_SETS), help="which view set to encode")
    args = parser.parse_args(argv)
    paths = []
    for manifest in args.manifests:
        paths.extend(read_labelled(manifest)["path"].tolist())
    cache = cache_for(args.cache, args.views)
    shape_cache = cache_for(args.cache, args.views, "shapes")
    backbone = create_backbone(ENCODER, feature=FEATURE, threads=args.threads)
    shas = [file_sha256(p) for p in paths]
    todo = [i for i, s in enumerate(shas) if cache.get(s) is None or shape_cache.get(s) is None]
    print(f"{len(paths)} images, {len(paths) - len(todo)} cached, {len(todo)} to encode", flush=True)

    def load(i: int):
        try:
            return i, *views_of(paths[i], shas[i], args.views), ""
        except (ImageError, OSError, ValueError) as err:
            return i, None, None, str(err)

    start = time.time()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for n, (i, views, shapes, error) in enumerate(pool.map(load, todo), start=1):
            if views is None:
                print(f"skipped {paths[i]}: {error}", flush=True)
                continue
            cache.put(shas[i], backbone.features(views))
            shape_cache.put(shas[i], shapes)
            if n % 100 == 0:
                print(f"{n}/{len(todo)} ({time.time() - start:.0f} s)", flush=True)
    print(f"done: {len(todo)} encoded in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
