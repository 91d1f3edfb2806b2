"""One meaning for a verdict: Platt calibration, fitted on scores computed as scan computes them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from detector.checkpoints import load_model, save_checkpoint
from detector.cli import main
from detector.training.calibration import fit_calibration, fit_platt

from .conftest import seeded_model


def test_platt_matches_a_class_balanced_unregularised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(300)]  # uneven classes: the fit must not follow the 75% base rate
    s = np.r_[rng.normal(-1, 1.5, 100), rng.normal(2, 1.5, 300)] * 3 + 5
    temperature, threshold = fit_platt(y, s)
    lr = LogisticRegression(C=1e9, max_iter=1000, class_weight="balanced").fit(s[:, None], y)
    a, b = lr.coef_[0, 0], lr.intercept_[0]
    assert temperature == pytest.approx(1 / a, rel=1e-3) and threshold == pytest.approx(-b / a, rel=1e-3)
    plain = LogisticRegression(C=1e9, max_iter=1000).fit(s[:, None], y)
    assert abs(-plain.intercept_[0] / plain.coef_[0, 0] - threshold) > 0.5  # the base rate would move it


def test_a_score_that_does_not_separate_gets_uninformative_probabilities():
    y = np.r_[np.zeros(50), np.ones(50)]
    s = np.r_[np.linspace(1, 2, 50), np.linspace(0, 1, 50)]  # reals above fakes
    cal = fit_calibration(y, s)
    assert cal.temperature >= 50  # probabilities stay near 0.5


def test_calibrate_then_scan_one_meaning_for_a_verdict(tmp_path, fixture_dir):
    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, seeded_model("resnet18nodown"), dtype=None)
    runner = CliRunner()
    common = ["--patch-size", "64", "--num-patches", "2", "--device", "cpu", "--precision", "fp32"]
    out = tmp_path / "calibrated.safetensors"
    done = runner.invoke(main, ["calibrate", str(weights), "--data", str(fixture_dir / "manifest.csv"), "-o", str(out),
                                "-q", *common])
    assert done.exit_code == 0, done.output
    _, info = load_model(out)
    cal = info.metadata["calibration"]
    assert cal["rule"] == "platt" and cal["n_real"] == 12 and cal["n_fake"] == 12
    assert cal["settings"]["patches"]["patch_size"] == 64 and cal["settings"]["fusion"] == "mean"

    same = tmp_path / "same.csv"
    done = runner.invoke(main, ["scan", str(fixture_dir), "--weights", str(out), "-o", str(same), "-q", "--workers", "0",
                                *common])
    assert done.exit_code == 0, done.output
    assert "uncalibrated" not in done.output
    assert json.loads((tmp_path / "same.csv.json").read_text())["probabilities_calibrated"] is True
    df = pd.read_csv(same, keep_default_na=False)
    assert len(df) == 24 and ((df["label"] == "fake") == (df["probability"] >= 0.5)).all()
    assert df["probability"].between(0, 1).all() and df["probability"].nunique() > 1

    other = tmp_path / "other.csv"
    done = runner.invoke(main, ["scan", str(fixture_dir), "--weights", str(out), "-o", str(other), "-q", "--workers",
                                "0", "--patch-size", "32", "--num-patches", "1", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "uncalibrated for these settings" in done.output
    record = json.loads((tmp_path / "other.csv.json").read_text())
    assert record["probabilities_calibrated"] is False and record["uncalibrated_models"] == ["calibrated"]


def test_thresholds_at_fpr_call_at_most_that_share_of_reals_generated():
    from detector.training.calibration import thresholds_at_fpr

    rng = np.random.default_rng(0)
    reals = rng.normal(size=997)
    for rate, t in thresholds_at_fpr(reals, (0.001, 0.01, 0.05, 0.2)).items():
        share = (reals >= t).mean()
        assert share <= float(rate)
        assert (reals >= np.max(reals[reals < t])).mean() > float(rate)  # the lowest such threshold
    # weights: a source of 900 photos and one of 100 weighing alike
    big, small = rng.normal(0, 1, 900), rng.normal(3, 1, 100)
    weights = np.r_[np.full(900, 1 / 900), np.full(100, 1 / 100)]
    t = thresholds_at_fpr(np.r_[big, small], (0.05,), weights)["0.05"]
    assert 0.5 * (big >= t).mean() + 0.5 * (small >= t).mean() <= 0.05


def test_target_fpr_moves_the_operating_point_and_keeps_label_and_probability_together(tmp_path, fixture_dir):
    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, seeded_model("resnet18nodown"), dtype=None)
    runner = CliRunner()
    common = ["--patch-size", "64", "--num-patches", "1", "--device", "cpu", "--precision", "fp32"]
    out = tmp_path / "op.safetensors"
    done = runner.invoke(main, ["calibrate", str(weights), "--data", str(fixture_dir / "manifest.csv"), "-o", str(out),
                                "--target-far", "0.2", "-q", *common])
    assert done.exit_code == 0, done.output
    _, info = load_model(out)
    cal = info.metadata["calibration"]
    assert cal["target_fpr"] == 0.2 and cal["threshold"] == pytest.approx(cal["operating_points"]["0.2"])
    labels = {}
    for rate in ("0.2", "0.01"):
        csv = tmp_path / f"at{rate}.csv"
        done = runner.invoke(main, ["scan", str(fixture_dir), "--weights", str(out), "-o", str(csv), "-q",
                                    "--workers", "0", "--target-fpr", rate, *common])
        assert done.exit_code == 0, done.output
        df = pd.read_csv(csv, keep_default_na=False)
        assert ((df["label"] == "fake") == (df["probability"] >= 0.5)).all()
        labels[rate] = df.set_index("path")
    calibrated = json.loads((tmp_path / "at0.01.csv.json").read_text())
    assert json.dumps(cal["operating_points"]["0.01"])[:8] in json.dumps(calibrated)
    assert (labels["0.01"]["label"] == "fake").sum() <= (labels["0.2"]["label"] == "fake").sum()
    assert (labels["0.01"]["logit"] == labels["0.2"]["logit"]).all()  # the ranking never moves
    # weights without operating points: refused in one line, no CSV written
    done = runner.invoke(main, ["scan", str(fixture_dir), "--weights", str(weights), "-o", str(tmp_path / "no.csv"),
                                "-q", "--workers", "0", "--target-fpr", "0.01", *common])
    assert done.exit_code != 0 and "no operating points" in done.output
    assert not (tmp_path / "no.csv").exists()


def test_strictest_thresholds_keep_every_condition_under_each_rate():
    from detector.training.calibration import fit_operating_point, strictest_thresholds, thresholds_at_fpr

    rng = np.random.default_rng(0)
    stored, cropped = rng.normal(0, 1, 400), rng.normal(0.7, 1, 400)  # the same reals, harsher when cropped
    points = strictest_thresholds([stored, cropped], (0.01, 0.05))
    for key, rate in (("0.01", 0.01), ("0.05", 0.05)):
        assert points[key] == max(thresholds_at_fpr(stored, (rate,))[key], thresholds_at_fpr(cropped, (rate,))[key])
        assert (stored >= points[key]).mean() <= rate and (cropped >= points[key]).mean() <= rate
    fakes = rng.normal(3, 1, 400)
    y = np.r_[np.zeros(800), np.ones(800)]
    cal = fit_operating_point(y, np.r_[stored, cropped, fakes, fakes], target_fpr=0.05, points=points)
    assert cal.threshold == points["0.05"] and cal.operating_points == points


def test_size_offsets_give_every_band_of_sizes_the_same_false_positive_rate():
    from detector.training.calibration import fit_size_offsets, strictest_thresholds

    rng = np.random.default_rng(1)
    # the same 3,000 reals under two conditions; small views (close-ups) score higher than large ones
    sides = [rng.choice([200, 800, 2000], 3000), np.full(3000, 256)]
    logits = [rng.normal(0, 1, 3000) + 1.5 * (sides[0] < 300), rng.normal(1.2, 1, 3000)]
    edges = [300, 1000]
    offsets = fit_size_offsets(logits, sides, edges, target_fpr=0.05, min_reals=100)
    assert offsets[-1] == 0 and offsets[0] > 1 and abs(offsets[1]) < 0.3
    shifted = [z - np.asarray(offsets)[np.searchsorted(edges, s, side="right")] for z, s in zip(logits, sides)]
    t = strictest_thresholds(shifted, (0.05,))["0.05"]
    for z, s in zip(shifted, sides):
        for band in np.unique(np.searchsorted(edges, s, side="right")):
            inside = np.searchsorted(edges, s, side="right") == band
            assert (z[inside] >= t).mean() <= 0.05 + 0.02  # each band near the rate, none far above it
    # a band with too few reals borrows the offset of the next larger band; the largest must have enough
    few = fit_size_offsets([logits[0]], [sides[0]], [100, 300, 1000], min_reals=100)
    assert few[0] == few[1]
    with pytest.raises(ValueError, match="too few real photos"):
        fit_size_offsets([logits[0]], [sides[0]], [300, 5000], min_reals=100)
