"""The training augmentation recipe (defaults after Gragnaniello et al. 2021).

Every random choice comes from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of (image, seed): that is what makes a resumed run identical to an uninterrupted one.

**Why ``jpeg_align``.** Real photos usually arrive as JPEG and generated images as PNG (in the
dev data: every fake is PNG, 87% of reals JPEG). A network trained on that learns "JPEG traces =
real" and then calls every PNG photo fake and every JPEG-shared fake real. With ``jpeg_align``
both classes get the same compression history: an image that was never JPEG-compressed is first
compressed at a quality drawn from the JPEG qualities of the training set, then every crop, of
either class, is compressed again at a quality drawn from ``align_quality``, each at a random
8x8-grid phase. Format no longer separates the classes; generation traces must.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..images import gaussian_blur, reencode_jpeg

__all__ = ["Recipe", "augment", "validation_crops"]


@dataclass(frozen=True)
class Recipe:
    """Augmentation settings; each field is a ``detector train`` option."""

    crop_size: int = 96
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 100)
    jpeg_align: bool = True
    align_quality: tuple[int, int] = (65, 100)
    rotate_flip: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _random_crop(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = pixels.shape[:2]
    ch, cw = min(size, h), min(size, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return pixels[top : top + ch, left : left + cw]


def augment(
    pixels: np.ndarray,
    recipe: Recipe,
    rng: np.random.Generator,
    *,
    was_jpeg: bool,
    prior_qualities: np.ndarray | None = None,
) -> np.ndarray:
    """One training crop ``(crop_size, crop_size, 3)`` uint8 from an image's RGB pixels.

    Images smaller than the crop give a smaller crop; the caller keeps them out of batches.
    The random draws do not depend on ``was_jpeg`` or on the pixels, only on the image's size:
    an aligned twin and its real photo given generators in the same state are cut and
    augmented alike.
    """
    size = recipe.crop_size
    if recipe.jpeg_align:
        region = _random_crop(pixels, size + 16, rng)
        q = int(rng.choice(prior_qualities)) if prior_qualities is not None and len(prior_qualities) else 90
        if not was_jpeg:
            region = reencode_jpeg(region, q)
        region = _random_crop(region, size + 8, rng)  # a new 8x8 grid phase for the second pass
        lo, hi = recipe.align_quality
        region = reencode_jpeg(region, int(rng.integers(lo, hi + 1)))
    else:
        region = _random_crop(pixels, size + 8, rng)
    if rng.random() < recipe.blur_p:
        region = gaussian_blur(region, float(rng.uniform(*recipe.blur_sigma)))
    if rng.random() < recipe.jpeg_p:
        lo, hi = recipe.jpeg_quality
        region = reencode_jpeg(region, int(rng.integers(lo, hi + 1)))
    crop = _random_crop(region, size, rng)
    if recipe.rotate_flip:
        crop = np.rot90(crop, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def validation_crops(pixels: np.ndarray, size: int, n: int = 4, quality: int | None = 90) -> list[np.ndarray]:
    """Fixed crops for validation: ``n`` aligned crops spread over the image, JPEG-aligned.

    Every image, of either class, is re-encoded at ``quality`` (the same in-memory alignment as
    ``detector evaluate --align-jpeg``), so validation figures are not format figures.
    """
    from ..patches import patch_plan

    if quality is not None:
        pixels = reencode_jpeg(pixels, quality)
    crops = patch_plan(pixels.shape[0], pixels.shape[1], patch_size=size, num_patches=n)
    return [np.ascontiguousarray(c.cut(pixels)) for c in crops]
