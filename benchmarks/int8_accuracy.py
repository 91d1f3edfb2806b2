"""How far the int8 model that ships beside the default weights is from fp32, on labelled images.

The bound under which ``--precision auto`` runs it (issue #12): Spearman >= 0.995 between int8 and
fp32 image logits, and AUC within 0.005 of fp32's. tests/test_export.py checks it on the shared
fixture (64 px patches); this checks it on more and larger images: the validation split (81
images of 19 sources, never the sealed test split), one centre patch of 256 px per image.

    .venv/bin/python benchmarks/int8_accuracy.py [--data data/splits/val.csv] [--patches 1]

Results: benchmarks/results/int8_accuracy.json. Skips with a message when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WEIGHTS = ROOT / "weights" / "resnet50nodown_dev.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "splits" / "val.csv"))
    ap.add_argument("--patches", type=int, default=1, help="Patches of 256 px per image (scan's grid).")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "int8_accuracy.json"))
    args = ap.parse_args()

    import numpy as np
    from scipy.stats import spearmanr

    from detector.datasets import read_labelled
    from detector.export import load_exported
    from detector.images import ImageError, decode_image
    from detector.inference import Detector
    from detector.metrics import auc
    from detector.patches import PatchSettings

    try:
        table = read_labelled(args.data)
    except (OSError, ValueError) as err:
        print(f"skipped: {args.data} cannot be read ({err})")
        return
    settings = PatchSettings(patch_size=256, num_patches=args.patches)
    detectors = {"fp32": Detector.from_checkpoint(WEIGHTS, device="cpu", precision="fp32"),
                 "int8": load_exported(WEIGHTS.with_suffix(".export"), precision="int8")}
    logits: dict[str, list[float]] = {name: [] for name in detectors}
    labels, seconds = [], {name: 0.0 for name in detectors}
    for path, label in zip(table["path"], table["label"]):
        try:
            pixels = decode_image(path).pixels
        except ImageError as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
            continue
        labels.append(int(label))
        for name, det in detectors.items():
            t0 = time.perf_counter()
            logits[name].append(det.score_pixels(pixels, settings)[0])
            seconds[name] += time.perf_counter() - t0
    y = np.array(labels)
    fp32, int8 = np.array(logits["fp32"]), np.array(logits["int8"])
    result = {"data": str(args.data), "images": len(y), "real": int((y == 0).sum()), "generated": int((y == 1).sum()),
              "patches_per_image": args.patches, "spearman": float(spearmanr(fp32, int8).statistic),
              "auc_fp32": auc(y, fp32), "auc_int8": auc(y, int8), "max_abs_logit_diff": float(np.abs(fp32 - int8).max()),
              "seconds": seconds, "int8_model": detectors["int8"].info.path}
    result["auc_delta"] = result["auc_int8"] - result["auc_fp32"]
    result["within_bounds"] = result["spearman"] >= 0.995 and abs(result["auc_delta"]) <= 0.005
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"int8 vs fp32 on {result['images']} images ({result['real']} real, {result['generated']} generated) of "
          f"{args.data}, {args.patches} patch(es) of 256 px: Spearman {result['spearman']:.4f}, AUC fp32 "
          f"{result['auc_fp32']:.4f} int8 {result['auc_int8']:.4f} (delta {result['auc_delta']:+.4f}), max |logit "
          f"diff| {result['max_abs_logit_diff']:.3f}; within the bounds (0.995, 0.005): {result['within_bounds']}")


if __name__ == "__main__":
    main()
