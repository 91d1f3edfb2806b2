import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from detector import metrics as M

rng = np.random.default_rng(0)
Y = np.r_[np.zeros(60), np.ones(40)].astype(int)
S = np.r_[rng.normal(0, 1, 60), rng.normal(1.2, 1, 40)]


def test_auc_and_ap_match_sklearn():
    assert M.auc(Y, S) == pytest.approx(roc_auc_score(Y, S))
    assert M.average_precision(Y, S) == pytest.approx(average_precision_score(Y, S))


def test_accuracies_at_threshold():
    assert M.accuracy_real(Y, S, threshold=0.5) == pytest.approx(np.mean(S[Y == 0] < 0.5))
    assert M.accuracy_fake(Y, S, threshold=0.5) == pytest.approx(np.mean(S[Y == 1] >= 0.5))
    assert M.balanced_accuracy(Y, S) == pytest.approx(0.5 * (np.mean(S[Y == 0] < 0) + np.mean(S[Y == 1] >= 0)))


def test_eer_hand_cases():
    # perfectly separated: EER 0
    assert M.equal_error_rate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])[0] == pytest.approx(0.0)
    # perfectly inverted: EER 1
    assert M.equal_error_rate([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2])[0] == pytest.approx(1.0)
    # reals 1,2,3,4 fakes 3.5,5,6,7: at t in (3,3.5], FAR 1/4 and miss 0 ; at t in (3.5,4], FAR 1/4, miss 1/4
    eer, t = M.equal_error_rate([0, 0, 0, 0, 1, 1, 1, 1], [1, 2, 3, 4, 3.5, 5, 6, 7])
    assert eer == pytest.approx(0.25)


def test_detection_at_far_hand_case():
    reals = np.arange(10, dtype=float)  # 0..9
    fakes = np.array([8.5, 9.5, 10.5, 11.0, 3.0])
    y = np.r_[np.zeros(10), np.ones(5)].astype(int)
    s = np.r_[reals, fakes]
    # 10% FAR: one real (9) may be above -> threshold just above 8 -> fakes 8.5, 9.5, 10.5, 11 caught
    assert M.detection_at_far(y, s, 0.10) == pytest.approx(4 / 5)
    # 0% FAR: threshold just above 9 -> 9.5, 10.5, 11
    assert M.detection_at_far(y, s, 0.0) == pytest.approx(3 / 5)
    t = M.threshold_at_far(y, s, 0.10)
    assert np.mean(reals >= t) <= 0.10


def test_best_threshold_is_oracle():
    acc, t = M.best_threshold(Y, S)
    assert acc >= M.balanced_accuracy(Y, S, threshold=0.0)
    assert acc == pytest.approx(M.balanced_accuracy(Y, S, threshold=t))


def test_ece_and_logloss():
    p = M.sigmoid(S)
    assert M.logloss(Y, p) == pytest.approx(log_loss(Y, p))
    assert M.expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0.0)
    # always 0.8 confident "fake", right half the time: ECE = |0.5 - 0.8|
    assert M.expected_calibration_error(np.array([1, 0, 1, 0]), np.full(4, 0.8)) == pytest.approx(0.3)


def test_one_class_warns_and_gives_nan():
    with pytest.warns(UserWarning, match="one class"):
        assert np.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.auc([0, 1], [0.1, float("nan")])


def test_summary_has_every_metric():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.summary(Y, S, n_boot=50)
    for key in ("auc", "auc_low", "auc_high", "ap", "acc_real", "acc_fake", "balanced_acc", "eer",
                "pd@0.1far", "pd@0.05far", "pd@0.01far", "best_balanced_acc", "best_threshold", "ece", "log_loss"):
        assert key in out and np.isfinite(out[key]), key
    assert out["auc_low"] <= out["auc"] <= out["auc_high"]


def test_bootstrap_resamples_match_sklearn_auc():
    """The vectorised bootstrap equals sklearn's AUC on each resample (ties included)."""
    y = np.r_[np.zeros(7), np.ones(5)].astype(int)
    s = np.array([0.1, 0.2, 0.2, 0.5, 0.3, 0.9, 0.4, 0.2, 0.6, 0.5, 0.8, 0.95])
    lo, hi = M.auc_interval(y, s, n_boot=400, seed=1)
    rng = np.random.default_rng(1)
    real, fake = s[y == 0], s[y == 1]
    r = real[rng.integers(0, 7, (400, 7))]
    f = fake[rng.integers(0, 5, (400, 5))]
    ref = [roc_auc_score(np.r_[np.zeros(7), np.ones(5)], np.r_[a, b]) for a, b in zip(r, f)]
    assert lo == pytest.approx(np.quantile(ref, 0.025)) and hi == pytest.approx(np.quantile(ref, 0.975))


def test_auc_difference_interval_is_paired():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(100), np.ones(100)].astype(int)
    good = y * 2.0 + rng.normal(size=200)
    noisy = good + rng.normal(scale=3.0, size=200)
    low, high = M.auc_difference_interval(y, good, good, n_boot=200)
    assert low == high == 0.0  # the same scores on the same resamples differ by nothing
    low, high = M.auc_difference_interval(y, good, noisy, n_boot=200)
    assert 0.0 < low < high  # noise added to a score costs AUC, and the pairing sees it
    low, high = M.auc_difference_interval(y, good, good + rng.normal(scale=1e-3, size=200), n_boot=200)
    assert low <= 0.0 <= high


def test_grouped_rate_interval_resamples_whole_groups():
    """Equal rates in every group leave nothing to resample; one group holding every hit makes the
    interval wide, far wider than the same hits spread evenly; the interval covers the rate."""
    groups = np.repeat(np.arange(10), 20)
    even = np.tile(np.r_[np.ones(2, bool), np.zeros(18, bool)], 10)  # 10% in every group
    assert M.grouped_rate_interval(even, groups) == pytest.approx((0.1, 0.1))
    lumped = groups == 0  # the same 10%, all in one source
    low, high = M.grouped_rate_interval(lumped, groups)
    assert low == 0.0 and high >= 0.25
    assert low <= lumped.mean() <= high
    assert np.isnan(M.grouped_rate_interval(np.array([], bool), np.array([]))[0])
    assert np.isnan(M.grouped_rate_interval(even[:20], np.zeros(20))[1])  # one group says nothing
    with pytest.raises(ValueError):
        M.grouped_rate_interval(even, groups[:5])
