"""Post-hoc calibration fitted on validation scores: one meaning for a probability and a verdict.

Platt scaling (Platt 1999): ``p = sigmoid(a * logit + b)`` with ``a > 0`` and ``b`` minimising
the validation log loss, each class weighing half: the probability is that of "generated" under
even odds, because the share of generated images in a user's material is unknown (and a
validation set's share, 62% here, is an accident of collection that would tilt every verdict). It is stored as a temperature ``T = 1 / a`` and a threshold
``t = -b / a``, so that ``p = sigmoid((logit - t) / T)`` and an image is called generated exactly
when ``p >= 0.5``, i.e. when its logit reaches ``t``. With ``target_far`` the threshold is instead
the lowest logit whose false-alarm rate on validation reals is at most ``target_far``, and only
the temperature is fitted, around that threshold. It changes probabilities, never the ranking.
Both are stored in the checkpoint (with the scoring settings they were fitted for) and used by
``scan`` and ``evaluate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from ..metrics import equal_error_rate, logloss, sigmoid

__all__ = ["FPR_TARGETS", "Calibration", "calibrate_detector", "calibration_from_evaluation", "fit_calibration",
           "fit_operating_point", "fit_platt", "fit_size_offsets", "fit_temperature", "strictest_thresholds",
           "thresholds_at_fpr"]

# False-positive rates a user may ask for (`--target-fpr`); each gets its threshold in the checkpoint
FPR_TARGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)

_LOG_T_BOUNDS = (np.log(0.01), np.log(100.0))


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    threshold: float = 0.0
    rule: str = "none"
    n_real: int = 0
    n_fake: int = 0
    settings: dict = field(default_factory=dict)
    target_fpr: float | None = None
    operating_points: dict = field(default_factory=dict)  # "0.01" -> threshold giving that FPR

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.target_fpr is None:  # Platt-only calibrations keep the record they always had
            del out["target_fpr"], out["operating_points"]
        return out


def thresholds_at_fpr(real_logits: np.ndarray, targets=FPR_TARGETS, weights: np.ndarray | None = None) -> dict[str, float]:
    """For each target rate ``r``, the lowest threshold at which a weighted share of at most ``r`` of
    ``real_logits`` reaches it (an image is called generated when its logit is at least the threshold).

    ``weights`` (default equal) let each real-photo source count alike, so that the rate holds for
    sources unlike the biggest one.
    """
    s = np.asarray(real_logits, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    if s.size == 0:
        raise ValueError("thresholds need real-photo scores")
    order = np.argsort(-s, kind="stable")
    s, share = s[order], np.cumsum(w[order]) / w.sum()
    out = {}
    for r in targets:
        allowed = int(np.searchsorted(share, r + 1e-12, side="right"))  # reals that may sit above
        out[f"{r:g}"] = float(np.nextafter(s[allowed], np.inf)) if allowed < s.size else float(s[-1])
    return out


def strictest_thresholds(real_logits: Sequence[np.ndarray], targets=FPR_TARGETS,
                         weights: np.ndarray | None = None) -> dict[str, float]:
    """For each target rate, the highest of the conditions' :func:`thresholds_at_fpr`: the threshold
    that keeps every condition (the same reals scored as stored, cropped, re-encoded, ...) at or under
    the rate. ``weights`` are the reals' weights, the same in every condition."""
    per_condition = [thresholds_at_fpr(r, targets, weights) for r in real_logits]
    return {key: max(points[key] for points in per_condition) for key in per_condition[0]}


