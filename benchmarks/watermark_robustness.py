"""How far the Stable Diffusion watermarks can be trusted: false positives on real photos, and recall on
images watermarked here, as stored and after the re-encodings a shared image goes through.

The reader (detector.provenance) reports a watermark when the decoded DWT-DCT payload is within
WATERMARK_MAX_BIT_ERRORS of a pattern (SD v1's "StableDiffusionV1", 136 bits; SDXL's 48 bits, in either
channel order). This measures, with the reader's own decoding (``watermark_bit_errors``):

* false positives: every real photo (data/samples, and ../shared/data/{dev,extra} when present), its
  centre crop of at most ``--fp-crop`` px a side, searched for all three patterns as if stored losslessly
  (the reader skips JPEGs; this is the decoder's own rate);
* recall: each real photo at least ``--crop`` px a side, centre-cropped to ``--crop`` (an SD v1 output's
  size), watermarked with each pattern as the reference code embeds it, then decoded as stored (PNG),
  after JPEG at quality 95, 90 and 75, and after resizing to 50% (bicubic);
* the generated images of ../shared/data/dev whose generator is a Stable Diffusion (found as stored?).

    .venv/bin/python benchmarks/watermark_robustness.py [--limit N] [--crop 512] [--fp-crop 1024]

Prints the tables; writes benchmarks/results/watermark_robustness.json. The images are read where
they are, never copied into the repository.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detector.images import ImageError, decode_image  # noqa: E402
from detector.provenance import WATERMARK_MAX_BIT_ERRORS, watermark_bit_errors  # noqa: E402
from tests.artefacts import watermarked  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CONDITIONS = ("stored (PNG)", "JPEG q95", "JPEG q90", "JPEG q75", "resized 50%")
MARKS = {"sd-v1": 'Stable Diffusion v1 ("StableDiffusionV1")', "sdxl": "SDXL"}


def listed(folder: Path, label: str) -> list[Path]:
    """Files of ``folder``'s manifest.csv with that label."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="", encoding="utf-8") as fh:
        return [folder / row["path"] for row in csv.DictReader(fh) if row.get("label") == label]


def generated_sd(folder: Path) -> list[tuple[Path, str]]:
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="", encoding="utf-8") as fh:
        return [(folder / r["path"], r["generator"]) for r in csv.DictReader(fh)
                if r.get("label") == "1" and r.get("generator", "").startswith("sd-")]


