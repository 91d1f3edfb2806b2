"""Detection metrics: plain functions of ``(labels, scores)``, no hidden state.

``labels`` are 0 (real) / 1 (generated); ``scores`` are logits (higher = more likely generated).
Where scikit-learn has the metric it does the work. A legal input that leaves a metric undefined
(one class only) gives NaN with a warning, as scikit-learn does; an invalid input raises.

References: EER and detection at a false-alarm rate as in the forensic literature (e.g. Corvi et
al. 2023 report AUC and accuracy; Pd@FAR is the operating point analysts actually choose);
ECE as in Guo et al. 2017, "On calibration of modern neural networks" (15 equal-width bins).
"""

from __future__ import annotations

import warnings

import numpy as np

# scipy.stats and sklearn.metrics are imported where they are used: together they take about half
# a second to import, which `detector scan` (it needs only :func:`sigmoid`) should not pay.

__all__ = [
    "sigmoid",
    "auc",
    "auc_interval",
    "mean_auc_interval",
    "average_precision",
    "accuracy_real",
    "accuracy_fake",
    "balanced_accuracy",
    "equal_error_rate",
    "detection_at_far",
    "threshold_at_far",
    "best_threshold",
    "expected_calibration_error",
    "logloss",
    "summary",
]


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D arrays of one length, got {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return y.astype(int), s


def _both_classes(y: np.ndarray, name: str) -> bool:
    if y.size == 0 or y.min() == y.max():
        warnings.warn(f"{name} is undefined with only one class present; returning NaN", stacklevel=3)
        return False
    return True


def sigmoid(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable logistic function of ``x / temperature``."""
    z = np.asarray(x, dtype=np.float64) / temperature
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (threshold-free)."""
    y, s = _check(labels, scores)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if _both_classes(y, "AUC") else float("nan")


def _resampled_aucs(real: np.ndarray, fakes: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, len(fakes))`` AUCs of bootstrap resamples: one resample of the reals per replicate,
    shared by every group, and one of each group's fakes."""
    from scipy.stats import rankdata

    out = np.empty((n_boot, len(fakes)))
    # Mann-Whitney form of the AUC on all resamples at once (ties count one half, as in sklearn),
    # in chunks that keep the rank matrix small.
    chunk = max(1, 4_000_000 // (real.size + max(f.size for f in fakes)))
    for start in range(0, n_boot, chunk):
        n = min(chunk, n_boot - start)
        r = real[rng.integers(0, real.size, (n, real.size))]
        for g, fake in enumerate(fakes):
            f = fake[rng.integers(0, fake.size, (n, fake.size))]
            ranks = rankdata(np.concatenate([r, f], axis=1), axis=1)
            fake_ranks = ranks[:, real.size :].sum(axis=1)
            out[start : start + n, g] = (fake_ranks - fake.size * (fake.size + 1) / 2) / (real.size * fake.size)
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def auc_interval(
    labels: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling reals and fakes separately."""
    y, s = _check(labels, scores)
    if not _both_classes(y, "AUC interval"):
        return float("nan"), float("nan")
    aucs = _resampled_aucs(s[y == 0], [s[y == 1]], n_boot, np.random.default_rng(seed))
    return _percentiles(aucs[:, 0], level)


def mean_auc_interval(
    real: np.ndarray, fakes: list[np.ndarray], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups of AUC(reals, group's fakes).

    The interval of Corvi et al.'s ``average`` row: each replicate resamples the pooled reals once
    (every group is measured against them) and each group's fakes, then averages the groups' AUCs.
    NaN when there are no reals or a group has no fakes.
    """
    real = np.asarray(real, dtype=np.float64)
    fakes = [np.asarray(f, dtype=np.float64) for f in fakes]
    if not fakes or real.size == 0 or any(f.size == 0 for f in fakes) or n_boot < 1:
        return float("nan"), float("nan")
    if not (np.isfinite(real).all() and all(np.isfinite(f).all() for f in fakes)):
        raise ValueError("scores contain NaN or infinity")
    aucs = _resampled_aucs(real, fakes, n_boot, np.random.default_rng(seed))
    return _percentiles(aucs.mean(axis=1), level)


def label_calls(scores: np.ndarray, threshold: float = 0.0, judged: np.ndarray | None = None) -> np.ndarray:
    """Where the default label says "generated": the score reaches the threshold and the image got a
    verdict (``judged``; an image under a detector's minimum size gets none)."""
    called = np.asarray(scores, dtype=np.float64) >= threshold
    return called if judged is None else called & np.asarray(judged, dtype=bool)


def grouped_rate_interval(
    hits: np.ndarray, groups: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a rate (a label's false-positive rate or recall) that resamples
    whole groups (photo sources, generator families) rather than images.

    Images of one source are not independent draws: a collection that the detector misreads moves the
    rate by all its images at once, so an interval over images is too narrow. Each replicate draws as
    many groups as there are, with replacement, and pools their images. NaN with fewer than two groups
    (one group's images cannot say how another group would fare).
    """
    hits = np.asarray(hits, dtype=bool)
    groups = np.asarray(groups)
    if hits.shape != groups.shape:
        raise ValueError(f"hits and groups differ in shape: {hits.shape} vs {groups.shape}")
    _, index = np.unique(groups, return_inverse=True)
    if index.size == 0 or index.max() < 1 or n_boot < 1:
        return float("nan"), float("nan")
    k = np.bincount(index, weights=hits).astype(np.float64)
    n = np.bincount(index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(n), size=(n_boot, len(n)))
    return _percentiles(k[draws].sum(axis=1) / n[draws].sum(axis=1), level)


def auc_difference_interval(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``AUC(scores_a) - AUC(scores_b)`` on the same images.

    Each replicate resamples the reals and the fakes separately and scores both on the same resample, so
    what the two score alike cancels: an interval that holds 0 says the images cannot tell them apart.
    """
    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    if not _both_classes(y, "AUC difference interval"):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    real, fake = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(real, real.size), rng.choice(fake, fake.size)])
        diffs[i] = auc(y[idx], a[idx]) - auc(y[idx], b[idx])
    return _percentiles(diffs, level)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision with generated images as the positive class (Wang et al. 2020)."""
    y, s = _check(labels, scores)
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s)) if _both_classes(y, "AP") else float("nan")


def accuracy_real(labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.0) -> float:
    """Fraction of real images scored below ``threshold``."""
    y, s = _check(labels, scores)
    real = s[y == 0]
    return float(np.mean(real < threshold)) if real.size else float("nan")


def accuracy_fake(labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.0) -> float:
    """Fraction of generated images scored at or above ``threshold``."""
    y, s = _check(labels, scores)
    fake = s[y == 1]
    return float(np.mean(fake >= threshold)) if fake.size else float("nan")


def balanced_accuracy(labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.0) -> float:
    """Mean of the accuracies on reals and on fakes (Corvi et al. 2023)."""
    return 0.5 * (accuracy_real(labels, scores, threshold=threshold) + accuracy_fake(labels, scores, threshold=threshold))


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """``(eer, threshold)``: where the false-alarm rate equals the miss rate.

    Interpolated linearly between the two ROC points that bracket the crossing.
    """
    y, s = _check(labels, scores)
    if not _both_classes(y, "EER"):
        return float("nan"), float("nan")
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increases along the curve, from -1 to +1
    i = int(np.searchsorted(diff, 0.0))
    if i == 0:
        return float(fpr[0]), float(thr[0])
    d0, d1 = diff[i - 1], diff[i]
    w = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    eer = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    t_hi = thr[i - 1] if np.isfinite(thr[i - 1]) else s.max()
    return float(eer), float(t_hi + w * (thr[i] - t_hi))


def threshold_at_far(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    """Lowest threshold whose false-alarm rate on reals (``score >= t``) is at most ``far``."""
    y, s = _check(labels, scores)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    real = np.sort(s[y == 0])[::-1]
    if real.size == 0:
        warnings.warn("threshold_at_far needs real images; returning NaN", stacklevel=2)
        return float("nan")
    allowed = int(np.floor(far * real.size + 1e-9))  # number of reals that may score >= t
    if allowed >= real.size:
        return float(real[-1])
    # t just above the (allowed+1)-th highest real score
    return float(np.nextafter(real[allowed], np.inf))


def detection_at_far(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    """Detection rate (fraction of fakes caught) at a false-alarm rate of at most ``far``."""
    y, s = _check(labels, scores)
    if not _both_classes(y, "Pd@FAR"):
        return float("nan")
    t = threshold_at_far(y, s, far)
    return float(np.mean(s[y == 1] >= t))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """``(balanced accuracy, threshold)`` of the threshold that maximises balanced accuracy.

    An oracle figure (the threshold is chosen on the data it is measured on): it shows what a
    calibrated detector could reach, not what it reaches.
    """
    y, s = _check(labels, scores)
    if not _both_classes(y, "best threshold"):
        return float("nan"), float("nan")
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    bal = 0.5 * (tpr + 1.0 - fpr)
    i = int(np.argmax(bal))
    return float(bal[i]), float(thr[i] if np.isfinite(thr[i]) else s.max())


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15) -> float:
    """ECE of probabilities of "generated": bin-size-weighted |accuracy - confidence|.

    Confidence is the probability of the predicted class, binned in ``n_bins`` equal-width bins
    over [0.5, 1] as in Guo et al. 2017.
    """
    y, p = _check(labels, probabilities)
    if y.size == 0:
        return float("nan")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    pred = (p >= 0.5).astype(int)
    conf = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def logloss(labels: np.ndarray, probabilities: np.ndarray, *, sample_weight: np.ndarray | None = None) -> float:
    """Negative log-likelihood of the labels under the probabilities (natural log), optionally weighted."""
    y, p = _check(labels, probabilities)
    if y.size == 0:
        return float("nan")
    from sklearn.metrics import log_loss

    return float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1], sample_weight=sample_weight))


def summary(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float = 0.0,
    temperature: float = 1.0,
    fars: tuple[float, ...] = (0.10, 0.05, 0.01),
    n_boot: int = 1000,
    seed: int = 0,
    judged: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of one group, as a flat dict (the rows of ``metrics.csv``).

    ``judged`` (boolean, one per image) marks the images the detector gives a verdict; the others
    (too small) are neither called generated nor caught: they count in the label's accuracies as a
    real verdict would not, stay in every ranking metric (AUC, EER, detection at a false-alarm rate:
    the logit exists), and are counted in ``n_too_small_real`` / ``n_too_small_fake``. Calibration
    metrics (ECE, log loss) cover the judged images only.
    """
    y, s = _check(labels, scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lo, hi = auc_interval(y, s, n_boot=n_boot, seed=seed) if n_boot else (float("nan"), float("nan"))
        eer, eer_t = equal_error_rate(y, s)
        best_acc, best_t = best_threshold(y, s)
        if judged is None:
            acc_real = accuracy_real(y, s, threshold=threshold)
            acc_fake = accuracy_fake(y, s, threshold=threshold)
            yj, sj = y, s
        else:
            judged = np.asarray(judged, dtype=bool)
            called = label_calls(s, threshold, judged)
            acc_real = float(np.mean(~called[y == 0])) if (y == 0).any() else float("nan")
            acc_fake = float(np.mean(called[y == 1])) if (y == 1).any() else float("nan")
            yj, sj = y[judged], s[judged]
        p = sigmoid(sj - threshold, temperature)  # the calibrated probability: 0.5 at the threshold
        out = {
            "n_real": int((y == 0).sum()),
            "n_fake": int((y == 1).sum()),
            "auc": auc(y, s),
            "auc_low": lo,
            "auc_high": hi,
            "ap": average_precision(y, s),
            "acc_real": acc_real,
            "acc_fake": acc_fake,
            "balanced_acc": 0.5 * (acc_real + acc_fake),
            "threshold": float(threshold),
            "eer": eer,
            "eer_threshold": eer_t,
        }
        for far in fars:
            out[f"pd@{far:g}far"] = detection_at_far(y, s, far)
        out.update(
            best_balanced_acc=best_acc,
            best_threshold=best_t,
            ece=expected_calibration_error(yj, p) if yj.size else float("nan"),
            log_loss=logloss(yj, p) if 0 < (yj == 1).sum() < yj.size else float("nan"),
        )
        if judged is not None:
            out.update(n_too_small_real=int((~judged & (y == 0)).sum()), n_too_small_fake=int((~judged & (y == 1)).sum()))
    return out