def fit_size_offsets(real_logits: Sequence[np.ndarray], real_sides: Sequence[np.ndarray], edges: Sequence[float], *,
                     target_fpr: float = 0.05, weights: np.ndarray | None = None, min_reals: int = 100) -> list[float]:
    """Per band of an image's short side (below ``edges[0]``, from ``edges[0]`` below ``edges[1]``, ...,
    from ``edges[-1]`` up), what to take off the logit so that every band calls the same share of real
    photos generated: the band's :func:`strictest_thresholds` at ``target_fpr`` over the conditions that
    put at least ``min_reals`` reals in it, less that of the last band (whose offset is 0).

    ``real_logits[k]`` and ``real_sides[k]`` are the reals' logits and short sides under condition ``k``;
    ``weights`` the reals' weights (the same in every condition). A band no condition fills enough
    takes the offset of the nearest larger band that has one: too few photos to tell, no correction.
    """
    from ..probe import size_band

    w_all = None if weights is None else np.asarray(weights, dtype=np.float64)
    n_bands = len(edges) + 1
    bands = [size_band(edges, sides) for sides in real_sides]
    thresholds: list[float | None] = []
    for band in range(n_bands):
        per_condition = []
        for logits, in_band in zip(real_logits, bands):
            inside = in_band == band
            if inside.sum() >= min_reals:
                w = None if w_all is None else w_all[inside]
                per_condition.append(thresholds_at_fpr(np.asarray(logits)[inside], (target_fpr,), w)[f"{target_fpr:g}"])
        thresholds.append(max(per_condition) if per_condition else None)
    if thresholds[-1] is None:
        raise ValueError(f"too few real photos ({min_reals} needed) with a short side of at least {edges[-1]:g} px")
    for band in range(n_bands - 2, -1, -1):  # an empty band borrows from the next larger one
        if thresholds[band] is None:
            thresholds[band] = thresholds[band + 1]
    return [float(t - thresholds[-1]) for t in thresholds]


def fit_operating_point(labels: np.ndarray, logits: np.ndarray, *, target_fpr: float = 0.05,
                        real_weights: np.ndarray | None = None, threshold: float | None = None,
                        settings: dict | None = None, points: dict[str, float] | None = None) -> Calibration:
    """A calibration whose 0.5 falls on the operating point: the threshold at which at most
    ``target_fpr`` of the (weighted) reals are called generated, and the temperature that fits the
    probabilities around it. The operating points of :data:`FPR_TARGETS` are stored beside it, so a
    user can ask for another rate without refitting. ``points`` replaces those computed here (e.g.
    :func:`strictest_thresholds` over several conditions) and ``threshold`` the chosen one.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(logits, dtype=np.float64)
    _both(y)
    if points is None:
        points = thresholds_at_fpr(s[y == 0], sorted({*FPR_TARGETS, target_fpr}), real_weights)
    t = points[f"{target_fpr:g}"] if threshold is None else float(threshold)
    temperature = fit_temperature(y, s, t)
    return Calibration(temperature, t, f"fpr<={target_fpr:g}", int((y == 0).sum()), int((y == 1).sum()),
                       dict(settings or {}), target_fpr, points)


def _both(y: np.ndarray) -> None:
    if y.min() == y.max():
        raise ValueError("calibration needs both real and generated images")


def _even_odds(y: np.ndarray) -> np.ndarray:
    """Sample weights giving each class half of the total."""
    y = np.asarray(y).astype(int)
    return np.where(y == 1, 0.5 / max(1, (y == 1).sum()), 0.5 / max(1, (y == 0).sum())) * y.size


def fit_temperature(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.0) -> float:
    """The ``T`` in [0.01, 100] minimising the even-odds log loss of ``sigmoid((logits - threshold) / T)``."""
    y = np.asarray(labels)
    s = np.asarray(logits, dtype=np.float64) - threshold
    _both(y)
    w = _even_odds(y)
    res = minimize_scalar(lambda log_t: logloss(y, sigmoid(s, float(np.exp(log_t))), sample_weight=w),
                          bounds=_LOG_T_BOUNDS, method="bounded")
    return float(np.exp(res.x))


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """``(temperature, threshold)`` of the even-odds Platt fit ``sigmoid(a * logit + b)`` with ``a > 0``.

    A score that ranks reals above fakes on validation (``a`` would be negative) gets the largest
    temperature and the equal-error threshold: probabilities near 0.5, as uninformative as it is.
    """
    y = np.asarray(labels).astype(float)
    s = np.asarray(logits, dtype=np.float64)
    _both(y)
    centre, spread = float(np.mean(s)), float(np.std(s)) or 1.0
    u = (s - centre) / spread  # fit in standardised units, then map back

    w = _even_odds(y)

    def nll(params: np.ndarray) -> float:
        return logloss(y, sigmoid(np.exp(params[0]) * u + params[1]), sample_weight=w)

    res = minimize(nll, x0=np.array([0.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    if res.x[0] < np.log(1e-3):  # no usable slope: the score does not separate the classes this way
        return float(np.exp(_LOG_T_BOUNDS[1])), float(equal_error_rate(y.astype(int), s)[1])
    a, b = float(np.exp(res.x[0])) / spread, float(res.x[1])
    temperature = float(np.clip(1.0 / a, np.exp(_LOG_T_BOUNDS[0]), np.exp(_LOG_T_BOUNDS[1])))
    return temperature, centre - b / a


def fit_calibration(labels: np.ndarray, logits: np.ndarray, *, target_far: float | None = None,
                    settings: dict | None = None) -> Calibration:
    """Temperature and threshold from validation scores (Platt, or a threshold at ``target_far``).

    ``settings`` records how the scores were computed (cropping, views, JPEG alignment), so that a
    scan with other settings can say its probabilities are uncalibrated.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(logits, dtype=np.float64)
    if target_far is None:
        temperature, threshold = fit_platt(y, s)
        rule = "platt"
    else:
        return fit_operating_point(y, s, target_fpr=target_far, settings=settings)
    return Calibration(temperature, threshold, rule, int((y == 0).sum()), int((y == 1).sum()), dict(settings or {}))


