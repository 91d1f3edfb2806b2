import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from detector.images import decode_image
from detector.inference import Detector
from detector.patches import PatchSettings
from detector.results import RESULT_COLUMNS, repair_and_read
from detector.scanning import ScanOptions, scan
from tests.conftest import noise_image

FAST = ScanOptions(patches=PatchSettings(mode="patches", patch_size=64, num_patches=2), batch_size=8, workers=0,
                   progress=False)


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")


def _mixed_folder(root: Path) -> list[str]:
    """Good images beside bad ones; returns the names."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise_image(80, 96, 1)).save(root / "good.png")
    Image.fromarray(noise_image(72, 64, 2)).save(root / "good, with comma.jpg", quality=90)
    Image.fromarray(noise_image(64, 64, 3)).save(root / 'quote " and space.png')
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "good, with comma.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.jpg").write_text("not an image at all")
    return sorted(p.name for p in root.iterdir())


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_mixed_folder_one_row_per_file(tmp_path, detector):
    names = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out.csv"
    summary = scan([tmp_path / "in"], detector, out, FAST)
    df = _read(out)
    assert list(df.columns) == RESULT_COLUMNS
    assert sorted(Path(p).name for p in df["path"]) == names
    bad = df[df["error"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["empty.jpg", "text.jpg", "truncated.jpg"]
    good = df[df["error"] == ""]
    assert good["logit"].astype(float).notna().all() and set(good["label"]) <= {"fake", "real"}
    assert summary.n_errors == 3 and summary.n_fake + summary.n_real == 3
    with open(out, newline="", encoding="utf-8") as fh:
        assert sum(1 for _ in csv.reader(fh)) == len(names) + 1


def test_scan_fp32_equals_batch1_reference(tmp_path, detector, model):
    """Batched, channels-last, worker-decoded scan == one image at a time, fp32, NCHW."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (80, 72), (64, 96), (96, 64)]):
        Image.fromarray(noise_image(h, w, 10 + i)).save(folder / f"{i}.png")
    out = tmp_path / "o.csv"
    opts = ScanOptions(patches=PatchSettings(mode="full"), batch_size=4, workers=2, progress=False)
    scan([folder], detector, out, opts)
    df = _read(out)
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    for row in df.itertuples():
        px = decode_image(row.path).pixels
        x = (torch.from_numpy(px.copy()).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
        with torch.no_grad():
            ref = float(model.eval()(x))
        assert abs(float(row.logit) - ref) <= 1e-3


def test_bf16_is_close_to_fp32(tmp_path, checkpoint):
    img = noise_image(64, 64, 5)
    a = Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32").predict(img).logit
    b = Detector.from_checkpoint(checkpoint, device="cpu", precision="bf16").predict(img).logit
    assert abs(a - b) < 0.05 * max(1.0, abs(a))


def test_resume_skips_done_and_repairs_torn_row(tmp_path, detector):
    _mixed_folder(tmp_path / "in")
    out = tmp_path / "out.csv"
    scan([tmp_path / "in"], detector, out, FAST)
    full = _read(out)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # keep header + 2 rows, then half of the third row (a kill mid-write)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")
    with pytest.raises(FileExistsError):
        scan([tmp_path / "in"], detector, out, FAST)
    opts = ScanOptions(**{**FAST.__dict__, "resume": True})
    summary = scan([tmp_path / "in"], detector, out, opts)
    assert summary.n_skipped == 2
    again = _read(out)
    assert len(again) == len(full)
    pd.testing.assert_frame_equal(
        again.drop(columns="seconds").sort_values("path").reset_index(drop=True),
        full.drop(columns="seconds").sort_values("path").reset_index(drop=True),
    )


def test_repair_refuses_foreign_csv(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a detector results file"):
        repair_and_read(other)


def test_lock_refuses_second_writer(tmp_path, detector):
    from filelock import FileLock

    _mixed_folder(tmp_path / "in")
    out = tmp_path / "out.csv"
    with FileLock(f"{out}.lock"):
        with pytest.raises(RuntimeError, match="another scan is writing"):
            scan([tmp_path / "in"], detector, out, FAST)


def test_scan_fixture_no_errors(tmp_path, detector, fixture_dir):
    out = tmp_path / "fixture.csv"
    scan([fixture_dir], detector, out, FAST)
    df = _read(out)
    files = [p for p in fixture_dir.rglob("*.png")]
    assert len(df) == len(files) == 24
    assert (df["error"] == "").all()


def test_predict_api(detector):
    pred = detector.predict(noise_image(96, 80, 7), PatchSettings(mode="full"))
    assert pred.logit_map.shape == (12, 10)
    assert pred.logit == pytest.approx(float(np.nanmean(pred.logit_map)), abs=1e-5)
    assert 0.0 <= pred.probability <= 1.0 and pred.label in ("fake", "real")


def test_heatmaps_stay_inside_folder(tmp_path, detector):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise_image(64, 64, 1)).save(folder / "..evil name.png")
    heat = tmp_path / "heat"
    opts = ScanOptions(**{**FAST.__dict__, "heatmaps": str(heat)})
    scan([folder], detector, tmp_path / "o.csv", opts)
    written = list(heat.iterdir())
    assert len(written) == 1 and written[0].parent == heat
    assert Image.open(written[0]).size == (64, 64)


def test_full_mode_scan_tiled_equals_untiled(tmp_path, tiny_checkpoint):
    """`scan --mode full --precision fp32` of 389x301 px images: --tile-size 96 (several tiles) gives the
    logits of --tile-size 4096 (one crop)."""
    from click.testing import CliRunner

    from detector.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(noise_image(301, 389, 5)).save(folder / "a.png")
    smooth = np.linspace(0, 255, 389)[None, :, None] * np.ones((301, 1, 3))
    Image.fromarray(smooth.astype(np.uint8)).save(folder / "b.jpg", quality=85)
    rows = {}
    for tile in (96, 4096):
        out = tmp_path / f"tile{tile}.csv"
        result = CliRunner().invoke(main, ["scan", str(folder), "-o", str(out), "--weights", str(tiny_checkpoint),
                                           "--mode", "full", "--precision", "fp32", "--device", "cpu",
                                           "--tile-size", str(tile), "--workers", "0", "-q"])
        assert result.exit_code == 0, result.output
        rows[tile] = pd.read_csv(out).set_index("path")
    tiled, whole = rows[96], rows[4096]
    assert len(tiled) == 2 and (tiled["width"] == 389).all() and (tiled["height"] == 301).all()
    assert (tiled["n_patches"] > 1).all() and (whole["n_patches"] == 1).all()
    np.testing.assert_allclose(tiled["logit"], whole.loc[tiled.index, "logit"], rtol=0, atol=1e-4)
    assert abs(tiled["logit"].iloc[0] - tiled["logit"].iloc[1]) > 1e-3  # different images, different logits
