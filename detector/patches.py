"""Where to cut an image into the crops the network scores, without resizing.

Two plans:

* :func:`full_plan` covers the whole image. Small images are one crop. Larger ones are cut into
  tiles whose *core* regions partition the image; each tile is the core plus at least a margin of
  context on every side (edge tiles take more from the inner side, so that all tiles share one
  shape). Only the logit-map cells of the core are kept, so when the margin is at least
  the network's receptive-field radius, the stitched map equals the map of the untiled image
  (up to float rounding) and the image logit is unchanged. With a smaller margin, cells near a
  core's border see zero padding where the untiled network saw pixels, and the logit drifts by
  an amount that shrinks as the margin grows (tests measure it).
* :func:`patch_plan` picks ``num_patches`` crops of ``patch_size`` px on an even grid or at seeded
  random positions; their logits are fused by a rule of :mod:`detector.fusion`.

All crop origins are multiples of ``align`` (8 by default): this keeps the JPEG 8x8 block grid in
the same phase in every crop, and aligns crops to the cells of the logit map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Crop", "PatchSettings", "encoder_views", "full_plan", "patch_plan", "map_cells", "relevant_settings"]


@dataclass(frozen=True)
class Crop:
    """A crop box ``[top, bottom) x [left, right)`` and the core region of it that counts."""

    top: int
    left: int
    bottom: int
    right: int
    core_top: int
    core_left: int
    core_bottom: int
    core_right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    @property
    def core_area(self) -> int:
        return (self.core_bottom - self.core_top) * (self.core_right - self.core_left)

    def cut(self, pixels: np.ndarray) -> np.ndarray:
        """The crop's pixels from an ``(H, W, C)`` array (a view, no copy)."""
        return pixels[self.top : self.bottom, self.left : self.right]


def _whole(h: int, w: int) -> Crop:
    return Crop(0, 0, h, w, 0, 0, h, w)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def full_plan(height: int, width: int, *, tile_size: int = 512, margin: int = 64, align: int = 8) -> list[Crop]:
    """Crops covering the whole image: one if it fits in ``tile_size``, else overlapping tiles.

    ``tile_size`` bounds the core of each tile (rounded up to ``align``); each tile adds up to
    ``margin`` px of context on each side (rounded up to ``align``), so a tile is at most
    ``tile_size + 2 * margin + align - 1`` px a side and memory stays bounded whatever the image
    size. All tiles of an image share one shape.
    """
    if tile_size <= 0 or margin < 0:
        raise ValueError(f"tile_size must be positive and margin non-negative, got {tile_size}, {margin}")
    if height <= tile_size and width <= tile_size:
        return [_whole(height, width)]
    tile = _round_up(tile_size, align)
    margin = _round_up(margin, align)
    side = tile + 2 * margin
    crops = []
    for ct in range(0, height, tile):
        cb = min(ct + tile, height)
        top, bottom = _window(ct, cb, height, side, margin, align)
        for cl in range(0, width, tile):
            cr = min(cl + tile, width)
            left, right = _window(cl, cr, width, side, margin, align)
            crops.append(Crop(top, left, bottom, right, ct, cl, cb, cr))
    return crops


def _window(core_start: int, core_end: int, length: int, side: int, margin: int, align: int) -> tuple[int, int]:
    """A crop of ``side`` px around a core, shifted inwards at the image's edges.

    Every tile of an image gets the same shape (when the image is at least ``side`` long): edge
    tiles take their context from the inner side instead of shrinking. When ``length - side`` is
    not a multiple of ``align``, every tile is up to ``align - 1`` px longer than ``side``. Same shapes batch together
    and reuse the same activation buffers, which keeps memory from fragmenting on huge images;
    extra context never changes the kept cells.
    """
    if length <= side:
        return 0, length
    # The last tile must end at the image's end from an aligned start: it is ``side`` plus the
    # remainder of ``length - side`` modulo ``align``, and every other tile takes that length too.
    last = (length - side) // align * align
    side += (length - side) - last
    start = min(max(0, core_start - margin), last)
    return start, start + side


