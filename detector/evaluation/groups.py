"""Models' columns, their fusion, the groups metrics are computed on, and the tidy metric table.

Groups follow Corvi et al. 2023: each generator's fakes against *all* reals pooled, each family
(when the data names families), all fakes against all reals, and ``average``, the mean of the
generator rows. The bias breakdown restricts *both* classes to one file format or one resolution
bucket, so a result that the container explains collapses there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .. import metrics as M
from ..fusion import fuse_margins

__all__ = ["METRIC_COLUMNS", "Group", "ModelSpec", "breakdown_groups", "fuse_models", "group_metrics",
           "metric_groups", "model_names", "size_bucket", "with_fusion"]

METRIC_COLUMNS = ["group", "model", "metric", "value"]
RESERVED_GROUPS = ("all", "average")
_SIZE_EDGES = (256, 512, 1024, 2048)
# A group whose own images (a generator's fakes, a source's reals) are fewer than this gets no
# bootstrap interval (one image gives [1.000, 1.000]) and a ``small`` mark in the tables.
MIN_GROUP = 5


@dataclass(frozen=True)
class ModelSpec:
    """A column of logits and how to read it: the threshold and the temperature of its model, and the
    shortest side of an image it gives a verdict (0: every image; smaller ones are ``too small``)."""

    name: str
    threshold: float = 0.0
    temperature: float = 1.0
    min_side: int = 0

    @property
    def column(self) -> str:
        return f"logit_{self.name}"

    def margin(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated margin ``(logit - threshold) / temperature``: the logit of the calibrated
        probability, positive exactly where the model says "generated"."""
        return (np.asarray(logits, dtype=np.float64) - self.threshold) / self.temperature


def model_names(stems: Sequence[str]) -> list[str]:
    names: list[str] = []
    for stem in stems:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "model"
        if base == "fused":
            base = "fused_model"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def fuse_models(logits: np.ndarray, models: Sequence[ModelSpec], rule: str = "mean",
                weights: Sequence[float] | None = None) -> tuple[np.ndarray, ModelSpec]:
    """Fuse the logits ``(n_images, n_models)`` of several models into one calibrated logit per image.

    Each model's logits become its calibrated margin (:meth:`ModelSpec.margin`), which is positive
    exactly where that model says "generated"; ``rule`` (``mean``, ``max`` or ``soft-or``) combines
    the margins with :func:`detector.fusion.fuse_margins`, as ``scan`` does. Returns the fused logits and the fused model (name ``fused``, threshold 0,
    temperature 1): so ``max`` says "generated" exactly when some model does, and ``soft-or``
    when ``1 - prod(1 - p_i) >= 0.5`` for the models' calibrated probabilities ``p_i``. A NaN in
    a row gives NaN.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(models):
        raise ValueError(f"logits must be (n_images, {len(models)}), got {z.shape}")
    margins = np.stack([m.margin(z[:, k]) for k, m in enumerate(models)], axis=1)
    say = weights if weights is not None else [1.0] * len(models)
    min_side = max((m.min_side for m, w in zip(models, say) if w > 0), default=0)  # as Ensemble.min_side
    return fuse_margins(margins, rule, weights=weights), ModelSpec("fused", threshold=0.0, temperature=1.0,
                                                                    min_side=min_side)


@dataclass(frozen=True)
class Group:
    """A set of rows metrics are computed on: ``kind`` is generator, family, real-source, all, format or size."""

    name: str
    kind: str
    mask: np.ndarray


def metric_groups(df: pd.DataFrame) -> list[Group]:
    """Each generator's fakes with all reals, each family's (if the data names families), each real-photo
    source's reals with all fakes (when there are several sources: a detector can learn one photo
    collection's look instead of generation traces), then all."""
    real = (df["label"] == 0).to_numpy()
    fake = ~real
    groups = []
    generators = sorted(set(df.loc[fake, "generator"]))
    for g in generators:
        name = f"generator:{g}" if g in RESERVED_GROUPS else g
        groups.append(Group(name, "generator", real | (fake & (df["generator"] == g).to_numpy())))
    if (df.loc[fake, "family"] != df.loc[fake, "generator"]).any():
        for f in sorted(set(df.loc[fake, "family"])):
            groups.append(Group(f"family:{f}", "family", real | (fake & (df["family"] == f).to_numpy())))
    sources = sorted(set(df.loc[real, "source"].astype(str)))
    if len(sources) > 1:
        for source in sources:
            groups.append(Group(f"real:{source}", "real-source", fake | (real & (df["source"].astype(str) == source).to_numpy())))
    groups.append(Group("all", "all", np.ones(len(df), dtype=bool)))
    return groups


def size_bucket(width: float, height: float) -> str:
    """The resolution bucket of an image, by its shorter side: ``<256``, ``256-511`` ... ``>=2048``."""
    if not (np.isfinite(width) and np.isfinite(height)):
        return "unknown"
    short = min(width, height)
    lower = 0
    for edge in _SIZE_EDGES:
        if short < edge:
            return f"<{edge}" if lower == 0 else f"{lower}-{edge - 1}"
        lower = edge
    return f">={_SIZE_EDGES[-1]}"


