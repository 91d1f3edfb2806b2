"""`detector evaluate`: layouts, groups, metrics against scikit-learn, bias guards, sweeps, fusion, resume.

The network is slow on a CPU, so the scored runs use a few 32-40 px noise images and share work
through module-scoped fixtures; everything else runs on synthetic scores.
"""

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from detector import metrics as M
from detector.checkpoints import file_sha256, save_checkpoint
from detector.cli import main
from detector.datasets import folder_label, read_corvi, read_labelled, read_scan_output
from detector.evaluation import (
    OUTPUT_FILES,
    EvalOptions,
    ModelSpec,
    Perturbation,
    ScoreCache,
    bias_warnings,
    breakdown_groups,
    evaluate,
    fuse_models,
    group_metrics,
    metric_groups,
    parse_perturbations,
    preprocess,
    size_bucket,
)
from detector.images import InputError, decode_image, reencode_jpeg
from detector.inference import Detector
from detector.patches import PatchSettings
from detector.results import RESULT_COLUMNS
from tests.conftest import noise_image, seeded_model

FAST = EvalOptions(patches=PatchSettings(patch_size=64, num_patches=1), workers=0, n_boot=20, progress=False)
SWEEP = parse_perturbations(["jpeg:80", "crop:24"])


def _save(path: Path, pixels: np.ndarray, quality: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality:
        Image.fromarray(pixels).save(path, quality=quality)
    else:
        Image.fromarray(pixels).save(path)
    return path


def _bench(root: Path) -> Path:
    """Three reals (one JPEG), three fakes of two generators in two families, one unreadable file."""
    rows = [("real/a.png", 0, "", "", (32, 32)), ("real/b.png", 0, "", "", (40, 32)),
            ("real/c.jpg", 0, "", "", (32, 40)), ("fake/g1_0.png", 1, "gen1", "gan", (32, 32)),
            ("fake/g1_1.png", 1, "gen1", "gan", (32, 32)), ("fake/g2_0.png", 1, "gen2", "diffusion", (40, 40))]
    for k, (name, _, _, _, (h, w)) in enumerate(rows):
        _save(root / name, noise_image(h, w, seed=10 + k), quality=90 if name.endswith(".jpg") else None)
    (root / "real").mkdir(exist_ok=True)
    (root / "real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = ["path,label,generator,family"] + [f"{n},{'fake' if lab else 'real'},{g},{f}" for n, lab, g, f, _ in rows]
    lines.append("real/broken.png,0,,")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def detectors(checkpoint, tmp_path_factory):
    second = tmp_path_factory.mktemp("weights2") / "other.safetensors"
    # a second, cheaper architecture (downsampling ResNet-18) with a calibration of its own
    save_checkpoint(second, seeded_model("resnet18", seed=1), {"calibration": {"threshold": 0.25, "temperature": 2.0}},
                    dtype=None)
    return [Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32"),
            Detector.from_checkpoint(second, device="cpu", precision="fp32")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return _bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def run(bench, detectors, tmp_path_factory):
    """One scored evaluation: two models, fusion, a two-condition sweep."""
    out = tmp_path_factory.mktemp("eval")
    options = EvalOptions(**{**FAST.__dict__, "perturbations": SWEEP, "model_fusion": "soft-or"})
    result = evaluate(read_labelled(bench), detectors, out, options, names=["a", "b"])
    return out, result, options


# ---------------------------------------------------------------------------------------- layouts


def test_manifest_layout(bench):
    df = read_labelled(bench)
    assert list(df["label"]) == [0, 0, 0, 1, 1, 1, 0]
    assert list(df["generator"]) == ["real", "real", "real", "gen1", "gen1", "gen2", "real"]
    assert list(df["family"][3:6]) == ["gan", "gan", "diffusion"]
    assert all(Path(p).is_absolute() or Path(p).exists() for p in df["path"])


def test_cnndetection_layout(tmp_path):
    img = noise_image(8, 8)
    for rel in ("progan/cat/0_real/x.png", "progan/cat/1_fake/y.png", "progan/dog/1_fake/z.png",
                "biggan/0_real/r.png", "biggan/1_fake/f.png"):
        _save(tmp_path / rel, img)
    df = read_labelled(tmp_path).sort_values("path")
    got = {Path(p).relative_to(tmp_path).as_posix(): (lab, gen) for p, lab, gen in zip(df["path"], df["label"], df["generator"])}
    assert got == {"progan/cat/0_real/x.png": (0, "real"), "progan/cat/1_fake/y.png": (1, "progan"),
                   "progan/dog/1_fake/z.png": (1, "progan"), "biggan/0_real/r.png": (0, "real"),
                   "biggan/1_fake/f.png": (1, "biggan")}


def test_corvi_layout(tmp_path):
    img = noise_image(8, 8)
    for rel in ("real_coco/1.png", "Reals/2.png", "REAL/6.png", "sdxl/3.png", "dalle3/4.png"):
        _save(tmp_path / rel, img)
    df = read_labelled(tmp_path)
    got = {Path(p).name: (lab, gen) for p, lab, gen in zip(df["path"], df["label"], df["generator"])}
    assert got == {"1.png": (0, "real"), "2.png": (0, "real"), "6.png": (0, "real"),
                   "3.png": (1, "sdxl"), "4.png": (1, "dalle3")}
    assert folder_label("0_real") == 0 and folder_label("Real_LAION") == 0 and folder_label("midjourney") == 1


@pytest.mark.parametrize("name", ["unreal_engine", "RealVisXL", "imagenet_real", "surreal", "realistic-vision"])
def test_corvi_layout_refuses_ambiguous_real_names(tmp_path, name):
    for rel in ("real/1.png", f"{name}/2.png"):
        _save(tmp_path / rel, noise_image(8, 8))
    with pytest.raises(InputError, match=f"{name}.*contains 'real'.*manifest"):
        read_labelled(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "manifest" in result.output and "Traceback" not in result.output


def test_scan_output_layout(tmp_path, bench):
    labels = read_labelled(bench)
    scan = tmp_path / "scan.csv"
    # absolute paths, and a path relative to the scan CSV's folder (not to the working folder)
    paths = [str(Path(p).resolve()) for p in labels["path"]]
    paths[3] = os.path.relpath(paths[3], tmp_path)
    lines = [",".join(RESULT_COLUMNS)]
    lines.append(f"{paths[0]},1.5,0.8,fake,32,32,PNG,1,0.1,")
    lines.append(f"{paths[3]},-0.5,0.4,real,32,32,PNG,1,0.1,")
    lines.append(f"{paths[6]},,,,,,,0,0.0,cannot decode: broken")
    lines.append(f"{tmp_path / 'unlabelled.png'},0.1,0.5,fake,8,8,PNG,1,0.1,")
    scan.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="scan"):
        read_labelled(scan)
    with pytest.warns(UserWarning, match="1 of 4 scanned files have no label"):
        df = read_scan_output(scan, labels)
    assert list(df["label"]) == [0, 1, 0] and list(df["generator"]) == ["real", "gen1", "real"]
    assert df["logit"].iloc[0] == 1.5 and df["logit"].iloc[1] == -0.5 and math.isnan(df["logit"].iloc[2])
    assert df["error"].iloc[2].startswith("cannot decode")


def test_shared_fixture_layout(fixture_dir):
    manifest = pd.read_csv(fixture_dir / "manifest.csv")
    df = read_labelled(fixture_dir)
    assert list(df["label"]) == list(manifest["label"])
    assert list(df["generator"]) == list(manifest["generator"])
    corvi = read_corvi(fixture_dir)  # real/ and fake/ folders: one generator called "fake"
    assert (corvi["label"] == 0).sum() == (manifest["label"] == 0).sum()
    assert set(corvi.loc[corvi["label"] == 1, "generator"]) == {"fake"}


# ---------------------------------------------------------------------------------- groups, metrics

def _synthetic(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gens = ["real"] * 30 + ["g1"] * 10 + ["g2"] * 15
    labels = [0 if g == "real" else 1 for g in gens]
    logits = np.r_[rng.normal(0, 1, 30), rng.normal(1.5, 1, 10), rng.normal(0.5, 1, 15)]
    return pd.DataFrame({"path": [f"{i}.png" for i in range(55)], "label": labels, "generator": gens,
                         "family": gens, "source": gens, "logit_m": logits})


def test_per_generator_rows_pool_all_reals():
    df = _synthetic()
    model = ModelSpec("m", threshold=0.2, temperature=1.5)
    tidy = group_metrics(df, [model], metric_groups(df), n_boot=0)
    value = tidy.set_index(["group", "metric"])["value"]
    reals = df[df["label"] == 0]["logit_m"].to_numpy()
    for g, n in (("g1", 10), ("g2", 15)):
        fakes = df[df["generator"] == g]["logit_m"].to_numpy()
        assert value[(g, "n_real")] == 30 and value[(g, "n_fake")] == n
        y, s = np.r_[np.zeros(30), np.ones(n)], np.r_[reals, fakes]
        assert value[(g, "auc")] == pytest.approx(roc_auc_score(y, s))
    assert value[("all", "n_fake")] == 25
    assert value[("average", "auc")] == pytest.approx((value[("g1", "auc")] + value[("g2", "auc")]) / 2)
    assert value[("average", "n_fake")] == 25
    assert not any(g.startswith("family:") for g in tidy["group"])  # family = generator: no family rows


def test_average_interval_is_a_bootstrap_of_the_mean():
    df = _synthetic()
    tidy = group_metrics(df, [ModelSpec("m")], metric_groups(df), n_boot=300, seed=4)
    value = tidy.set_index(["group", "metric"])["value"]
    reals = df.loc[df["label"] == 0, "logit_m"].to_numpy()
    fakes = [df.loc[df["generator"] == g, "logit_m"].to_numpy() for g in ("g1", "g2")]
    # by hand: one resample of the reals per replicate, shared by both generators, then the mean AUC
    rng = np.random.default_rng(4)
    r = reals[rng.integers(0, 30, (300, 30))]
    f = [g[rng.integers(0, g.size, (300, g.size))] for g in fakes]
    means = [np.mean([roc_auc_score(np.r_[np.zeros(30), np.ones(fg[i].size)], np.r_[r[i], fg[i]]) for fg in f])
             for i in range(300)]
    assert value[("average", "auc_low")] == pytest.approx(np.quantile(means, 0.025))
    assert value[("average", "auc_high")] == pytest.approx(np.quantile(means, 0.975))
    # not the mean of the per-generator bounds (what it was): the mean of two AUCs varies less than either
    assert value[("average", "auc_high")] - value[("average", "auc_low")] < \
        ((value[("g1", "auc_high")] - value[("g1", "auc_low")]) + (value[("g2", "auc_high")] - value[("g2", "auc_low")])) / 2


def test_metrics_equal_sklearn_on_scores_csv(run):
    out, _, _ = run
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    metrics = pd.read_csv(out / "metrics.csv").set_index(["group", "model", "metric"])["value"]
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert set(models) == {"a", "b", "fused"}
    ok = scores[scores["error"].isna()]
    reals = ok[ok["label"] == 0]
    for name, spec in models.items():
        t, temp = spec["threshold"], spec["temperature"]
        for group, fakes in (("gen1", ok[ok["generator"] == "gen1"]), ("all", ok[ok["label"] == 1]),
                             ("family:diffusion", ok[ok["family"] == "diffusion"])):
            part = pd.concat([reals, fakes])
            y, s = part["label"].to_numpy(), part[f"logit_{name}"].to_numpy()
            m = lambda k: metrics[(group, name, k)]  # noqa: E731
            assert m("n_real") == 3 and m("n_fake") == len(fakes)
            assert m("auc") == pytest.approx(roc_auc_score(y, s))
            assert m("ap") == pytest.approx(average_precision_score(y, s))
            assert m("acc_real") == pytest.approx(np.mean(s[y == 0] < t))
            assert m("acc_fake") == pytest.approx(np.mean(s[y == 1] >= t))
            assert m("balanced_acc") == pytest.approx(0.5 * (np.mean(s[y == 0] < t) + np.mean(s[y == 1] >= t)))
            # the calibrated probability, 0.5 at the threshold; detector.metrics clips at 1e-15
            p = np.clip(1 / (1 + np.exp(-(s - t) / temp)), 1e-15, 1 - 1e-15)
            assert m("log_loss") == pytest.approx(log_loss(y, p))
            assert m("eer") == pytest.approx(M.equal_error_rate(y, s)[0])
            assert m("pd@0.1far") == pytest.approx(M.detection_at_far(y, s, 0.1))
    # the calibrated threshold of the checkpoint is the one used
    assert metrics[("all", "b", "threshold")] == 0.25


def test_broken_file_is_reported_and_left_out(run):
    out, result, _ = run
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    broken = scores[scores["path"].str.endswith("broken.png")]
    assert len(broken) == 1 and broken["error"].iloc[0] and broken["logit_a"].iloc[0] == ""
    assert result.n_errors == 1 and any("could not be scored" in w for w in result.warnings)


def test_every_file_is_written(run, checkpoint):
    out, result, options = run
    for name in (*OUTPUT_FILES, "robustness.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("roc.png", "scores.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.width > 300
    record = json.loads((out / "run.json").read_text())
    assert record["models"][0]["weights_sha256"] == file_sha256(checkpoint)
    assert record["settings"]["patches"]["patch_size"] == 64 and record["seed"] == 0
    assert record["settings"]["perturbations"] == ["jpeg:80", "crop:24"]
    assert {"torch", "numpy", "scikit-learn", "python"} <= set(record["versions"]) and record["date"]
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    auc = pd.read_csv(out / "auc.csv")
    assert list(auc.columns) == ["group", "a", "b", "fused"]
    assert list(auc["group"]) == ["gen1", "gen2", "family:diffusion", "family:gan", "all", "average"]
    assert list(pd.read_csv(out / "acc.csv")["group"]) == list(auc["group"])


def test_fused_column_and_robustness_table(run):
    out, _, options = run
    scores = pd.read_csv(out / "scores.csv")
    models = json.loads((out / "metrics.json").read_text())["models"]
    specs = [ModelSpec(n, **models[n]) for n in ("a", "b")]
    fused, spec = fuse_models(scores[["logit_a", "logit_b"]].to_numpy(), specs, "soft-or")
    np.testing.assert_allclose(scores["logit_fused"], fused)
    assert spec.threshold == pytest.approx(models["fused"]["threshold"])
    rob = pd.read_csv(out / "robustness.csv")
    assert list(rob.columns) == ["condition", "group", "model", "metric", "value"]
    assert set(rob["condition"]) == {"none", "jpeg:80", "crop:24"}
    clean = rob[rob["condition"] == "none"].drop(columns="condition").reset_index(drop=True)
    metrics = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(clean, metrics)
    assert (out / "robustness" / "jpeg_80.csv").is_file() and (out / "robustness" / "crop_24_scores.csv").is_file()
    perturbed = pd.read_csv(out / "robustness" / "jpeg_80_scores.csv")
    ok = scores["error"].isna()
    assert not np.allclose(perturbed["logit_a"][ok], scores["logit_a"][ok])


def test_killed_and_rerun_gives_same_metrics(run, bench, detectors, tmp_path):
    out, first, options = run
    copy = tmp_path / "eval"
    shutil.copytree(out / "cache", copy / "cache")
    part = sorted((copy / "cache").glob("part-*.csv"))[-1]
    data = part.read_bytes()
    part.write_bytes(data[: int(len(data) * 0.85)])  # a torn cache: its last rows are lost
    again = evaluate(read_labelled(bench), detectors, copy, options, names=["a", "b"])
    assert 0 < again.n_scored < first.n_scored and again.n_reused > 0
    assert (copy / "metrics.csv").read_bytes() == (out / "metrics.csv").read_bytes()
    assert (copy / "robustness.csv").read_bytes() == (out / "robustness.csv").read_bytes()
    for name in ("metrics.csv", "auc.csv", "scores.csv"):
        (copy / name).unlink()
    third = evaluate(read_labelled(bench), detectors, copy, options, names=["a", "b"])
    assert third.n_scored == 0
    assert (copy / "metrics.csv").read_bytes() == (out / "metrics.csv").read_bytes()


def test_cache_skips_damaged_rows(tmp_path):
    cache = ScoreCache(tmp_path, flush_every=2)
    cache.put("aa", "k", 0.1234567891)
    cache.put("bb", "k", -2.5)
    (part,) = list(tmp_path.glob("part-*.csv"))
    text = part.read_text()
    part.write_text(text.replace("-2.5", "-2.4"))  # a corrupted value fails its CRC
    reread = ScoreCache(tmp_path)
    assert reread.get("aa", "k") == 0.1234567891 and reread.get("bb", "k") is None and reread.n_damaged == 1


# ---------------------------------------------------------------------------- bias guards, sweeps


def test_align_jpeg_changes_both_classes(run, bench, detectors, tmp_path):
    out, _, _ = run
    table = read_labelled(bench)
    table = table[~table["path"].str.endswith("broken.png")]
    for path in table["path"]:
        stored = decode_image(path).pixels
        aligned = preprocess(stored, align_jpeg=50)
        assert not np.array_equal(aligned, stored)
        np.testing.assert_array_equal(aligned, reencode_jpeg(stored, 50))
    options = EvalOptions(**{**FAST.__dict__, "align_jpeg": 50})
    subset = table[table["path"].str.contains("a.png|g1_0")]
    result = evaluate(subset, detectors[:1], tmp_path, options, names=["a"])
    assert result.n_scored == 2
    aligned = pd.read_csv(tmp_path / "scores.csv").set_index("path")["logit_a"]
    plain = pd.read_csv(out / "scores.csv").set_index("path")["logit_a"]
    assert sorted(pd.read_csv(tmp_path / "scores.csv")["label"]) == [0, 1]
    for path, logit in aligned.items():
        assert logit != pytest.approx(plain[path], abs=1e-6)


def test_center_crop_is_central_and_grid_aligned():
    px = noise_image(50, 70)
    out = preprocess(px, center_crop=32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, px[8:40, 16:48])
    assert preprocess(px, center_crop=64).shape == (50, 64, 3)


def test_bias_warnings_and_breakdown():
    n = 20
    df = pd.DataFrame({"label": [0] * n + [1] * n, "format": ["JPEG"] * (n - 2) + ["PNG"] * 2 + ["PNG"] * n,
                       "jpeg_quality": [90.0] * (n - 2) + [np.nan] * 2 + [np.nan] * n,
                       "width": [1024] * n + [256] * n, "height": [768] * n + [256] * n, "error": [""] * (2 * n),
                       "sha256": [f"{i}" for i in range(2 * n)]})
    notes = bias_warnings(df)
    assert any("file format differs" in w and "90% JPEG" in w for w in notes)
    assert any("image size differs" in w and "--center-crop 256" in w for w in notes)
    names = [g.name for g in breakdown_groups(df)]
    assert names == ["format:JPEG", "format:PNG", "size:256-511", "size:512-1023"]
    fmt = breakdown_groups(df)[1]
    assert fmt.mask.sum() == 2 + n  # both classes restricted to PNG
    same = df.assign(format="PNG", width=512, height=512, jpeg_quality=np.nan)
    assert bias_warnings(same) == []
    assert size_bucket(100, 3000) == "<256" and size_bucket(4000, 3000) == ">=2048"


def test_perturbations_parse_and_are_seeded_per_content():
    assert [p.name for p in parse_perturbations(["jpeg:95,75", "resize:0.5", "blur:1", "crop:256", "jpeg:95"])] == \
        ["jpeg:95", "jpeg:75", "resize:0.5", "blur:1", "crop:256"]
    for bad in ("jpeg:101", "resize:0", "crop:3", "sharpen:1", "jpeg", "blur:x"):
        with pytest.raises(ValueError):
            parse_perturbations([bad])
    from detector.evaluation.conditions import condition_rng as _condition_rng

    px = noise_image(64, 64)
    crop = Perturbation("crop", 16)
    a = crop.apply(px, _condition_rng(0, "abc", crop.name))
    b = crop.apply(px, _condition_rng(0, "abc", crop.name))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 16, 3)
    assert Perturbation("resize", 0.5).apply(px, None).shape == (32, 32, 3)
    assert not np.array_equal(Perturbation("blur", 1).apply(px, None), px)


def test_fuse_models_hand_cases():
    a, b = ModelSpec("a"), ModelSpec("b", threshold=1.0, temperature=2.0)
    logits = np.array([[0.0, 0.0], [2.0, 4.0], [np.nan, 1.0]])
    # calibrated margins (logit - threshold) / temperature: a [0, 2], b [-0.5, 1.5]
    mean, spec = fuse_models(logits, [a, b], "mean")
    np.testing.assert_allclose(mean[:2], [-0.25, 1.75])
    assert np.isnan(mean[2]) and spec.threshold == 0.0 and spec.temperature == 1.0
    top, spec = fuse_models(logits, [a, b], "max")
    np.testing.assert_allclose(top[:2], [0.0, 2.0])
    assert spec.threshold == 0.0
    soft, _ = fuse_models(np.zeros((1, 2)), [a, a], "soft-or")
    assert soft[0] == pytest.approx(math.log(3))  # 1 - (1/2)(1/2) = 3/4, logit log 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extreme, _ = fuse_models(np.array([[-800.0, -800.0], [800.0, 1.0]]), [a, a], "soft-or")
    assert np.isfinite(extreme).all() and extreme[1] > 100
    with pytest.raises(ValueError, match="model fusion"):
        fuse_models(logits, [a, b], "median")


def test_fused_max_and_soft_or_say_fake_when_a_model_does():
    """With different thresholds, fusing thresholds would overrule a model that says "generated"."""
    a, b = ModelSpec("a", threshold=0.0), ModelSpec("b", threshold=3.0)
    logits = np.array([[1.0, -5.0], [-1.0, 3.5], [-1.0, 2.0]])  # a says fake; b says fake; neither does
    says_fake = [(logits[:, k] >= m.threshold) for k, m in enumerate((a, b))]
    for rule in ("max", "soft-or"):
        fused, spec = fuse_models(logits, [a, b], rule)
        np.testing.assert_array_equal(fused[:2] >= spec.threshold, [True, True])
        if rule == "max":
            np.testing.assert_array_equal(fused >= spec.threshold, says_fake[0] | says_fake[1])


# ------------------------------------------------------------------------------------------- CLI


def test_cli_evaluate_then_scan_output(bench, checkpoint, tmp_path):
    subset = tmp_path / "subset.csv"
    subset.write_text(f"path,label,generator\n{bench.parent / 'real/a.png'},0,\n{bench.parent / 'fake/g2_0.png'},1,gen2\n")
    common = ["--patch-size", "64", "--num-patches", "1", "--bootstrap", "10", "--precision", "fp32", "-q"]
    result = CliRunner().invoke(main, ["evaluate", str(subset), "--weights", str(checkpoint), "-o", str(tmp_path / "e"),
                                       "--workers", "1", *common])
    assert result.exit_code == 0, result.output
    assert "AUC [95% CI]" in result.output and "gen2" in result.output
    # the counts it read, per class and generator, come before any score
    assert result.output.index("read 1 real, 1 fake (gen2 1)") < result.output.index("AUC [95% CI]")
    scores = pd.read_csv(tmp_path / "e" / "scores.csv")

    scan = CliRunner().invoke(main, ["scan", str(subset), "--weights", str(checkpoint), "-o", str(tmp_path / "s.csv"),
                                     "--workers", "0", "--patch-size", "64", "--num-patches", "1", "--precision", "fp32",
                                     "-q"])
    assert scan.exit_code == 0, scan.output
    again = CliRunner().invoke(main, ["evaluate", str(tmp_path / "s.csv"), "--labels", str(subset),
                                      "-o", str(tmp_path / "f"), *common])
    assert again.exit_code == 0, again.output
    assert "labels read: 1 real, 1 fake (gen2 1)" in again.output
    from_scan = pd.read_csv(tmp_path / "f" / "scores.csv")
    assert list(from_scan["label"]) == [0, 1] and list(from_scan["generator"]) == ["real", "gen2"]
    np.testing.assert_allclose(from_scan["logit_seeded"], scores["logit_seeded"], rtol=1e-5)
    for name in OUTPUT_FILES:
        assert (tmp_path / "f" / name).is_file(), name

    bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "s.csv"), "-o", str(tmp_path / "g")])
    assert bad.exit_code != 0 and "--labels" in bad.output
    bad = CliRunner().invoke(main, ["evaluate", str(subset), "-o", str(tmp_path / "g"), "--perturb", "sharpen:2"])
    assert bad.exit_code != 0 and "perturbation must be one of" in bad.output and "Traceback" not in bad.output


def test_evaluate_help_documents_every_option():
    out = CliRunner().invoke(main, ["evaluate", "--help"]).output
    for opt in ("--weights", "--output-dir", "--labels", "--fusion-models", "--align-jpeg", "--center-crop", "--perturb",
                "--bootstrap", "--mode", "--patch-size", "--num-patches", "--fusion", "--workers", "--precision"):
        assert opt in out, opt


def test_cache_key_covers_version_device_and_precision(monkeypatch):
    from detector.evaluation import cache, settings_key

    model = {"weights_sha256": "ab" * 32, "architecture": "resnet50nodown", "device": "cpu", "precision": "fp32",
             "torch": "2.14.1", "weights": "/somewhere/w.safetensors"}
    key = settings_key(model, FAST, "none")
    assert settings_key({**model, "weights": "/elsewhere/w.safetensors"}, FAST, "none") == key  # the path does not count
    for field, other in (("device", "cuda:0"), ("precision", "bf16"), ("torch", "2.15.0"), ("weights_sha256", "cd" * 32)):
        assert settings_key({**model, field: other}, FAST, "none") != key, field
    assert settings_key(model, FAST, "jpeg:90") != key
    monkeypatch.setattr(cache, "_package_version", lambda: "99.0")
    assert settings_key(model, FAST, "none") != key


def test_wild_conditions_chain_and_keep_both_classes_alike():
    from detector.evaluation.conditions import WILD_CONDITIONS, Chain

    conditions = parse_perturbations([*WILD_CONDITIONS, "png", "webp:80"])
    assert [c.name for c in conditions] == [*WILD_CONDITIONS, "png", "webp:80"]
    px = noise_image(1200, 2400)
    rng = np.random.default_rng(0)
    by_name = {c.name: c for c in conditions}
    crop = by_name["center:256+jpeg:90"]
    assert isinstance(crop, Chain) and crop.apply(px, rng).shape == (256, 256, 3)
    assert by_name["screenshot:1080"].apply(px, rng).shape == (960, 1920, 3)  # fitted into 1920x1080
    assert by_name["screenshot:1080"].apply(px[:500, :600], rng).shape == (500, 600, 3)  # small: unscaled
    assert np.array_equal(by_name["png"].apply(px, rng), px)  # lossless: only the container changes
    assert not np.array_equal(by_name["webp:80"].apply(px, rng), px)
    for bad in ("center:4", "screenshot:10", "webp:0", "center:256+jpeg:90,80"):
        with pytest.raises(ValueError):
            parse_perturbations([bad])


def test_sources_that_name_files_group_by_their_folder(tmp_path):
    rows = ["path,label,generator,source"]
    for k in range(6):
        rows.append(f"r{k}.png,0,real,real/collection-{k % 2}/photo{k}.png")
    rows += [f"f{k}.png,1,gan,gan" for k in range(6)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    table = read_labelled(tmp_path / "m.csv")
    assert sorted(set(table.loc[table.label == 0, "source"])) == ["real/collection-0", "real/collection-1"]
    from detector.evaluation import metric_groups

    names = [g.name for g in metric_groups(table.assign(format="PNG", width=64, height=64))]
    assert names.count("real:real/collection-0") == 1 and not any(n.endswith(".png") for n in names)


def test_small_groups_get_no_interval_and_are_marked():
    from detector.evaluation import Group, ModelSpec, group_metrics, summary_table

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"label": [0] * 20 + [1] * 23, "logit_m": np.r_[rng.normal(0, 1, 20), rng.normal(2, 1, 23)],
                       "generator": ["real"] * 20 + ["big"] * 20 + ["tiny"] * 3})
    real = (df["label"] == 0).to_numpy()
    groups = [Group(g, "generator", real | (df["generator"] == g).to_numpy()) for g in ("big", "tiny")]
    metrics = group_metrics(df, [ModelSpec("m")], groups, n_boot=50, average=False)
    value = metrics.set_index(["group", "metric"])["value"]
    assert np.isfinite(value[("big", "auc_low")]) and not np.isfinite(value[("tiny", "auc_low")])
    assert ("tiny", "small") in value.index and ("big", "small") not in value.index
    table = summary_table(metrics)
    assert "tiny (<5)" in table and "big (<5)" not in table and "no interval" in table


