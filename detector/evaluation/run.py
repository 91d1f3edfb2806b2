"""The evaluation's entry points: score labelled images, or report on scores already computed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from ..datasets import COLUMNS, read_scan_output
from ..images import read_jpeg_quality
from ..inference import Detector
from ..results import read_run_record
from .cache import ScoreCache
from .conditions import CLEAN, EvalOptions
from .groups import ModelSpec, model_names
from .report import EvalResult, write_report
from .scoring import inspect_all, score_all

__all__ = ["evaluate", "evaluate_scan_outputs", "evaluate_scores"]


class _Locked:
    """Hold ``DIR/.evaluate.lock`` so that two evaluations never write one folder."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / ".evaluate.lock"
        self.lock = FileLock(str(self.path))

    def __enter__(self) -> "_Locked":
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"another evaluation is writing {self.path.parent} (lock {self.path})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
        self.path.unlink(missing_ok=True)


def evaluate(
    table: pd.DataFrame,
    detectors: Sequence[Detector],
    output_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    names: Sequence[str] | None = None,
    inputs: Sequence[str] = (),
) -> EvalResult:
    """Score the labelled images of ``table`` with every detector and write every output to ``output_dir``.

    ``table`` has the columns of :data:`detector.datasets.COLUMNS` (from :func:`read_labelled`).
    ``names`` name the models' columns (default: the weights' file names). See the module docstring.
    """
    if not detectors:
        raise ValueError("evaluate needs at least one detector")
    if table.empty:
        raise ValueError("no labelled images to evaluate")
    start = time.perf_counter()
    output_dir = Path(output_dir)
    stems = names or [Path(d.info.path).stem if d.info else "model" for d in detectors]
    models = [ModelSpec(n, threshold=d.threshold, temperature=d.temperature, min_side=getattr(d, "min_side", 0))
              for n, d in zip(model_names(stems), detectors)]
    with _Locked(output_dir):
        cache = ScoreCache(output_dir / "cache")
        scored = inspect_all(table[COLUMNS], options.workers)
        frames, work = score_all(scored, detectors, models, options, cache)
        record = {"inputs": list(inputs), "device": str(detectors[0].device), "precision": detectors[0].precision,
                  "models": {m.name: {**d.describe(), "weight": w} for m, d, w in
                             zip(models, detectors, options.model_weights or [1.0] * len(detectors))},
                  "cache": {**work, "entries": len(cache), "damaged_rows_skipped": cache.n_damaged}}
        result = write_report(frames, models, output_dir, options, record)
    result.n_scored, result.n_reused = work["scored"], work["reused"]
    result.seconds = time.perf_counter() - start
    return result


def evaluate_scores(
    scores: pd.DataFrame,
    models: Sequence[ModelSpec],
    output_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    record: dict | None = None,
) -> EvalResult:
    """Metrics, tables, plots and the run record from scores already computed.

    ``scores`` has the :data:`~detector.datasets.COLUMNS`, one ``logit_<name>`` column per model,
    and, for the bias guards, ``format``, ``width``, ``height`` (``jpeg_quality`` optional).
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    scores = scores.copy()
    defaults = {"format": "", "width": np.nan, "height": np.nan, "jpeg_quality": np.nan, "error": ""}
    for column, default in defaults.items():
        if column not in scores:
            scores[column] = default
    with _Locked(output_dir):
        result = write_report({CLEAN: scores}, models, output_dir, options, record or {})
    result.seconds = time.perf_counter() - start
    return result


def evaluate_scan_outputs(
    results_csvs: Sequence[str | os.PathLike],
    labels: pd.DataFrame,
    output_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
) -> EvalResult:
    """Evaluate ``detector scan`` outputs (of one model) against labels, without scoring again.

    The threshold and temperature come from each scan's run record (``<csv>.json``).
    """
    if options.perturbations or options.align_jpeg or options.center_crop:
        raise ValueError("a scan output holds the scores of the images as they were scanned: "
                         "--perturb, --align-jpeg and --center-crop need the images scored again (pass --weights)")
    parts, records = [], []
    for path in results_csvs:
        parts.append(read_scan_output(path, labels))
        records.append(read_run_record(path) or {})
    described = [r.get("detector", {}) for r in records]
    if len({d.get("weights_sha256") for d in described}) > 1:
        raise ValueError("the scan outputs were made with different weights; evaluate one model's outputs at a time")
    detector = described[0]
    stem = Path(detector["weights"]).stem if detector.get("weights") else "scan"
    model = ModelSpec(model_names([stem])[0], threshold=float(detector.get("threshold", 0.0)),
                      temperature=float(detector.get("temperature", 1.0)), min_side=int(detector.get("min_side") or 0))
    scores = pd.concat(parts, ignore_index=True).rename(columns={"logit": model.column})
    scores["jpeg_quality"] = [read_jpeg_quality(p) if f in ("JPEG", "MPO") and os.path.isfile(p) else None
                              for p, f in zip(scores["path"], scores["format"])]
    scores["jpeg_quality"] = scores["jpeg_quality"].astype(float)
    record = {"inputs": [str(p) for p in results_csvs], "scores_from": "scan outputs",
              "device": detector.get("device"), "precision": detector.get("precision"),
              "models": {model.name: detector}, "scan_records": records}
    return evaluate_scores(scores, [model], output_dir, options, record=record)