def breakdown_groups(df: pd.DataFrame) -> list[Group]:
    """Both classes restricted to one file format, then to one resolution bucket (the bias breakdown)."""
    groups = []
    formats = df["format"].fillna("").replace("", "unknown")
    for f in sorted(set(formats)):
        groups.append(Group(f"format:{f}", "format", (formats == f).to_numpy()))
    buckets = np.array([size_bucket(w, h) for w, h in zip(df["width"].astype(float), df["height"].astype(float))])
    order = ["<256", *[f"{a}-{b - 1}" for a, b in zip(_SIZE_EDGES, _SIZE_EDGES[1:])], f">={_SIZE_EDGES[-1]}", "unknown"]
    for b in order:
        if (buckets == b).any():
            groups.append(Group(f"size:{b}", "size", buckets == b))
    return groups


def group_metrics(
    df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group], *, n_boot: int = 1000, seed: int = 0,
    average: bool = True,
) -> pd.DataFrame:
    """Tidy metrics (group, model, metric, value) of every group and model, via :func:`metrics.summary`.

    Rows whose logit is NaN (unreadable files) are left out. A model with a minimum size gives no
    verdict on the rows whose ``short_side`` (the side it saw; without that column the stored
    ``width`` and ``height``) is under it (see :func:`metrics.summary`). With ``average``, an ``average`` row
    is the mean over the generator groups of each metric, except ``n_fake``, which is their sum,
    and the AUC interval, which is a bootstrap of the mean AUC (:func:`metrics.mean_auc_interval`). The
    ``all`` row adds intervals of the label's FPR and recall over whole sources and families
    (:func:`label_intervals`).
    """
    labels = df["label"].to_numpy(dtype=int)
    sides = short_sides(df)
    rows = []
    for model in models:
        scores = df[model.column].to_numpy(dtype=np.float64)
        valid = np.isfinite(scores)
        judged = ~(sides < model.min_side) if model.min_side else None  # an unknown size is judged, as in a scan
        per_generator, generator_fakes = [], []
        for group in groups:
            keep = group.mask & valid
            small = _own_images(group, keep, labels) < MIN_GROUP
            values = M.summary(labels[keep], scores[keep], threshold=model.threshold, temperature=model.temperature,
                               n_boot=0 if small else n_boot, seed=seed, judged=None if judged is None else judged[keep])
            rows.extend((group.name, model.name, k, float(v)) for k, v in values.items())
            if group.kind == "all" and n_boot:
                called = M.label_calls(scores, model.threshold, judged)
                rows.extend((group.name, model.name, k, v) for k, v in
                            label_intervals(df, labels, called, keep, n_boot=n_boot, seed=seed).items())
            if small:
                rows.append((group.name, model.name, "small", 1.0))
            if group.kind == "generator":
                per_generator.append(values)
                generator_fakes.append(scores[keep & (labels == 1)])
        if average and per_generator:
            mean = pd.DataFrame(per_generator).mean(axis=0, skipna=False)
            mean["n_fake"] = float(sum(v["n_fake"] for v in per_generator))
            mean["auc_low"], mean["auc_high"] = M.mean_auc_interval(scores[valid & (labels == 0)], generator_fakes,
                                                                    n_boot=n_boot, seed=seed)
            rows.extend(("average", model.name, k, float(v)) for k, v in mean.items())
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def label_intervals(df: pd.DataFrame, labels: np.ndarray, called: np.ndarray, keep: np.ndarray, *,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """95% intervals of the default label's false-positive rate and recall that resample whole groups:
    real photos by ``source`` (no interval without it), generated images by ``family`` (else
    ``generator``). A collection the detector misreads moves the rate by all its images at once, so an
    interval over images would be too narrow (:func:`metrics.grouped_rate_interval`). Rows outside
    ``keep`` are left out."""
    out = {}
    family = "family" if "family" in df else "generator"
    for label, name, column in ((0, "label_fpr", "source"), (1, "label_recall", family)):
        rows = keep & (labels == label)
        if column not in df or not rows.any():
            continue
        low, high = M.grouped_rate_interval(called[rows], df[column].astype(str).to_numpy()[rows],
                                            n_boot=n_boot, seed=seed)
        out[f"{name}_low"], out[f"{name}_high"] = low, high
    return out


def short_sides(df: pd.DataFrame) -> np.ndarray:
    """Each row's shorter side as the models saw it: ``short_side`` (written per condition by the
    scoring), else the smaller of ``width`` and ``height``; NaN where unknown."""
    if "short_side" in df:
        return df["short_side"].to_numpy(dtype=np.float64)
    if "width" in df and "height" in df:
        return np.fmin(df["width"].to_numpy(dtype=np.float64), df["height"].to_numpy(dtype=np.float64))
    return np.full(len(df), np.nan)


def _own_images(group: Group, keep: np.ndarray, labels: np.ndarray) -> int:
    """The images that make a group what it is: a generator's or family's fakes, a source's reals, or all."""
    if group.kind in ("generator", "family"):
        return int((keep & (labels == 1)).sum())
    if group.kind == "real-source":
        return int((keep & (labels == 0)).sum())
    return int(keep.sum())


def with_fusion(frames: dict[str, pd.DataFrame], models: Sequence[ModelSpec], rule: str,
                weights: Sequence[float] | None = None) -> list[ModelSpec]:
    """Add the fused column to every frame when more than one model votes (weight > 0); the models to
    report. With one voting model the fused column would repeat its rows."""
    voting = len(models) if weights is None else sum(1 for w in weights if w > 0)
    if len(models) < 2 or voting < 2:
        return list(models)
    fused = None
    for df in frames.values():
        df["logit_fused"], fused = fuse_models(df[[m.column for m in models]].to_numpy(), models, rule, weights)
    return [*models, fused]


