"""Exported models (detector.export) run by onnxruntime and OpenVINO (detector.runtimes): they score
like the PyTorch model, through the same Detector; int8 keeps the ranking on the shared fixture."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from detector.checkpoints import CheckpointError, file_sha256, save_checkpoint
from detector.cli import main
from detector.export import ExportError, ExportOptions, export_model, load_exported, read_export
from detector.hub import load_detector
from detector.inference import Detector
from detector.patches import PatchSettings
from detector.runtimes import BackendError
from tests.conftest import DEV, FIXTURE, ROOT, noise_image, seeded_model

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'detector[export]')")
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="OpenVINO is not installed (pip install 'detector[openvino]')")
FORMATS = ("onnx", "openvino") if HAVE_OPENVINO else ("onnx",)
BACKENDS = ("onnxruntime", "openvino") if HAVE_OPENVINO else ("onnxruntime",)

BUNDLED = ROOT / "weights" / "resnet50nodown_dev.safetensors"
CALIBRATION = {"temperature": 2.5, "threshold": 0.75, "rule": "platt"}


@pytest.fixture(scope="module")
def calibrated_checkpoint(tmp_path_factory):
    """The seeded ResNet-50 (fp32) with a calibration in its metadata."""
    path = tmp_path_factory.mktemp("export-weights") / "seeded.safetensors"
    save_checkpoint(path, seeded_model(), {"calibration": CALIBRATION}, dtype=None)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, calibrated_checkpoint):
    """The seeded checkpoint exported to ONNX and OpenVINO (fp32)."""
    out = tmp_path_factory.mktemp("exported") / "seeded"
    export_model(calibrated_checkpoint, out, ExportOptions(formats=FORMATS))
    return out


def _crops(shape: tuple[int, int], n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack([noise_image(*shape, seed=seed + i) for i in range(n)])).permute(0, 3, 1, 2)


def test_export_record_carries_what_inference_needs(exported, calibrated_checkpoint):
    record = json.loads((exported / "export.json").read_text())
    assert record["architecture"] == record["model_config"]["architecture"] == "resnet50nodown"
    assert record["model_config"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert record["model_config"]["output_stride"] == 8
    assert record["calibration"] == CALIBRATION
    assert (record["receptive_field"], record["tile_margin"]) == (113, 64)
    assert record["source"]["sha256"] == file_sha256(calibrated_checkpoint)
    assert sorted(record["models"]) == sorted(FORMATS)
    assert record["models"]["onnx"]["fp32"]["files"] == {"model.onnx": file_sha256(exported / "model.onnx")}


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_exported_logit_maps_match_torch(exported, calibrated_checkpoint, backend):
    """Any batch, height and width (dynamic axes), the logit map before pooling, as torch fp32 gives it
    (up to float rounding: 1e-4, relative to logits of up to ~15 here)."""
    reference = Detector.from_checkpoint(calibrated_checkpoint, device="cpu", precision="fp32")
    det = load_exported(exported, backend=backend)
    assert (det.precision, det.runtime.backend, det.stride, det.tile_margin) == ("fp32", backend, 8, 64)
    assert (det.temperature, det.threshold) == (CALIBRATION["temperature"], CALIBRATION["threshold"])
    for shape, n in (((64, 64), 2), ((72, 96), 1), ((128, 64), 1)):
        batch = _crops(shape, n)
        ours, theirs = det.crop_maps(batch), reference.crop_maps(batch)
        assert ours.shape == theirs.shape == (n, -(-shape[0] // 8), -(-shape[1] // 8))
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_npr_input_exports_too(tmp_path):
    """The NPR input residual (slicing and repeats of the input) is part of the graph, odd sizes included."""
    path = tmp_path / "npr.safetensors"
    save_checkpoint(path, seeded_model("resnet18nodown_npr"), dtype=None)
    export_model(path, tmp_path / "npr", ExportOptions(formats=("onnx",)))
    det, reference = load_exported(tmp_path / "npr"), Detector.from_checkpoint(path, device="cpu", precision="fp32")
    batch = _crops((72, 88), 2)
    np.testing.assert_allclose(det.crop_maps(batch), reference.crop_maps(batch), rtol=1e-4, atol=1e-4)


def _scan(args, tmp_path, name):
    out = tmp_path / f"{name}.csv"
    result = CliRunner().invoke(main, ["scan", *args, "-o", str(out), "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    return pd.read_csv(out, keep_default_na=False), json.loads((tmp_path / f"{name}.csv.json").read_text())


def test_scan_with_an_export_gives_the_torch_scores(exported, calibrated_checkpoint, tmp_path):
    """`scan --backend onnxruntime` (and a folder as --weights, backend auto: OpenVINO when installed) through
    the same scan: patches, full mode (its tile margin from export.json), heatmaps."""
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(96, 96), (80, 136), (160, 120)]):
        Image.fromarray(noise_image(h, w, seed=i)).save(images / f"img{i}.png")
    for mode, backends in ((["--patch-size", "64", "--num-patches", "2"], ("onnxruntime", "auto")),
                           (["--mode", "full"], ("onnxruntime",))):
        torch_rows, _ = _scan([str(images), "--weights", str(calibrated_checkpoint), "--precision", "fp32", *mode],
                              tmp_path, f"torch{mode[0]}")
        for backend in backends:
            heat = tmp_path / f"heat-{backend}{mode[0]}"
            rows, record = _scan([str(images), "--weights", str(exported), "--backend", backend, "--heatmaps", str(heat),
                                  *mode], tmp_path, f"{backend}{mode[0]}")
            assert (rows["path"] == torch_rows["path"]).all() and (rows["error"] == "").all()
            assert np.abs(rows["logit"] - torch_rows["logit"]).max() < 1e-4
            assert (rows["label"] == torch_rows["label"]).all()
            assert len(list(heat.glob("*.png"))) == 3
            expected = "openvino" if backend == "auto" and HAVE_OPENVINO else "onnxruntime"  # auto prefers OpenVINO
            assert record["detector"]["backend"] == expected and record["detector"]["precision"] == "fp32"
            assert record["detector"]["source_sha256"] == file_sha256(calibrated_checkpoint)
            if mode[0] == "--mode":
                assert record["patches"]["margin"] == 64


@pytest.mark.slow
def test_int8_keeps_the_ranking_on_the_fixture(fixture_dir, tmp_path):
    """int8 (static, QDQ, per-channel) calibrated on dev images: Spearman >= 0.995 against fp32 logits and
    AUC within 0.005 of fp32 on the labelled fixture, for onnxruntime and OpenVINO. 64 px patches, to stay quick."""
    from scipy.stats import spearmanr

    from detector.images import decode_image
    from detector.metrics import auc as roc_auc

    if not (DEV / "manifest.csv").is_file():
        pytest.skip(f"shared dev images not found at {DEV} (calibration data)")
    dev = pd.read_csv(DEV / "manifest.csv")
    small = dev[dev["width"] * dev["height"] <= 512 * 512].sample(n=32, random_state=0)
    listing = tmp_path / "calibration.csv"
    pd.DataFrame({"path": [str(DEV / p) for p in small["path"]]}).to_csv(listing, index=False)
    out = tmp_path / "int8"
    record = export_model(BUNDLED, out, ExportOptions(formats=FORMATS, int8=True, calibration=(str(listing),),
                                                       calibration_patches=64, patch_size=64))
    calibration = record["models"]["onnx"]["int8"]["quantization"]["calibration"]
    assert 48 <= calibration["patches"] <= 64 and calibration["unreadable"] == 0  # small images give fewer patches
    manifest = pd.read_csv(fixture_dir / "manifest.csv")
    images = [decode_image(fixture_dir / p).pixels for p in manifest["path"]]
    settings = PatchSettings(patch_size=64, num_patches=4)

    def logits(det):
        return np.array([det.score_pixels(px, settings)[0] for px in images])

    fp32 = logits(Detector.from_checkpoint(BUNDLED, device="cpu", precision="fp32"))
    auc_fp32 = roc_auc(manifest["label"].to_numpy(), fp32)
    for backend in BACKENDS:
        int8 = logits(load_exported(out, backend=backend, precision="int8"))
        rho = spearmanr(fp32, int8).statistic
        auc_int8 = roc_auc(manifest["label"].to_numpy(), int8)
        print(f"[int8] {backend}: spearman {rho:.4f}, AUC fp32 {auc_fp32:.4f} int8 {auc_int8:.4f} "
              f"(delta {auc_int8 - auc_fp32:+.4f}), max |logit diff| {np.abs(int8 - fp32).max():.3f}, "
              f"{len(images)} fixture images x 4 patches of 64 px")
        assert rho >= 0.995
        assert abs(auc_int8 - auc_fp32) <= 0.005


def test_precision_choices_of_an_export(exported, tmp_path):
    assert load_exported(exported, precision="auto").precision == "fp32"  # it holds no int8 model
    if HAVE_OPENVINO:
        assert load_exported(exported, backend="openvino", precision="bf16").precision == "bf16"
    with pytest.raises(ExportError, match=r"holds no onnx int8 model.*--int8 --calibration"):
        load_exported(exported, backend="onnxruntime", precision="int8")
    with pytest.raises(BackendError, match="runs precision fp32 or int8"):
        load_exported(exported, backend="onnxruntime", precision="bf16")
    with pytest.raises(BackendError, match="not fp16"):
        load_exported(exported, precision="fp16")
    with pytest.raises(BackendError, match="on the CPU"):
        load_exported(exported, device="cuda")


def test_backend_and_weights_must_agree(exported, calibrated_checkpoint):
    with pytest.raises(BackendError, match=r"--backend onnxruntime runs an exported model.*detector export --format onnx"):
        load_detector(calibrated_checkpoint, backend="onnxruntime")
    with pytest.raises(BackendError, match="--backend torch runs checkpoints"):
        load_detector(exported, backend="torch")
    with pytest.raises(ValueError, match="int8 runs an exported model"):
        load_detector(calibrated_checkpoint, precision="int8")
    with pytest.raises(ValueError, match="--arch"):
        load_detector(exported, architecture="resnet50")


def test_bad_export_folders_are_refused(exported, tmp_path, calibrated_checkpoint):
    with pytest.raises(ExportError, match="no such export folder"):
        read_export(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not an export folder"):
        read_export(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    record = json.loads((broken / "export.json").read_text())
    (broken / "export.json").write_text(json.dumps({**record, "models": {"tflite": {}}}))
    with pytest.raises(ExportError, match="'models' malformed"):
        read_export(broken)
    (broken / "export.json").write_text(json.dumps(record))
    (broken / "model.onnx").write_bytes(b"not the exported model")
    with pytest.raises(ExportError, match="not the file this export wrote"):
        load_exported(broken, backend="onnxruntime")
    (broken / "model.onnx").unlink()
    with pytest.raises(ExportError, match="model.onnx is missing"):
        load_exported(broken, backend="onnxruntime")
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, seeded_model("resnet18nodown", seed=1), dtype=None)
    with pytest.raises(ExportError, match="holds an export of other weights"):
        export_model(other, broken)
    with pytest.raises(ValueError, match="needs calibration images"):
        ExportOptions(int8=True)
    with pytest.raises(ValueError, match="format must be"):
        ExportOptions(formats=("tflite",))
    with pytest.raises(ValueError, match="--int8-only needs --int8"):
        ExportOptions(int8_only=True)


@needs_openvino
def test_missing_openvino_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'detector\[openvino\]'"):
        load_exported(exported, backend="openvino")


def test_cli_export_and_its_errors(calibrated_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-export"
    result = runner.invoke(main, ["export", "--format", "onnx", str(calibrated_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnx fp32" in result.output and (out / "model.onnx").is_file()
    result = runner.invoke(main, ["export", "--format", "onnx", "--int8", str(calibrated_checkpoint), "-o", str(out)])
    assert result.exit_code != 0 and "needs calibration images" in result.output
    result = runner.invoke(main, ["export", "--format", "tflite", str(calibrated_checkpoint), "-o", str(out)])
    assert result.exit_code != 0 and "tflite" in result.output
    images = tmp_path / "one.png"
    Image.fromarray(noise_image(64, 64)).save(images)
    for args, message in (
        (["--weights", str(tmp_path / "nowhere")], "weights not found"),
        (["--weights", str(calibrated_checkpoint), "--precision", "int8"], "int8 runs an exported model"),
        (["--weights", str(calibrated_checkpoint), "--backend", "openvino"], "detector export --format openvino"),
        (["--weights", str(out), "--precision", "int8"], "holds no onnx int8 model"),
        (["--weights", str(tmp_path)], "not an export folder"),
    ):
        result = runner.invoke(main, ["scan", str(images), *args, "-o", str(tmp_path / "r.csv"), "--workers", "0"])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


SHIPPED_INT8 = BUNDLED.with_suffix(".export")


def test_shipped_int8_model_is_of_the_bundled_weights():
    """The int8 model beside the default ResNet-50 quantizes exactly those weights, calibrated on real photos."""
    export = read_export(SHIPPED_INT8)
    assert export.metadata["source"]["sha256"] == file_sha256(BUNDLED)
    assert export.available() == [("openvino", "int8")]  # the fp32 models are the checkpoint itself
    calibration = export.metadata["models"]["openvino"]["int8"]["quantization"]["calibration"]
    assert calibration["patches"] == 300 and calibration["patch_size"] == 256 and calibration["unreadable"] == 0
    assert [f.name for f in export.model_files("openvino", "int8")] == ["model.int8.xml", "model.int8.bin"]


@pytest.mark.slow
@needs_openvino
def test_shipped_int8_keeps_the_ranking_on_the_fixture(fixture_dir):
    """The bound under which precision auto runs the shipped int8 model: Spearman >= 0.995 against the
    fp32 logits and AUC within 0.005 of fp32 on the labelled fixture (4 patches of 64 px per image)."""
    from scipy.stats import spearmanr

    from detector.images import decode_image
    from detector.metrics import auc as roc_auc

    manifest = pd.read_csv(fixture_dir / "manifest.csv")
    images = [decode_image(fixture_dir / p).pixels for p in manifest["path"]]
    settings = PatchSettings(patch_size=64, num_patches=4)
    fp32 = np.array([Detector.from_checkpoint(BUNDLED, device="cpu", precision="fp32").score_pixels(px, settings)[0]
                     for px in images])
    int8_detector = load_exported(SHIPPED_INT8, precision="int8")
    int8 = np.array([int8_detector.score_pixels(px, settings)[0] for px in images])
    labels = manifest["label"].to_numpy()
    rho = spearmanr(fp32, int8).statistic
    print(f"[shipped int8] spearman {rho:.4f}, AUC fp32 {roc_auc(labels, fp32):.4f} int8 {roc_auc(labels, int8):.4f}")
    assert rho >= 0.995
    assert abs(roc_auc(labels, int8) - roc_auc(labels, fp32)) <= 0.005


@needs_openvino
def test_precision_auto_runs_the_shipped_int8_where_the_cpu_has_int8_dot(monkeypatch, tmp_path, calibrated_checkpoint):
    import detector.hub as inference

    monkeypatch.setattr(inference, "cpu_has_int8_dot", lambda: True)
    det = load_detector(BUNDLED, device="cpu")
    assert (det.runtime.backend, det.precision) == ("openvino", "int8")
    assert det.info.source_sha256 == file_sha256(BUNDLED)
    # what the user asks for is kept
    assert load_detector(BUNDLED, device="cpu", precision="bf16").runtime.backend == "torch"
    assert load_detector(BUNDLED, device="cpu", backend="torch").runtime.backend == "torch"
    # an export of other weights beside a checkpoint is not used
    other = tmp_path / "other.safetensors"
    shutil.copy(calibrated_checkpoint, other)
    shutil.copytree(SHIPPED_INT8, tmp_path / "other.export")
    assert load_detector(other, device="cpu").runtime.backend == "torch"
    monkeypatch.setenv("DETECTOR_INT8", "0")
    assert load_detector(BUNDLED, device="cpu").runtime.backend == "torch"
    monkeypatch.delenv("DETECTOR_INT8")
    monkeypatch.setattr(inference, "cpu_has_int8_dot", lambda: False)
    assert load_detector(BUNDLED, device="cpu").runtime.backend == "torch"


@needs_openvino
def test_scan_defaults_with_int8_keep_logit_maps_and_heatmaps(monkeypatch, tmp_path):
    import detector.hub as inference

    monkeypatch.setattr(inference, "cpu_has_int8_dot", lambda: True)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise_image(96, 80, seed=3)).save(folder / "a.png")
    out, heat = tmp_path / "out.csv", tmp_path / "heat"
    result = CliRunner().invoke(main, ["scan", str(folder), "--weights", str(BUNDLED), "-o", str(out), "-q",
                                       "--patch-size", "64", "--heatmaps", str(heat), "--workers", "0"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert (record["detector"]["backend"], record["detector"]["precision"]) == ("openvino", "int8")
    assert len(list(heat.glob("*.png"))) == 1
    assert np.isfinite(pd.read_csv(out)["logit"]).all()
