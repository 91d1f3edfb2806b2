"""The evaluation's plots: ROC curves per generator and score histograms per class, one panel per model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import metrics as M
from ..checkpoints import atomic_write
from .groups import Group, ModelSpec

__all__ = ["plot_roc", "plot_scores"]


def _colour(k: int, n: int):
    """Distinct line colours: matplotlib's ten, or tab20 for more groups."""
    if n <= 10:
        return f"C{k}"
    from matplotlib import colormaps

    return colormaps["tab20"](k % 20)


def plot_roc(path: Path, df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group]) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    shown = [g for g in groups if g.kind in ("generator", "all")]
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    labels = df["label"].to_numpy(dtype=int)
    for ax, model in zip(axes, models):
        scores = df[model.column].to_numpy(dtype=np.float64)
        for k, group in enumerate(shown):
            keep = group.mask & np.isfinite(scores)
            if len(set(labels[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(labels[keep], scores[keep])
            style = ({"color": "black", "lw": 3.0, "alpha": 0.45, "zorder": 1} if group.kind == "all"
                     else {"color": _colour(k, len(shown) - 1), "lw": 1.3, "zorder": 2})
            ax.plot(fpr, tpr, label=f"{group.name} (AUC {M.auc(labels[keep], scores[keep]):.3f})", **style)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-alarm rate (reals called fake)",
               ylabel="detection rate (fakes caught)", title=f"ROC: {model.name}")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(models):]:
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_scores(path: Path, df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group]) -> None:
    from matplotlib.figure import Figure

    generators = [g for g in groups if g.kind == "generator"]
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    real = (df["label"] == 0).to_numpy()
    for ax, model in zip(axes, models):
        scores = df[model.column].to_numpy(dtype=np.float64)
        finite = np.isfinite(scores)
        if not finite.any():
            continue
        lo, hi = float(scores[finite].min()), float(scores[finite].max())
        bins = np.linspace(lo - 1e-6, hi + 1e-6, 41)
        ax.hist(scores[real & finite], bins=bins, density=True, color="grey", alpha=0.5,
                label=f"real ({(real & finite).sum()})")
        for k, group in enumerate(generators):
            keep = group.mask & ~real & finite
            if keep.any():
                ax.hist(scores[keep], bins=bins, density=True, histtype="step", lw=1.4,
                        color=_colour(k, len(generators)), label=f"{group.name} ({keep.sum()})")
        ax.axvline(model.threshold, color="black", ls="--", lw=1, label=f"threshold {model.threshold:.3g}")
        ax.set(xlabel="logit", ylabel="density", title=f"scores: {model.name}")
        ax.legend(fontsize=7)
    for ax in axes[len(models):]:
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