def calibrate_detector(detector, table, settings, *, fusion: str = "mean", target_far: float | None = None,
                       max_pixels: int = 1 << 28, log=print) -> Calibration:
    """Score the labelled images of ``table`` exactly as ``scan`` would with ``settings`` and ``fusion``
    (images as stored, no JPEG alignment; through :func:`detector.scoring.score_stream`) and fit the
    calibration on those scores."""
    from dataclasses import asdict

    from ..ensemble import Ensemble
    from ..images import ImageError, decode_image
    from ..scoring import score_stream

    one = Ensemble([detector], ["model"])
    prepare = one.transforms(settings)

    def items():
        for i, row in enumerate(table.itertuples(index=False)):
            try:
                pixels = decode_image(row.path, max_pixels=max_pixels).pixels
            except ImageError as err:
                log(f"skipped {row.path}: {err}")
                continue
            if (i + 1) % 25 == 0:
                log(f"scored {i + 1}/{len(table)}")
            yield {**prepare(pixels), "label": int(row.label), "path": row.path}

    labels, logits = [], []
    for scored in score_stream(one, items(), mode=settings.mode, fusion=fusion):
        if scored.verdict is None:
            log(f"skipped {scored.item['path']}: {scored.error}")
            continue
        if not scored.verdict.judged:  # under the detector's minimum size: it never gets a label to calibrate
            log(f"skipped {scored.item['path']}: too small to judge")
            continue
        labels.append(scored.item["label"])
        logits.append(scored.verdict.logit)
    conv = one.conv
    record = {"patches": asdict(conv.resolve_settings(settings)), "fusion": fusion} if conv else {}
    return fit_calibration(np.array(labels), np.array(logits), target_far=target_far, settings=record)


def calibration_from_evaluation(folder, sha256: str, *, target_far: float | None = None) -> Calibration:
    """Fit a checkpoint's calibration on the scores a ``detector evaluate`` run already computed.

    ``folder`` is the evaluation's output; the model is found in its ``run.json`` by the weights'
    ``sha256``. The images must have been scored as stored (no ``--align-jpeg``, ``--center-crop``
    or perturbations), so the scores are those ``scan`` gives with the recorded cutting settings.
    """
    import json
    from pathlib import Path

    import pandas as pd

    folder = Path(folder)
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        scores = pd.read_csv(folder / "scores.csv")
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: not a `detector evaluate` output ({err})") from None
    settings = run.get("settings", {})
    if settings.get("align_jpeg") or settings.get("center_crop") or settings.get("perturbations"):
        raise ValueError(f"{folder}: its images were re-encoded, cropped or perturbed before scoring; calibrate on "
                         f"an evaluation of the images as stored")
    model = next((m for m in run.get("models", []) if m.get("weights_sha256") == sha256), None)
    if model is None:
        raise ValueError(f"{folder}: none of its models has these weights (sha256 {sha256[:12]}...)")
    column = f"logit_{model['name']}"
    usable = scores[scores[column].notna()] if column in scores else None
    if usable is None or usable.empty:
        raise ValueError(f"{folder}: scores.csv has no usable {column} column")
    is_conv = not str(model.get("architecture", "")).startswith("clip-probe")
    record = {"patches": settings.get("patches"), "fusion": settings.get("fusion")} if is_conv else {}
    return fit_calibration(usable["label"].to_numpy(), usable[column].to_numpy(), target_far=target_far,
                           settings=record)