def patch_plan(
    height: int,
    width: int,
    *,
    patch_size: int = 256,
    num_patches: int = 8,
    layout: str = "grid",
    seed: int = 0,
    align: int = 8,
) -> list[Crop]:
    """``num_patches`` crops of ``patch_size`` px, on an even grid or at seeded random places.

    An image no larger than a patch in a dimension is used whole in that dimension. Duplicate
    positions (small images) are dropped, so a small image yields fewer patches.
    """
    if patch_size <= 0 or num_patches <= 0:
        raise ValueError(f"patch_size and num_patches must be positive, got {patch_size}, {num_patches}")
    ph, pw = min(patch_size, height), min(patch_size, width)
    max_top, max_left = height - ph, width - pw
    if layout == "grid":
        rows = max(1, int(math.floor(math.sqrt(num_patches))))
        cols = int(math.ceil(num_patches / rows))
        positions = []
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            # evenly spread from edge to edge; a single row or column is centred
            top = round(max_top * r / (rows - 1)) if rows > 1 else max_top // 2
            left = round(max_left * c / (cols - 1)) if cols > 1 else max_left // 2
            positions.append((top, left))
        positions = positions[:num_patches]
    elif layout == "random":
        rng = np.random.default_rng(seed)
        positions = [(int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1))) for _ in range(num_patches)]
    else:
        raise ValueError(f"layout must be 'grid' or 'random', got {layout!r}")
    crops, seen = [], set()
    for top, left in positions:
        top, left = (top // align) * align, (left // align) * align
        if (top, left) in seen:
            continue
        seen.add((top, left))
        crops.append(Crop(top, left, top + ph, left + pw, top, left, top + ph, left + pw))
    return crops


def map_cells(crop: Crop, stride: int) -> tuple[slice, slice]:
    """The cells of a crop's logit map that lie in its core (the map has ``ceil(size/stride)`` cells)."""
    r0 = (crop.core_top - crop.top) // stride
    c0 = (crop.core_left - crop.left) // stride
    r1 = int(math.ceil((crop.core_bottom - crop.top) / stride))
    c1 = int(math.ceil((crop.core_right - crop.left) / stride))
    return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))


MODES = ("full", "patches")
LAYOUTS = ("grid", "random")
# The fields of PatchSettings that change the crops in each mode (the others are ignored there).
MODE_FIELDS = {"full": ("tile_size", "margin"), "patches": ("patch_size", "num_patches", "layout", "seed")}


def relevant_settings(settings: dict) -> dict:
    """``mode`` and the fields of a :class:`PatchSettings` dict that apply in that mode: what resume
    checks and cache keys compare, so that an option without effect never makes a score differ."""
    mode = settings.get("mode")
    return {"mode": mode, **{k: settings.get(k) for k in MODE_FIELDS.get(mode, ())}}


@dataclass(frozen=True)
class PatchSettings:
    """How an image is cut for scoring; every field is a scan/evaluate option of the same name."""

    mode: str = "patches"
    patch_size: int = 256
    num_patches: int = 8
    layout: str = "grid"
    seed: int = 0
    tile_size: int = 512
    margin: int | None = None  # None: the network's receptive-field radius (Detector.resolve_settings)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def plan(self, height: int, width: int, align: int = 8) -> list[Crop]:
        """The crops of an image of this size."""
        if self.mode == "full":
            margin = 128 if self.margin is None else self.margin
            return full_plan(height, width, tile_size=self.tile_size, margin=margin, align=align)
        return patch_plan(
            height, width, patch_size=self.patch_size, num_patches=self.num_patches,
            layout=self.layout, seed=self.seed, align=align,
        )


VIEW_MODES = ("crop", "resize", "resize+crop")


def encoder_views(pixels: np.ndarray, *, size: int = 224, n: int = 1, mode: str = "crop") -> np.ndarray:
    """``(k, size, size, 3)`` uint8 views of an image for a pretrained encoder (``k <= n``).

    ``crop`` cuts ``n`` grid crops of ``size`` px at native resolution (the traces a generator
    leaves survive); only an image smaller than ``size`` is first enlarged (bicubic) to that
    size. ``resize`` is CLIP's own preprocessing: the short side is resized (bicubic) to ``size``,
    then ``n`` grid crops are cut (``n = 1``: the centre crop). ``resize+crop`` is the ``resize``
    view (one) followed by ``n - 1`` ``crop`` views: what the whole picture shows and what its
    pixels show at native resolution, for ``n >= 2``.
    """
    from PIL import Image

    if mode not in VIEW_MODES:
        raise ValueError(f"view mode must be one of {VIEW_MODES}, got {mode!r}")
    if mode == "resize+crop":
        if n < 2:
            raise ValueError("the resize+crop view mode needs n >= 2 (one resized view and n - 1 crops)")
        return np.concatenate([encoder_views(pixels, size=size, n=1, mode="resize"),
                               encoder_views(pixels, size=size, n=n - 1, mode="crop")])
    h, w = pixels.shape[:2]
    short = min(h, w)
    if short < size or (mode == "resize" and short != size):
        scale = size / short
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(new, Image.Resampling.BICUBIC))
    crops = patch_plan(pixels.shape[0], pixels.shape[1], patch_size=size, num_patches=n, align=1)
    return np.stack([np.ascontiguousarray(c.cut(pixels)) for c in crops])
