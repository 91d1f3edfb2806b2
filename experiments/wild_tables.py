"""Markdown tables of a `detector evaluate --wild` run on the sealed test split (#18 item 5).

Reads ``robustness.csv`` (condition x group x model x metric) of the evaluation folder and prints:
the overall figures per condition (ROC AUC with its interval, recall at 1% and 5% FPR, the default
label's FPR and recall, counts, and for a model with a minimum size the images it called too small), then per real source (AUC and the label's FPR per condition) and per
generator (AUC and the label's recall per condition), each with its number of images, and the label's
FPR and recall per band of the files' short sides (the bands of the probe's size offsets, from
``run.json`` and the per-image ``robustness/*_scores.csv``), and the label's FPR and recall with 95%
intervals that resample whole sources and families::

    .venv/bin/python experiments/wild_tables.py runs/wild_test [--model clip_probe_vitb16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector.evaluation.report import condition_file  # noqa: E402
from detector.evaluation.groups import label_intervals as evaluation_label_intervals  # noqa: E402
from detector.metrics import auc, label_calls  # noqa: E402
from wild_probe import family  # noqa: E402

NAMES = {"none": "as stored", "center:256+jpeg:90": "crop 256 + JPEG 90", "resize:0.5": "50% downscale",
         "jpeg:75": "JPEG 75", "screenshot:1080": "PNG screenshot (1080p)"}


def load(folder: Path, model: str | None) -> tuple[pd.DataFrame, str]:
    df = pd.read_csv(folder / "robustness.csv")
    models = [m for m in df["model"].unique() if m != "fused"]
    chosen = model or models[0]
    if chosen not in set(df["model"]):
        raise SystemExit(f"no model {chosen!r} in {folder} (have {sorted(df['model'].unique())})")
    return df[df["model"] == chosen], chosen


def value(df: pd.DataFrame, condition: str, group: str, metric: str) -> float:
    hit = df[(df.condition == condition) & (df.group == group) & (df.metric == metric)]["value"]
    return float(hit.iloc[0]) if len(hit) else float("nan")


def overall(df: pd.DataFrame, conditions: list[str]) -> str:
    # a model with a minimum size: how many images of each class got no verdict ("too small")
    small = df["metric"].eq("n_too_small_real").any()
    lines = ["| condition | reals | generated | AUC [95% CI] | recall at 1% FPR | recall at 5% FPR | label FPR | label recall |"
             + (" too small (reals / generated) |" if small else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if small else "")]
    for c in conditions:
        v = lambda m: value(df, c, "all", m)  # noqa: E731
        lines.append(f"| {NAMES.get(c, c)} | {v('n_real'):.0f} | {v('n_fake'):.0f} | {v('auc'):.3f} "
                     f"[{v('auc_low'):.3f}, {v('auc_high'):.3f}] | {v('pd@0.01far'):.3f} | {v('pd@0.05far'):.3f} "
                     f"| {1 - v('acc_real'):.3f} | {v('acc_fake'):.3f} |"
                     + (f" {v('n_too_small_real'):.0f} / {v('n_too_small_fake'):.0f} |" if small else ""))
    return "\n".join(lines)


def per_group(df: pd.DataFrame, conditions: list[str], prefix: str, rate: str, count: str) -> str:
    groups = sorted({g for g in df["group"] if (g.startswith("real:") if prefix == "real" else
                                                 not g.startswith("real:") and g not in ("all", "average"))})
    head = "| " + ("real source" if prefix == "real" else "generator") + " | n | " + \
        " | ".join(f"{NAMES.get(c, c)}: AUC / {rate}" for c in conditions) + " |"
    lines = [head, "|---|---|" + "---|" * len(conditions)]
    for g in groups:
        n = value(df, conditions[0], g, count)
        cells = []
        for c in conditions:
            a = value(df, c, g, "auc")
            r = value(df, c, g, "acc_real" if prefix == "real" else "acc_fake")
            r = 1 - r if prefix == "real" else r
            cells.append(f"{a:.3f} / {r:.3f}")
        lines.append(f"| {g.removeprefix('real:')} | {n:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst_source_auc(df: pd.DataFrame, conditions: list[str], min_n: int = 5) -> str:
    out = []
    for c in conditions:
        rows = df[(df.condition == c) & df.group.str.startswith("real:") & (df.metric == "auc")]
        ns = df[(df.condition == c) & df.group.str.startswith("real:") & (df.metric == "n_real")].set_index("group")["value"]
        rows = rows[[ns.get(g, 0) >= min_n for g in rows.group]]
        if rows.empty:
            continue
        worst = rows.loc[rows["value"].idxmin()]
        out.append(f"{NAMES.get(c, c)}: {worst['value']:.3f} ({worst['group'].removeprefix('real:')}, "
                   f"{ns[worst['group']]:.0f} photos)")
    return "Worst real source (>= 5 photos) per condition: " + ("; ".join(out) or "none that large") + "."


def verdicts(folder: Path, model: str, conditions: list[str]) -> tuple[dict, dict[str, pd.DataFrame]] | None:
    """The model's entry of ``run.json`` and, per condition, its per-image scores with ``flagged``: the
    default label called the image generated (an image left without a verdict by the model's minimum
    size, as the condition left it, is not). None when the run stored no threshold for the model."""
    run = json.loads((folder / "run.json").read_text())
    info = next((m for m in run["models"] if m.get("name") == model), None)
    if info is None or "threshold" not in info:
        return None
    tables = {}
    for c in conditions:
        t = pd.read_csv(folder / "robustness" / f"{condition_file(c)}_scores.csv")
        judged = t["short_side"].to_numpy() >= info.get("min_side", 0) if "short_side" in t else None
        tables[c] = t.assign(flagged=label_calls(t[f"logit_{model}"].to_numpy(), info["threshold"], judged))
    return info, tables


def label_intervals(folder: Path, model: str, conditions: list[str]) -> str:
    """The default label's FPR and recall per condition with 95% intervals that resample whole photo
    sources and generator families (``detector.evaluation.groups.label_intervals``): images of one
    collection are not independent draws, so these are wider than intervals over images."""
    found = verdicts(folder, model, conditions)
    if found is None:
        return f"(no threshold for {model} in run.json: no label intervals)"
    lines = ["| condition | label FPR [95% CI over sources] | photos (sources) | label recall [95% CI over families] "
             "| generated (families) |", "|---|---|---|---|---|"]
    for c, t in found[1].items():
        # groups as the campaign's split makes them: a photo's source, a generator's family (wild_probe.family)
        t = t.assign(family=t["generator"].astype(str).map(family))
        labels, called = t["label"].to_numpy(dtype=int), t["flagged"].to_numpy()
        ci = evaluation_label_intervals(t, labels, called, np.ones(len(t), dtype=bool), n_boot=2000)
        cells = []
        for label, name, column in ((0, "label_fpr", "source"), (1, "label_recall", "family")):
            part = t[labels == label]
            cells += [f"{part['flagged'].mean():.3f} [{ci[name + '_low']:.3f}, {ci[name + '_high']:.3f}]",
                      f"{len(part)} ({part[column].nunique()})"]
        lines.append(f"| {NAMES.get(c, c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_size(folder: Path, model: str, conditions: list[str], edges: list[int] | None = None) -> str:
    """Per band of the short side of the file as stored, per condition: the ROC AUC inside the band and
    the default label's false positives and catches with the counts behind them (an image left without a
    verdict by the model's minimum size is neither). Bands: ``edges``, else those of the model's size
    offsets, else < 320 / >= 320 px."""
    found = verdicts(folder, model, conditions)
    if found is None:
        return f"(no threshold for {model} in run.json: no table by size)"
    info, tables = found
    edges = edges or [int(e) for e in (info.get("size_offsets") or {}).get("edges", [320])]
    bounds = [0, *edges, None]
    names = [f"< {hi}" if lo == 0 else (f">= {lo}" if hi is None else f"{lo}-{hi - 1}")
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    head = "| short side of the file (px) | " + " | ".join(
        f"{NAMES.get(c, c)}: AUC; reals / fakes called generated" for c in conditions) + " |"
    lines = [head, "|---|" + "---|" * len(conditions)]
    for k, name in enumerate(names):
        cells = []
        for c in conditions:
            t = tables[c]
            side = t[["width", "height"]].min(axis=1)
            t = t[(side >= bounds[k]) & ((side < bounds[k + 1]) if bounds[k + 1] else True)]
            label, flagged = t["label"], t["flagged"]
            a = f"{auc(label.to_numpy(), t[f'logit_{model}'].to_numpy()):.3f}" if label.nunique() == 2 else "-"
            cells.append(f"{a}; {int((flagged & (label == 0)).sum())}/{int((label == 0).sum())} / "
                         f"{int((flagged & (label == 1)).sum())}/{int((label == 1).sum())}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--edges", nargs="+", type=int, default=None,
                        help="short sides (px) bounding the size bands (default: the model's size offsets)")
    args = parser.parse_args(argv)
    df, model = load(args.folder, args.model)
    conditions = [c for c in NAMES if c in set(df["condition"])]
    print(f"model: {model}\n\n{overall(df, conditions)}\n\n{worst_source_auc(df, conditions)}\n")
    print(per_group(df, conditions, "real", "FPR", "n_real") + "\n")
    print(per_group(df, conditions, "fake", "recall", "n_fake") + "\n")
    print(by_size(args.folder, model, conditions, args.edges) + "\n")
    print(label_intervals(args.folder, model, conditions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
