"""Seconds per image against batch size, on the CPU, at 256 px, with and without kept memory.

    .venv/bin/python benchmarks/batch_size.py [--precision bf16]

Why `Detector` caps CPU batches at 256 Kpixels: larger batches overflow the heap that glibc keeps
and page-fault again. Each row: seconds per image (network only, no decoding), minor page faults
and system time for 16 images.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    import numpy as np
    import torch

    from detector.hardware import tune_process
    from detector.inference import Detector

    det = Detector.from_checkpoint(ROOT / "weights" / "resnet50nodown_dev.safetensors", device="cpu",
                                   precision=args.precision)
    tune_process(det.device)  # the kept heap of `detector scan`
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 3, args.size, args.size), dtype=np.uint8))
    print(f"{'batch':>5} {'s/image':>8} {'faults':>8} {'sys s':>6}  ({det.precision}, {args.size} px)")
    for bs in (1, 2, 4, 8, 16):
        det.crop_maps(x[:bs])  # warm-up at this shape
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(0, 16, bs):
            det.crop_maps(x[i : i + bs])
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"{bs:>5} {dt / 16:>8.3f} {r1.ru_minflt - r0.ru_minflt:>8} {r1.ru_stime - r0.ru_stime:>6.2f}")


if __name__ == "__main__":
    main()
