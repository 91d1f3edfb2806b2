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
    assert "1 error in" in result.output
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


@pytest.mark.parametrize("command", ["scan", "evaluate"])
@pytest.mark.parametrize("mode, options, named", [
    ("full", ["--fusion", "max"], "--fusion applies to --mode patches only"),
    ("full", ["--num-patches", "4", "--patch-size", "64"], "--patch-size, --num-patches apply to --mode patches only"),
    ("full", ["--layout", "random"], "--layout applies to --mode patches only"),
    ("patches", ["--tile-size", "256"], "--tile-size applies to --mode full only"),
    ("patches", ["--tile-margin", "32"], "--tile-margin applies to --mode full only"),
])
def test_options_of_the_other_mode_are_refused(tmp_path, checkpoint, command, mode, options, named):
    out = ["-o", str(tmp_path / ("out.csv" if command == "scan" else "out"))]
    result = CliRunner().invoke(main, [command, str(tmp_path), "--weights", str(checkpoint), "--mode", mode, *options, *out])
    assert result.exit_code == 1 and named in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out").exists()


def test_options_without_effect_do_not_enter_resume_or_cache_keys(tmp_path, checkpoint):
    from detector.evaluation import EvalOptions, settings_key
    from detector.inference import Detector
    from detector.patches import PatchSettings
    from detector.scanning import ScanOptions, scan

    model = {"weights_sha256": "ab" * 32, "architecture": "a", "device": "cpu", "precision": "fp32", "torch": "2"}
    full, other_full = PatchSettings(mode="full"), PatchSettings(mode="full", patch_size=64, num_patches=2, layout="random")
    key = settings_key(model, EvalOptions(patches=full), "none")
    assert settings_key(model, EvalOptions(patches=other_full, fusion="max"), "none") == key
    assert settings_key(model, EvalOptions(patches=PatchSettings(mode="full", tile_size=256)), "none") != key
    patches = settings_key(model, EvalOptions(patches=PatchSettings()), "none")
    assert settings_key(model, EvalOptions(patches=PatchSettings(tile_size=96, margin=8)), "none") == patches
    assert settings_key(model, EvalOptions(patches=PatchSettings(), fusion="max"), "none") != patches

    from PIL import Image

    from tests.conftest import noise_image

    (tmp_path / "in").mkdir()
    Image.fromarray(noise_image(40, 48)).save(tmp_path / "in" / "a.png")
    Image.fromarray(noise_image(40, 48, 1)).save(tmp_path / "in" / "b.png")
    det = Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    out = tmp_path / "s.csv"
    scan([tmp_path / "in" / "a.png"], det, out, ScanOptions(patches=full, workers=0, progress=False))
    # a resume whose patch options and fusion differ, in full mode where they mean nothing, goes on
    resumed = scan([tmp_path / "in"], det, out, ScanOptions(patches=other_full, fusion="max", workers=0, progress=False,
                                                            resume=True))
    assert resumed.n_skipped == 1 and resumed.n_real + resumed.n_fake == 1
    with pytest.raises(ValueError, match="other weights, model set or settings"):
        scan([tmp_path / "in"], det, out, ScanOptions(patches=PatchSettings(mode="full", tile_size=16), workers=0,
                                                      progress=False, resume=True))


def test_the_command_exits_quickly_with_click_exit_codes_and_its_output_flushed(tmp_path, checkpoint):
    """`detector` (detector.cli.run) ends with os._exit once done: codes and output must survive that."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import noise_image

    def command(*args):
        return subprocess.run([sys.executable, "-c", "from detector.cli import run; run()", *args],
                              capture_output=True, text=True, timeout=300)

    done = command("--version")
    assert done.returncode == 0 and "version" in done.stdout
    done = command("scan", str(tmp_path / "nope"), "-o", str(tmp_path / "x.csv"))
    assert done.returncode == 1 and "no such file or folder" in done.stderr
    assert command("scan", "--no-such-option").returncode == 2
    Image.fromarray(noise_image(64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "one.csv"
    done = command("scan", str(tmp_path / "a.png"), "--weights", str(checkpoint), "-o", str(out),
                   "--patch-size", "64", "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert "probability" in done.stdout  # the verdict printed for one image reached the pipe
    assert len(out.read_text().splitlines()) == 2  # header and the row, written and closed
