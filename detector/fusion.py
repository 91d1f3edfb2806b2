"""Rules that fuse scores: an image's patch logits into one logit, and several models into one.

Plain functions of arrays. Patches (:func:`fuse`): ``mean`` is what the published detectors do
over the logit map; ``max`` flags an image if any part looks generated (local edits, splices);
``median`` and ``trimmed`` resist a few outlying patches; ``lse`` (log-mean-exp) is a smooth
maximum that lies between the mean and the max.

Models (:func:`fuse_margins`) are fused on their *calibrated* logits (margins, see
:meth:`detector.checkpoints.CheckpointInfo.margin`), where 0 is each model's own decision point:
``mean`` averages them (GRIP's ClipBased release averages the logits of its CLIP detector and of
Corvi et al.'s network); ``max`` follows the most suspicious model; ``soft-or`` is the
probability that at least one model is right to call the image generated, ``1 - prod(1 - p_i)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .patches import Crop, map_cells

__all__ = ["FUSION_RULES", "MODEL_FUSION_RULES", "fuse", "fuse_margins", "combine_crops"]

FUSION_RULES = ("mean", "max", "median", "trimmed", "lse")
MODEL_FUSION_RULES = ("mean", "max", "soft-or")


def fuse(logits: np.ndarray, rule: str = "mean", *, weights: np.ndarray | None = None, trim: float = 0.2) -> float:
    """Fuse patch logits ``(n,)`` into one logit.

    ``weights`` (e.g. patch areas) apply to ``mean`` only. ``trimmed`` drops the ``trim``
    fraction of lowest and of highest logits before averaging (at least one value is kept).
    """
    values = np.asarray(logits, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot fuse an empty set of logits")
    if rule == "mean":
        return float(np.average(values, weights=weights))
    if rule == "max":
        return float(values.max())
    if rule == "median":
        return float(np.median(values))
    if rule == "trimmed":
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        ordered = np.sort(values)
        k = int(np.floor(trim * values.size))
        kept = ordered[k : values.size - k] if values.size - 2 * k > 0 else ordered
        return float(kept.mean())
    if rule == "lse":
        peak = values.max()
        return float(peak + np.log(np.mean(np.exp(values - peak))))
    raise ValueError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")


def _core_values(crop: Crop, cell_map: np.ndarray, stride: int) -> np.ndarray:
    """Map cells of a crop's core; a map of another shape (a pooled model) counts as one cell."""
    h, w = crop.shape
    if cell_map.shape == (math.ceil(h / stride), math.ceil(w / stride)):
        return cell_map[map_cells(crop, stride)]
    return np.full((1, 1), float(cell_map.mean()))


def combine_crops(
    crops: Sequence[Crop],
    maps: Sequence[np.ndarray],
    *,
    mode: str,
    rule: str = "mean",
    stride: int = 8,
    height: int,
    width: int,
) -> tuple[float, np.ndarray]:
    """The image logit and its logit map (``ceil(H/stride) x ceil(W/stride)``, NaN where unscored).

    ``full`` mode averages the core cells of all tiles, weighting each cell alike, which equals
    the untiled image's logit when tiles carry enough margin. ``patches`` mode fuses the patch
    logits (each the mean of its map) with ``rule``.
    """
    if len(crops) != len(maps) or not crops:
        raise ValueError(f"need one map per crop, got {len(crops)} crops and {len(maps)} maps")
    total = np.zeros((math.ceil(height / stride), math.ceil(width / stride)))
    count = np.zeros_like(total)
    core_sum = core_n = 0.0
    for crop, cell_map in zip(crops, maps):
        cells = _core_values(crop, np.asarray(cell_map, dtype=np.float64), stride)
        r0, c0 = crop.core_top // stride, crop.core_left // stride
        rows, cols = min(cells.shape[0], total.shape[0] - r0), min(cells.shape[1], total.shape[1] - c0)
        total[r0 : r0 + rows, c0 : c0 + cols] += cells[:rows, :cols]
        count[r0 : r0 + rows, c0 : c0 + cols] += 1
        if cells.size == 1 and crop.core_area > stride * stride:
            core_sum += float(cells.mean()) * crop.core_area
            core_n += crop.core_area
        else:
            core_sum += float(cells.sum())
            core_n += cells.size
    with np.errstate(invalid="ignore", divide="ignore"):
        canvas = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if mode == "full":
        return core_sum / core_n, canvas
    if mode == "patches":
        return fuse(np.array([float(np.mean(m)) for m in maps]), rule), canvas
    raise ValueError(f"mode must be 'full' or 'patches', got {mode!r}")


def fuse_margins(margins: np.ndarray, rule: str = "mean", *, weights: np.ndarray | None = None) -> np.ndarray:
    """Fuse calibrated logits ``(n_images, n_models)`` into one calibrated logit per image.

    The result is again a margin: ``sigmoid`` of it is the fused probability, and it is >= 0
    exactly when the fused decision is "generated". A NaN in a row gives NaN. ``weights`` (one per
    model, >= 0, not all 0) weight the ``mean``; for ``max`` and ``soft-or`` a model of weight 0
    takes no part. A model of weight 0 is scored and reported but does not decide.
    """
    z = np.asarray(margins, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"margins must be (n_images, n_models), got shape {z.shape}")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (z.shape[1],) or (w < 0).any() or not w.any() or not np.isfinite(w).all():
            raise ValueError(f"weights must be {z.shape[1]} finite values >= 0, not all 0; got {weights!r}")
        if rule == "mean":
            return (z * w).sum(axis=1) / w.sum()
        z = z[:, w > 0]
    if rule == "mean":
        return z.mean(axis=1)
    if rule == "max":
        return z.max(axis=1)
    if rule == "soft-or":
        # log prod(1 - p_i) = -sum softplus(z_i); logit(1 - prod(1 - p_i)) = log(1 - e^s) - s
        with np.errstate(invalid="ignore"):
            s = -np.logaddexp(0.0, z).sum(axis=1)
            return np.log(-np.expm1(np.minimum(s, -1e-300))) - s
    raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {rule!r}")
