"""How images arrive at a scan, as training views: crops, downscales and re-encodings, for both classes.

A probe trained only on whole images resized to the encoder's input learns what a whole, resized
picture looks like, and then reads a zoomed-in crop of a photo as a sign of generation. People
scan crops, thumbnails, re-shared JPEGs and WebPs and screenshots. An *arrival* is one such
history drawn at random: a crop of 1/16 of the area to all of it, a downscale to 25-100%, then a
re-encoding (JPEG at quality 60-100, WebP at 60-100, or a lossless PNG re-save). A *close-up*
recipe (``crop_side``) crops a square of a few hundred native pixels instead of a share of the
area: what a 256 px crop of a 12-megapixel photo is, far below 1/16 of its area. A *thumbnail*
recipe (``short_side``) downscales the whole picture to a short side of a few hundred pixels: what a
web thumbnail or a benchmark's 256 px real image is, so that "small and whole" is not a trait of
generated images alone (class-conditional generators publish 128-512 px samples). Real and
generated images draw from the same distribution, so that neither format nor size separates the
classes. Every choice comes from the generator passed in: a view is a pure function of
(pixels, seed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..images import reencode

__all__ = ["ArrivalRecipe", "arrive"]


@dataclass(frozen=True)
class ArrivalRecipe:
    """The distribution of arrivals; recorded with a probe trained on them."""

    crop_p: float = 0.7
    crop_area: tuple[float, float] = (1 / 16, 1.0)
    downscale_p: float = 0.5
    downscale: tuple[float, float] = (0.25, 1.0)
    min_side: int = 64
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (60, 100)
    webp_p: float = 0.2
    webp_quality: tuple[int, int] = (60, 100)
    # when set, crops are squares whose side (native pixels, clipped to the image) is drawn
    # log-uniformly from this range instead of a share of the area
    crop_side: tuple[int, int] | None = None
    # when set, a downscale resizes to a short side (px) drawn log-uniformly from this range instead
    # of a factor of ``downscale``; never upscales
    short_side: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        """The recipe as recorded; ``crop_side`` and ``short_side`` only when set, so older records keep
        their keys."""
        record = asdict(self)
        for key in ("crop_side", "short_side"):
            if record[key] is None:
                del record[key]
        return record


def arrive(pixels: np.ndarray, rng: np.random.Generator, recipe: ArrivalRecipe = ArrivalRecipe()) -> tuple[np.ndarray, str]:
    """One arrival of RGB uint8 ``pixels``: the new pixels and a short description of what was done."""
    h, w = pixels.shape[:2]
    steps = []
    crop = rng.random() < recipe.crop_p
    if crop and recipe.crop_side is not None:
        side = float(np.exp(rng.uniform(np.log(recipe.crop_side[0]), np.log(recipe.crop_side[1]))))
        ch = cw = int(min(h, w, max(recipe.min_side, round(side))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        pixels = pixels[top : top + ch, left : left + cw]
        steps.append(f"close-up {cw}x{ch}")
    elif crop:
        lo, hi = np.log(recipe.crop_area[0]), np.log(recipe.crop_area[1])
        area = float(np.exp(rng.uniform(lo, hi)))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        ch = int(min(h, max(recipe.min_side, round(np.sqrt(area * h * w / aspect)))))
        cw = int(min(w, max(recipe.min_side, round(np.sqrt(area * h * w * aspect)))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        pixels = pixels[top : top + ch, left : left + cw]
        steps.append(f"crop {cw}x{ch}")
    if rng.random() < recipe.downscale_p:
        ph, pw = pixels.shape[:2]
        if recipe.short_side is not None:
            side = float(np.exp(rng.uniform(np.log(recipe.short_side[0]), np.log(recipe.short_side[1]))))
            factor = side / max(1, min(ph, pw))
        else:
            factor = float(rng.uniform(*recipe.downscale))
        factor = max(factor, recipe.min_side / max(1, min(ph, pw)))
        if factor < 1:
            size = (max(1, round(pw * factor)), max(1, round(ph * factor)))
            pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.Resampling.BICUBIC))
            steps.append(f"downscale {factor:.2f}")
    u = rng.random()
    if u < recipe.jpeg_p:
        q = int(rng.integers(recipe.jpeg_quality[0], recipe.jpeg_quality[1] + 1))
        pixels, step = reencode(pixels, "JPEG", q), f"jpeg {q}"
    elif u < recipe.jpeg_p + recipe.webp_p:
        q = int(rng.integers(recipe.webp_quality[0], recipe.webp_quality[1] + 1))
        pixels, step = reencode(pixels, "WEBP", q), f"webp {q}"
    else:
        pixels, step = reencode(pixels, "PNG"), "png"
    steps.append(step)
    return np.ascontiguousarray(pixels), ", ".join(steps)
