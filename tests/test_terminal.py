"""What a scan prints: no Python warnings, and rows (hence the progress bar) that advance as images finish."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

from PIL import Image

from detector import scanning
from detector.inference import Detector
from detector.patches import PatchSettings
from detector.scanning import ScanOptions, scan
from tests.conftest import noise_image

ROOT = Path(__file__).resolve().parent.parent


def test_rows_are_written_as_images_finish(tmp_path, checkpoint, monkeypatch):
    """A lone small image is scored once the next image has other crop shapes, not at the end of the scan."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k, size in enumerate([40, 96, 40, 96]):  # sorted by name: small, large, small, large
        Image.fromarray(noise_image(size, size, k)).save(folder / f"{k}.png")
    out = tmp_path / "o.csv"
    rows_at_decode = []

    def counting(decode):
        def counted(*args, **kwargs):
            rows_at_decode.append(out.read_text().count("\n") - 1 if out.exists() else 0)
            return decode(*args, **kwargs)
        return counted

    # a scan decodes a file from its bytes (read once, for provenance too) or, without them, from disk
    monkeypatch.setattr(scanning, "decode_image", counting(scanning.decode_image))
    monkeypatch.setattr(scanning, "decode_bytes", counting(scanning.decode_bytes))
    detector = Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    options = ScanOptions(patches=PatchSettings(patch_size=64, num_patches=2), batch_size=8, workers=0, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = scan([folder], detector, out, options)
    assert summary.n_real + summary.n_fake == 4
    assert rows_at_decode == [0, 0, 1, 2]  # before image k is decoded, the rows of images 0..k-2 are out
    assert [str(w.message) for w in caught] == []


def test_scan_in_a_subprocess_prints_no_warning(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):  # smaller than a patch: scored whole, the crop is the decoded (read-only) array itself
        Image.fromarray(noise_image(40, 40 + 8 * k, k)).save(folder / f"{k}.jpg")
    result = subprocess.run([sys.executable, "-m", "detector.cli", "scan", str(folder), "--weights", str(checkpoint),
                             "-o", str(tmp_path / "o.csv"), "--workers", "1", "--patch-size", "64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr + result.stdout, result.stderr
    assert "3 scanned" in result.stderr
