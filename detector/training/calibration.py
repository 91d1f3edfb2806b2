"""Post-hoc calibration fitted on validation scores: a temperature and a decision threshold.

Temperature scaling (Guo et al. 2017) divides logits by ``T`` chosen to minimise the negative
log-likelihood; it changes probabilities, never the ranking. The threshold is the equal-error
point, or the lowest threshold whose false-alarm rate on validation reals is at most
``target_far``. Both are stored in the checkpoint and used by ``scan`` and ``evaluate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from ..metrics import equal_error_rate, logloss, sigmoid, threshold_at_far

__all__ = ["Calibration", "fit_calibration", "fit_temperature"]


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    threshold: float = 0.0
    rule: str = "none"
    n_real: int = 0
    n_fake: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The ``T`` in [0.05, 100] minimising the log loss of ``sigmoid(logits / T)``."""
    y = np.asarray(labels)
    s = np.asarray(logits, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("temperature fitting needs both real and generated images")

    def nll(log_t: float) -> float:
        return logloss(y, sigmoid(s, float(np.exp(log_t))))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(100.0)), method="bounded")
    return float(np.exp(res.x))


def fit_calibration(labels: np.ndarray, logits: np.ndarray, *, target_far: float | None = None) -> Calibration:
    """Temperature plus threshold (EER point, or at ``target_far``) from validation scores."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(logits, dtype=np.float64)
    temperature = fit_temperature(y, s)
    if target_far is None:
        threshold, rule = equal_error_rate(y, s)[1], "eer"
    else:
        threshold, rule = threshold_at_far(y, s, target_far), f"far<={target_far:g}"
    return Calibration(temperature, float(threshold), rule, int((y == 0).sum()), int((y == 1).sum()))
