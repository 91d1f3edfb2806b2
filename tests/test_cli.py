import pytest
from click.testing import CliRunner

from detector.cli import main


@pytest.mark.parametrize("command", [[], ["scan"], ["train"], ["models"], ["evaluate"], ["info"], ["simulate"]])
def test_help_is_complete(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_scan_help_documents_every_option():
    out = CliRunner().invoke(main, ["scan", "--help"]).output
    for opt in ("--weights", "--output", "--mode", "--patch-size", "--num-patches", "--fusion", "--tile-size",
                "--device", "--precision", "--batch-size", "--workers", "--resume", "--heatmaps", "--max-pixels"):
        assert opt in out, opt


def test_scan_with_unusable_weights_fails_clearly(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("garbage")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    result = CliRunner().invoke(main, ["scan", str(img_dir), "--weights", str(bad), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code != 0
    assert "not a PyTorch or safetensors checkpoint" in result.output
    assert "Traceback" not in result.output


def test_scan_missing_input_fails_clearly(tmp_path, checkpoint):
    result = CliRunner().invoke(main, ["scan", str(tmp_path / "nope"), "--weights", str(checkpoint)])
    assert result.exit_code != 0 and "no such file or folder" in result.output


def test_scan_cli_writes_csv(tmp_path, checkpoint):
    from PIL import Image

    from tests.conftest import noise_image

    (tmp_path / "in").mkdir()
    Image.fromarray(noise_image(64, 64)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.jpg").write_bytes(b"")
    out = tmp_path / "o.csv"
    result = CliRunner().invoke(main, ["scan", str(tmp_path / "in"), "--weights", str(checkpoint), "-o", str(out),
                                       "--patch-size", "64", "--workers", "0", "-q", "--table"])
    assert result.exit_code == 0, result.output
    assert "1 fake" in result.output or "1 real" in result.output
    assert "1 errors" in result.output
    import pandas as pd

    from detector.inference import Detector
    from detector.patches import PatchSettings

    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    good, bad = rows.loc[str(tmp_path / "in" / "a.png")], rows.loc[str(tmp_path / "in" / "b.jpg")]
    expected = Detector.from_checkpoint(checkpoint, device="cpu").predict(noise_image(64, 64), PatchSettings(patch_size=64))
    assert abs(float(good["logit"]) - expected.logit) < 0.05 and good["label"] == expected.label
    assert bad["logit"] == "" and bad["error"] != ""


def test_info_shows_calibration(checkpoint):
    result = CliRunner().invoke(main, ["info", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "resnet50nodown" in result.output and "sha256" in result.output and "temperature 1" in result.output
