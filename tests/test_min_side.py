"""The third outcome: an image under a detector's minimum size is ``too small``, with no probability,
in the Python API, the scan, the service's answer and the evaluation's label metrics.

Most checks run on stub detectors and synthetic scores; one scans and evaluates real images with
the probe trained on the shared fixture (skipped, with the reason, when the encoder or the fixture is
absent).
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from detector import metrics as M
from detector.calibration import TOO_SMALL, CalibratedVerdicts
from detector.cli import main
from detector.ensemble import Ensemble
from detector.evaluation import EvalOptions, ModelSpec, Perturbation, parse_perturbations
from detector.evaluation.groups import Group, group_metrics
from detector.probe import ProbeConfig

from .test_probe import encoder, trained_probe  # noqa: F401 - module fixtures shared with the probe's tests


class Stub(CalibratedVerdicts):
    """A detector without calibration whose verdicts need images of ``min_side`` px a side."""

    def __init__(self, min_side: int = 0) -> None:
        self.info = None
        self.min_side = min_side


def test_a_verdict_under_the_minimum_is_too_small_with_no_probability_and_the_logit_kept():
    stub = Stub(min_side=64)
    small = stub.verdict(3.0, width=63, height=500)
    assert small.label == TOO_SMALL and math.isnan(small.probability) and small.logit == 3.0
    assert not small.judged and not small.is_fake
    for w, h in ((64, 64), (500, 64)):
        v = stub.verdict(3.0, width=w, height=h)
        assert v.judged and v.label == "fake" and v.probability > 0.5
    assert stub.verdict(-3.0, width=64, height=64).label == "real"
    assert Stub(0).verdict(3.0, width=1, height=1).label == "fake"  # no minimum: any size the scan accepts
    assert stub.verdict(3.0).judged  # an unknown size is judged


def test_a_set_is_too_small_when_a_voting_member_is_and_a_silent_member_does_not_count():
    voting, silent = Stub(min_side=64), Stub(min_side=128)
    both = Ensemble([voting, silent], ["probe", "other"], weights=[1.0, 0.0])
    assert both.min_side == 64
    judged = both.combine([2.0, -1.0], width=100, height=100)
    assert judged.label == "fake" and judged.members["other"].label == TOO_SMALL  # reported, not deciding
    small = both.combine([2.0, -1.0], width=50, height=100)
    assert small.label == TOO_SMALL and math.isnan(small.probability) and math.isfinite(small.logit)
    assert Ensemble([Stub(64)], ["probe"]).combine([2.0], width=50, height=50).label == TOO_SMALL


def test_probe_config_checks_and_records_its_minimum_only_when_it_has_one():
    base = {"architecture": "clip-probe:x", "backbone": {}}
    assert "min_side" not in ProbeConfig(**base).to_dict()
    assert ProbeConfig(**base, min_side=64).to_dict()["min_side"] == 64
    for bad in (-1, 6.5, True, "64"):
        with pytest.raises(ValueError, match="min_side"):
            ProbeConfig(**base, min_side=bad)


@pytest.mark.parametrize("spec", ["resize:0.5", "resize:0.37", "center:256+jpeg:90", "crop:48", "screenshot:1080",
                                  "screenshot:64", "jpeg:75", "png", "webp:80", "blur:1"])
def test_the_size_a_condition_gives_is_known_without_decoding(spec):
    (condition,) = parse_perturbations([spec])
    rng = np.random.default_rng(0)
    for h, w in ((33, 71), (64, 64), (300, 97), (1200, 2400), (2000, 150)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = condition.apply(pixels, np.random.default_rng(1))
        assert condition.output_size(w, h) == (out.shape[1], out.shape[0]), (spec, w, h)
    options = EvalOptions(center_crop=200, perturbations=(condition,))
    assert options.scored_size(300, 97, None) == (200, 97)


def test_label_metrics_count_an_image_too_small_as_neither_called_generated_nor_caught():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([-2.0, 3.0, 3.0, -1.0, 2.0, 2.0, -3.0, 4.0])
    judged = np.array([True, False, True, True, False, True, True, True])
    out = M.summary(labels, scores, threshold=0.0, n_boot=0, judged=judged)
    assert out["acc_real"] == pytest.approx(3 / 4)  # one of four reals called generated: the unjudged one is not
    assert out["acc_fake"] == pytest.approx(2 / 4)  # two of four caught: the unjudged one is not
    assert (out["n_too_small_real"], out["n_too_small_fake"]) == (1, 1)
    plain = M.summary(labels, scores, threshold=0.0, n_boot=0)
    assert out["auc"] == plain["auc"] and (plain["acc_real"], plain["acc_fake"]) == (0.5, 0.75)
    assert "n_too_small_real" not in plain
    df = pd.DataFrame({"label": labels, "logit_p": scores, "short_side": np.where(judged, 64.0, 63.0),
                       "generator": ["real"] * 4 + ["g"] * 4, "source": "s", "family": ["real"] * 4 + ["g"] * 4})
    tidy = group_metrics(df, [ModelSpec("p", min_side=64)], [Group("all", "all", np.ones(8, bool))], n_boot=0)
    got = dict(zip(tidy["metric"], tidy["value"]))
    assert got["acc_real"] == pytest.approx(0.75) and got["n_too_small_fake"] == 1


@pytest.fixture(scope="module")
def small_probe(trained_probe, tmp_path_factory):  # noqa: F811
    """The fixture probe with a 64 px minimum, and three images: 40x90, 64x64 and 128x96 px."""
    from safetensors.torch import save_file

    from detector.checkpoints import METADATA_KEY, read_state_dict

    path, _, _ = trained_probe
    state, metadata = read_state_dict(path)
    folder = tmp_path_factory.mktemp("small")
    out = folder / "probe_min64.safetensors"
    save_file(state, str(out), metadata={METADATA_KEY: json.dumps({**metadata, "probe": {**metadata["probe"],
                                                                                            "min_side": 64}})})
    rng = np.random.default_rng(0)
    images = folder / "images"
    (images / "real").mkdir(parents=True)
    (images / "fake").mkdir()
    for name, (h, w) in {"real/a.png": (40, 90), "real/b.png": (64, 64), "fake/c.png": (96, 128),
                         "fake/d.png": (60, 60)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    return out, images


def test_scan_writes_too_small_rows_without_probability_and_counts_them(small_probe, tmp_path):
    weights, images = small_probe
    out = tmp_path / "scan.csv"
    done = CliRunner().invoke(main, ["scan", str(images), "--weights", str(weights), "-o", str(out), "-q"])
    assert done.exit_code == 0, done.output
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    by_name = {Path(p).name: r for p, r in rows.iterrows()}
    for name in ("a.png", "d.png"):
        assert by_name[name]["label"] == TOO_SMALL and by_name[name]["probability"] == "" and by_name[name]["logit"] != ""
    for name in ("b.png", "c.png"):
        assert by_name[name]["label"] in ("real", "fake") and 0 <= float(by_name[name]["probability"]) <= 1
    assert "2 too small to judge" in done.output
    one = CliRunner().invoke(main, ["scan", str(images / "real" / "a.png"), "--weights", str(weights)])
    assert one.exit_code == 0 and "too small to judge (90x40 px): no verdict" in one.output, one.output


def test_evaluate_counts_too_small_images_under_each_condition(small_probe, tmp_path):
    weights, images = small_probe
    out = tmp_path / "eval"
    done = CliRunner().invoke(main, ["evaluate", str(images), "--weights", str(weights), "-o", str(out),
                                     "--perturb", "resize:0.5", "--bootstrap", "0", "-q"])
    assert done.exit_code == 0, done.output
    sweep = pd.read_csv(out / "robustness.csv")
    everything = sweep[(sweep["group"] == "all") & (sweep["model"] != "fused")]
    counts = {(c, m): v for c, m, v in zip(everything["condition"], everything["metric"], everything["value"])}
    assert counts[("none", "n_too_small_real")] == 1 and counts[("none", "n_too_small_fake")] == 1
    # halved: 64 -> 32 and 96x128 -> 48x64 px are too small; 40x90 and 60x60 fall under the scan's own floor
    # (detector.scoring.MIN_SIDE, 32 px): error rows, out of the metrics as unreadable files are
    assert (counts[("resize:0.5", "n_real")], counts[("resize:0.5", "n_fake")]) == (1, 1)
    assert counts[("resize:0.5", "n_too_small_real")] == 1 and counts[("resize:0.5", "n_too_small_fake")] == 1
    assert counts[("resize:0.5", "acc_fake")] == 0.0 and counts[("resize:0.5", "acc_real")] == 1.0
    scores = pd.read_csv(out / "scores.csv")
    assert sorted(scores["short_side"]) == [40, 60, 64, 96]
