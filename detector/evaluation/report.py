"""The evaluation's output files: metric tables, scores, the JSON summary, plots and the run record."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..datasets import COLUMNS
from ..results import software_versions
from .bias import bias_warnings
from .conditions import CLEAN, EvalOptions
from .groups import METRIC_COLUMNS, MIN_GROUP, ModelSpec, breakdown_groups, group_metrics, metric_groups, with_fusion
from .plots import plot_roc, plot_scores

__all__ = ["OUTPUT_FILES", "EvalResult", "summary_table", "write_report"]

OUTPUT_FILES = ("scores.csv", "metrics.csv", "auc.csv", "acc.csv", "breakdown.csv", "metrics.json", "roc.png",
                "scores.png", "run.json")

def _wide(metrics: pd.DataFrame, metric: str, models: Sequence[ModelSpec]) -> pd.DataFrame:
    part = metrics[metrics["metric"] == metric]
    table = part.pivot(index="group", columns="model", values="value")
    order = list(dict.fromkeys(part["group"]))
    return table.reindex(index=order, columns=[m.name for m in models]).rename_axis(columns=None).reset_index()


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def _write_json(path: Path, value: object) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    text = json.dumps(clean(value), indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def _nested(metrics: pd.DataFrame) -> dict:
    out: dict = {}
    for row in metrics.itertuples(index=False):
        out.setdefault(row.group, {}).setdefault(row.model, {})[row.metric] = row.value
    return out


def condition_file(condition: str) -> str:
    """The file stem under ``robustness/`` of a perturbation condition (``center:256+jpeg:90`` ->
    ``center_256_jpeg_90``), for readers of an evaluation folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", condition)


@dataclass
class EvalResult:
    """What an evaluation produced (the files are in ``output_dir``)."""

    output_dir: str
    metrics: pd.DataFrame
    warnings: list[str]
    files: list[str]
    n_images: int = 0
    n_errors: int = 0
    n_scored: int = 0
    n_reused: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.n_images} images ({self.n_errors} unreadable), {self.n_scored} scores computed, "
                f"{self.n_reused} taken from the cache, in {self.seconds:.1f} s -> {self.output_dir}\n"
                f"report: {Path(self.output_dir) / 'report.html'} (open it in a browser)")


_SCORE_COLUMNS = [*COLUMNS, "format", "width", "height", "short_side", "jpeg_quality", "bytes", "sha256", "error",
                  "provenance"]


def write_report(
    frames: dict[str, pd.DataFrame], models: Sequence[ModelSpec], output_dir: Path, options: EvalOptions, record: dict,
) -> EvalResult:
    """Metrics, tables, plots and the run record from per-condition score tables."""
    reported = with_fusion(frames, models, options.model_fusion, options.model_weights)
    clean = frames[CLEAN]
    groups = metric_groups(clean)
    kwargs = {"n_boot": options.n_boot, "seed": options.seed}
    metrics = group_metrics(clean, reported, groups, **kwargs)
    breakdown = group_metrics(clean, reported, breakdown_groups(clean), average=False, **kwargs)
    notes = bias_warnings(clean, align_jpeg=options.align_jpeg, center_crop=options.center_crop)
    n_errors = int((clean["error"].fillna("") != "").sum())
    if n_errors:
        notes.append(f"{n_errors} file(s) could not be scored and are left out of the metrics (see scores.csv)")
    columns = [c for c in _SCORE_COLUMNS if c in clean] + [m.column for m in reported]
    files = {"scores.csv": clean[columns], "metrics.csv": metrics, "auc.csv": _wide(metrics, "auc", reported),
             "acc.csv": _wide(metrics, "balanced_acc", reported), "breakdown.csv": breakdown}
    summary = {"metrics": _nested(metrics), "breakdown": _nested(breakdown), "warnings": notes,
               "models": {m.name: {"threshold": m.threshold, "temperature": m.temperature, "min_side": m.min_side}
                          for m in reported}}
    if len(frames) > 1:
        sweep = []
        for condition, df in frames.items():
            tidy = group_metrics(df, reported, metric_groups(df), **kwargs)
            files[f"robustness/{condition_file(condition)}.csv"] = tidy
            files[f"robustness/{condition_file(condition)}_scores.csv"] = df[columns]
            sweep.append(tidy.assign(condition=condition))
        robustness = pd.concat(sweep, ignore_index=True)[["condition", *METRIC_COLUMNS]]
        files["robustness.csv"] = robustness
        summary["robustness"] = {c: _nested(t) for c, t in robustness.groupby("condition", sort=False)}
    for name, table in files.items():
        _write_csv(output_dir / name, table)
    _write_json(output_dir / "metrics.json", summary)
    plot_roc(output_dir / "roc.png", clean, reported, groups)
    plot_scores(output_dir / "scores.png", clean, reported, groups)
    record = {**record, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": software_versions(),
              "settings": options.to_dict(), "seed": options.seed,
              "models": [{**record.get("models", {}).get(m.name, {}), "name": m.name, "threshold": m.threshold,
                          "temperature": m.temperature, "min_side": m.min_side} for m in reported],
              "n_images": len(clean), "n_real": int((clean["label"] == 0).sum()),
              "n_fake": int((clean["label"] == 1).sum()), "n_errors": n_errors, "warnings": notes}
    _write_json(output_dir / "run.json", record)
    from ..report import evaluation_report

    evaluation_report(output_dir)
    written = sorted([*files, "metrics.json", "roc.png", "scores.png", "run.json", "report.html"])
    return EvalResult(output_dir=str(output_dir), metrics=metrics, warnings=notes, files=written,
                      n_images=len(clean), n_errors=n_errors)


def summary_table(metrics: pd.DataFrame) -> str:
    """The terminal table: one row per group and model, the headline metrics."""
    shown = {"n_real": "reals", "n_fake": "fakes", "auc": "AUC", "auc_low": "lo", "auc_high": "hi", "ap": "AP",
             "balanced_acc": "bAcc", "acc_real": "acc real", "acc_fake": "acc fake", "eer": "EER",
             "pd@0.05far": "Pd@5%", "n_too_small_real": "small reals", "n_too_small_fake": "small fakes"}
    part = metrics[metrics["metric"].isin(list(shown))]
    table = part.pivot_table(index=["group", "model"], columns="metric", values="value", sort=False, dropna=False)
    table = table.reindex(columns=[c for c in shown if c in table.columns])
    table["AUC [95% CI]"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{a:.3f}"
                             for a, lo, hi in zip(table["auc"], table["auc_low"], table["auc_high"])]
    table = table.drop(columns=["auc", "auc_low", "auc_high"]).rename(columns=shown)
    small = set(metrics.loc[metrics["metric"] == "small", "group"])
    if small:  # groups of fewer than MIN_GROUP images of their own: no interval, and said so
        table.index = table.index.set_levels([f"{g} (<{MIN_GROUP})" if g in small else g for g in table.index.levels[0]],
                                             level=0)
    for c in ("reals", "fakes", "small reals", "small fakes"):
        if c in table.columns:
            table[c] = table[c].map(lambda v: f"{v:.0f}" if np.isfinite(v) else "")
    order = ["reals", "fakes", "AUC [95% CI]", "AP", "bAcc", "acc real", "acc fake", "small reals", "small fakes", "EER",
             "Pd@5%"]
    table = table[[c for c in order if c in table.columns]].rename_axis(columns=None)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        text = table.to_string()
    if small:
        text += f"\n(<{MIN_GROUP}): fewer than {MIN_GROUP} images of its own (a generator's fakes, a source's reals): no interval"
    return text