def test_fused_rows_only_when_several_models_vote():
    from detector.evaluation import ModelSpec
    from detector.evaluation.groups import with_fusion

    frame = pd.DataFrame({"logit_a": [0.1, 2.0], "logit_b": [1.0, -1.0]})
    models = [ModelSpec("a"), ModelSpec("b")]
    assert [m.name for m in with_fusion({"clean": frame.copy()}, models, "mean", [1.0, 0.0])] == ["a", "b"]
    assert [m.name for m in with_fusion({"clean": frame.copy()}, models, "mean", [1.0, 1.0])] == ["a", "b", "fused"]


def test_label_intervals_resample_whole_sources():
    """The ``all`` row's label intervals: a source whose every photo is called generated widens the
    FPR interval far beyond the same false positives spread over every source."""
    from detector.evaluation.groups import label_intervals

    n = 10
    df = pd.DataFrame({"source": np.repeat([f"s{i}" for i in range(n)], 10).tolist() + ["-"] * 20,
                       "family": ["-"] * 100 + ["a"] * 10 + ["b"] * 10})
    labels = np.r_[np.zeros(100, int), np.ones(20, int)]
    keep = np.ones(120, bool)
    spread = np.r_[np.tile(np.r_[True, np.zeros(9, bool)], n), np.ones(20, bool)]  # 1 in 10 in every source
    lumped = np.r_[np.repeat(np.r_[True, np.zeros(n - 1, bool)], 10), np.ones(20, bool)]  # all of one source
    even = label_intervals(df, labels, spread, keep)
    uneven = label_intervals(df, labels, lumped, keep)
    assert even["label_fpr_low"] == pytest.approx(0.1) and even["label_fpr_high"] == pytest.approx(0.1)
    assert uneven["label_fpr_low"] == 0.0 and uneven["label_fpr_high"] >= 0.25
    assert even["label_recall_low"] == even["label_recall_high"] == 1.0