def centre(pixels: np.ndarray, side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(pixels[top: top + side, left: left + side])


def condition(pixels: np.ndarray, name: str) -> np.ndarray:
    image = Image.fromarray(pixels)
    if name.startswith("JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(name.split("q")[1]))
        buffer.seek(0)
        image = Image.open(buffer)
    elif name.startswith("resized"):
        image = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffer.seek(0)
        image = Image.open(buffer)
    return np.asarray(image.convert("RGB"))


def errors_of(pixels: np.ndarray, mark: str) -> int:
    """The fewest bit errors of ``mark``'s pattern over the channel orders the reader tries."""
    return min(e for name, _, e, _ in watermark_bit_errors(pixels) if name == MARKS[mark])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="At most this many real photos.")
    parser.add_argument("--crop", type=int, default=512, help="Side of the watermarked crops.")
    parser.add_argument("--fp-crop", type=int, default=1024, help="Largest side searched for false positives.")
    args = parser.parse_args()

    reals = sorted((ROOT / "data" / "samples").glob("real_*"))
    for part in ("dev", "extra"):
        reals += listed(SHARED / part, "0")
    reals = reals[: args.limit] if args.limit else reals
    bound = {n: WATERMARK_MAX_BIT_ERRORS[n] for n in (136, 48)}
    print(f"detector.provenance bounds: at most {bound[136]} of 136 bits (SD v1), {bound[48]} of 48 (SDXL)")

    fp = {"photos": 0, "hits": 0, "closest": {}, "seconds": []}
    recall = {m: {c: [] for c in CONDITIONS} for m in MARKS}
    for path in reals:
        try:
            pixels = decode_image(path).pixels
        except ImageError:
            continue
        crop = centre(pixels, args.fp_crop)
        if min(crop.shape[:2]) < 256:
            continue
        t0 = time.perf_counter()
        found = watermark_bit_errors(crop)
        fp["seconds"].append((time.perf_counter() - t0) / crop[..., 0].size * 1e6)
        fp["photos"] += 1
        for name, order, errors, n in found:
            key = f"{name} {order}"
            fp["closest"][key] = min(fp["closest"].get(key, n), errors)
            fp["hits"] += errors <= bound[n]
        if min(pixels.shape[:2]) < args.crop:
            continue
        base = centre(pixels, args.crop)
        for mark in MARKS:
            marked = watermarked(base, mark)
            for name in CONDITIONS:
                recall[mark][name].append(errors_of(condition(marked, name), mark))

    sd = []
    for path, generator in generated_sd(SHARED / "dev"):
        try:
            pixels = decode_image(path).pixels
        except ImageError:
            continue
        if min(pixels.shape[:2]) >= 256:
            sd.append((generator, errors_of(pixels, "sd-v1"), errors_of(pixels, "sdxl")))

    print(f"\nFalse positives: {fp['hits']} hits over {fp['photos']} real photos x 3 patterns "
          f"(centre crops of at most {args.fp_crop} px); decoding {statistics.median(fp['seconds']):.3f} s per MP "
          f"for the three patterns (median)")
    for key, value in sorted(fp["closest"].items()):
        print(f"  closest real photo to {key}: {value} bit errors")
    print(f"\nRecall on {len(recall['sd-v1'][CONDITIONS[0]])} real photos cropped to {args.crop} px and "
          f"watermarked here (found = within the bound; median bit errors):")
    print(f"  {'condition':<14}" + "".join(f"{m:>24}" for m in MARKS))
    table = {}
    for name in CONDITIONS:
        cells = []
        for mark in MARKS:
            errors = recall[mark][name]
            n = 136 if mark == "sd-v1" else 48
            hits = sum(e <= bound[n] for e in errors)
            table.setdefault(name, {})[mark] = {"found": hits, "of": len(errors),
                                                "median_bit_errors": statistics.median(errors) if errors else None}
            cells.append(f"{hits}/{len(errors)} (median {statistics.median(errors) if errors else float('nan'):.0f}/{n})")
        print(f"  {name:<14}" + "".join(f"{c:>24}" for c in cells))
    print("\nBit errors of the marked photos as stored (quantiles 10/25/50/75/90%):")
    for mark in MARKS:
        errors = recall[mark][CONDITIONS[0]]
        if errors:
            quantiles = np.percentile(errors, [10, 25, 50, 75, 90])
            print(f"  {mark:<6} " + " / ".join(f"{q:.0f}" for q in quantiles) + f" of {136 if mark == 'sd-v1' else 48}")
            table[CONDITIONS[0]][mark]["quantiles_10_25_50_75_90"] = [float(q) for q in quantiles]
    if sd:
        found = [g for g, v1, xl in sd if v1 <= bound[136] or xl <= bound[48]]
        print(f"\nStable Diffusion images of ../shared/data/dev (cut from published grids, re-saved by others): "
              f"{len(found)} of {len(sd)} carry a watermark within the bound {sorted(set(found))}; fewest bit "
              f"errors {min(v1 for _, v1, _ in sd)}/136 (SD v1), {min(xl for _, _, xl in sd)}/48 (SDXL)")
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "bounds": bound, "false_positives": {k: v for k, v in fp.items() if k != "seconds"},
              "decode_seconds_per_mp_median": statistics.median(fp["seconds"]) if fp["seconds"] else None,
              "recall": table, "crop": args.crop, "fp_crop": args.fp_crop,
              "sd_dev_images": [{"generator": g, "sd_v1_bit_errors": v1, "sdxl_bit_errors": xl} for g, v1, xl in sd]}
    out = ROOT / "benchmarks" / "results" / "watermark_robustness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
