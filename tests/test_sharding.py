"""A scan sharded over 2 torchrun processes (gloo, CPU) merges to the single-process result."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from detector.inference import Detector
from detector.patches import PatchSettings
from detector.scanning import ScanOptions, scan
from tests.conftest import noise_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_two_rank_scan_equals_single_process(tmp_path, checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        Image.fromarray(noise_image(64, 64 + 8 * i, i)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    single = tmp_path / "single.csv"
    det = Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    scan([folder], det, single, ScanOptions(patches=PatchSettings(patch_size=64, num_patches=2), workers=0,
                                            progress=False))
    merged = tmp_path / "merged.csv"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "detector.cli", "scan", str(folder), "--weights", str(checkpoint), "-o", str(merged),
           "--patch-size", "64", "--num-patches", "2", "--workers", "0", "--precision", "fp32", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=580,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = pd.read_csv(single).drop(columns="seconds").sort_values("path").reset_index(drop=True)
    b = pd.read_csv(merged).drop(columns="seconds").sort_values("path").reset_index(drop=True)
    assert len(b) == 8
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-4)
    parts = sorted(p.name for p in tmp_path.glob("merged.csv.rank*"))
    assert parts == ["merged.csv.rank0of2", "merged.csv.rank0of2.json", "merged.csv.rank1of2", "merged.csv.rank1of2.json"]
