"""Benchmark evaluation: labelled images in; per-image scores, metric tables, plots and a run record out.

The path of :func:`evaluate`:

1. **inspect** every file in DataLoader workers: content sha256, byte size, format, size and JPEG
   quality, read from the header only;
2. **score** every image under every condition with every model (:meth:`Detector.score_pixels`,
   the same patch settings as ``scan``). Decoding, preprocessing and perturbation happen in the
   workers; a score already in the cache is not computed again, and an image is decoded only if
   some model still needs it;
3. **metrics** per group with :func:`detector.metrics.summary`, at each model's calibrated
   threshold and temperature. Groups follow Corvi et al. 2023: each generator's fakes against
   *all* reals pooled, each family (when the data names families), all fakes against all reals,
   and ``average``, the mean of the generator rows. The bias breakdown restricts *both* classes to
   one file format or one resolution bucket, so a result that the container explains collapses
   there;
4. **files** in the output folder (see :data:`OUTPUT_FILES`), each written atomically.

Preprocessing, identical for both classes: decode (no resizing) -> ``center_crop`` -> ``align_jpeg``
(an in-memory JPEG round trip) -> the condition's perturbation -> patches. The condition ``none`` is
the images after the first three steps; each perturbation of the robustness sweep is another
condition, seeded per file content, so that a real and a fake get the same treatment.

Model fusion (several ``--weights``): each model's logit is first divided by its temperature; the
rule (``mean``, ``max``, or ``soft-or``: the probability that at least one model says "generated",
``1 - prod(1 - p_i)``) is applied to those logits and, alike, to the models' thresholds, which gives
the fused model's threshold (its temperature is 1).

The cache (``cache/`` in the output folder) maps (file content sha256, settings key) to a logit.
The settings key covers the weights' sha256, architecture, precision, every patch and preprocessing
setting, the seed and the condition, so a cached score is reused only where it would come out the
same. Scores go to new part files written whole with :func:`~detector.checkpoints.atomic_write`;
every row carries a CRC, so a damaged part costs only its damaged rows, which are scored again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import metrics as M
from .checkpoints import atomic_write
from .datasets import COLUMNS, read_scan_output
from .fusion import FUSION_RULES
from .images import (
    DECODED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    gaussian_blur,
    jpeg_quality,
    read_jpeg_quality,
    reencode_jpeg,
)
from .inference import Detector
from .patches import PatchSettings
from .results import read_run_record

__all__ = [
    "CLEAN",
    "MODEL_FUSION_RULES",
    "OUTPUT_FILES",
    "PERTURBATION_KINDS",
    "EvalOptions",
    "EvalResult",
    "Group",
    "ModelSpec",
    "Perturbation",
    "ScoreCache",
    "bias_warnings",
    "breakdown_groups",
    "evaluate",
    "evaluate_scan_outputs",
    "evaluate_scores",
    "fuse_models",
    "group_metrics",
    "inspect_file",
    "metric_groups",
    "parse_perturbations",
    "preprocess",
    "settings_key",
    "size_bucket",
    "summary_table",
]

CLEAN = "none"
MODEL_FUSION_RULES = ("mean", "max", "soft-or")
PERTURBATION_KINDS = ("jpeg", "resize", "blur", "crop")
OUTPUT_FILES = ("scores.csv", "metrics.csv", "auc.csv", "acc.csv", "breakdown.csv", "metrics.json", "roc.png",
                "scores.png", "run.json")
METRIC_COLUMNS = ["group", "model", "metric", "value"]
RESERVED_GROUPS = ("all", "average")
# A bias warning is raised when the formats of the classes differ by this total-variation distance,
# or when size or JPEG quality alone ranks the classes with an AUC this far from 0.5.
FORMAT_GAP = 0.3
SEPARATION = 0.25
_SIZE_EDGES = (256, 512, 1024, 2048)


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Perturbation:
    """One condition of the robustness sweep: ``jpeg:Q``, ``resize:F``, ``blur:SIGMA`` or ``crop:S``."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATION_KINDS)}, got {self.kind!r}")
        v = self.value
        if self.kind == "jpeg" and not (float(v).is_integer() and 1 <= v <= 100):
            raise ValueError(f"jpeg quality must be an integer in [1, 100], got {v:g}")
        if self.kind == "resize" and not 0 < v <= 4:
            raise ValueError(f"resize factor must be in (0, 4], got {v:g}")
        if self.kind == "blur" and not 0 < v <= 20:
            raise ValueError(f"blur sigma must be in (0, 20], got {v:g}")
        if self.kind == "crop" and not (float(v).is_integer() and v >= 8):
            raise ValueError(f"crop size must be an integer >= 8, got {v:g}")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The perturbed RGB uint8 pixels; ``rng`` places the crop (the other kinds ignore it)."""
        if self.kind == "jpeg":
            return reencode_jpeg(pixels, int(self.value))
        if self.kind == "blur":
            return np.ascontiguousarray(gaussian_blur(pixels, float(self.value)))
        h, w = pixels.shape[:2]
        if self.kind == "resize":
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.BICUBIC))
        ch, cw = min(int(self.value), h), min(int(self.value), w)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return np.ascontiguousarray(pixels[top : top + ch, left : left + cw])


def parse_perturbations(specs: Iterable[str]) -> tuple[Perturbation, ...]:
    """``["jpeg:95,75", "blur:1"]`` -> one :class:`Perturbation` per value, in order, without repeats."""
    out: list[Perturbation] = []
    for spec in specs:
        kind, sep, values = spec.partition(":")
        if not sep or not values:
            raise ValueError(f"a perturbation is KIND:VALUE[,VALUE...] with KIND in {', '.join(PERTURBATION_KINDS)}, "
                             f"got {spec!r}")
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{spec!r}: {text!r} is not a number") from None
            p = Perturbation(kind.strip().lower(), value)
            if p not in out:
                out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class EvalOptions:
    """Every evaluation setting except inputs, weights and output folder.

    ``patches``, ``fusion`` (of patch logits), ``batch_size``, ``workers`` and ``max_pixels`` mean
    what they mean for ``scan``. ``model_fusion`` fuses several models' logits. ``seed`` seeds the
    perturbations and the bootstrap (patch positions have ``patches.seed``).
    """

    patches: PatchSettings = field(default_factory=PatchSettings)
    fusion: str = "mean"
    model_fusion: str = "mean"
    align_jpeg: int | None = None
    center_crop: int | None = None
    perturbations: tuple[Perturbation, ...] = ()
    batch_size: int = 16
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    n_boot: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if self.model_fusion not in MODEL_FUSION_RULES:
            raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {self.model_fusion!r}")
        if self.align_jpeg is not None and not 1 <= self.align_jpeg <= 100:
            raise ValueError(f"align_jpeg must be a JPEG quality in [1, 100], got {self.align_jpeg}")
        if self.center_crop is not None and self.center_crop < 8:
            raise ValueError(f"center_crop must be at least 8 px, got {self.center_crop}")
        if self.batch_size < 1 or self.workers < 0 or self.n_boot < 0:
            raise ValueError("batch_size must be >= 1, workers >= 0 and n_boot >= 0")

    @property
    def conditions(self) -> tuple[Perturbation | None, ...]:
        """``None`` (the clean condition) then each perturbation."""
        return (None, *self.perturbations)

    def scoring_settings(self) -> dict:
        """Everything besides the model and the condition that can change a logit."""
        return {"patches": asdict(self.patches), "fusion": self.fusion, "max_pixels": self.max_pixels,
                "align_jpeg": self.align_jpeg, "center_crop": self.center_crop, "seed": self.seed}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perturbations"] = [p.name for p in self.perturbations]
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A column of logits and how to read it: the threshold and the temperature of its model."""

    name: str
    threshold: float = 0.0
    temperature: float = 1.0

    @property
    def column(self) -> str:
        return f"logit_{self.name}"


def _model_names(stems: Sequence[str]) -> list[str]:
    names: list[str] = []
    for stem in stems:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "model"
        if base == "fused":
            base = "fused_model"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def settings_key(model: dict, options: EvalOptions, condition: str) -> str:
    """The cache key of a model's scores under ``options`` and ``condition`` (a hex digest).

    ``model`` is :meth:`Detector.describe`: its weights sha256, architecture and precision count,
    its device and file path do not.
    """
    payload = {"weights_sha256": model.get("weights_sha256"), "architecture": model.get("architecture"),
               "precision": model.get("precision"), "scoring": options.scoring_settings(), "condition": condition}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# per-image work (runs in DataLoader workers)


def inspect_file(path: str | os.PathLike) -> dict:
    """Content sha256, byte size, format, width, height and JPEG quality of a file, from its header.

    A file that cannot be opened gets ``error`` set (the message :func:`decode_image` gives).
    """
    out = {"sha256": "", "bytes": np.nan, "format": "", "width": np.nan, "height": np.nan,
           "jpeg_quality": np.nan, "error": ""}
    try:
        data = Path(path).read_bytes()
        out.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        with Image.open(io.BytesIO(data), formats=DECODED_FORMATS) as img:  # only the formats decode_image reads
            out.update(format=img.format or "", width=img.width, height=img.height)
            quality = jpeg_quality(img) if out["format"] in ("JPEG", "MPO") else None
        out["jpeg_quality"] = np.nan if quality is None else quality
    except Exception:  # noqa: BLE001 - whatever went wrong, decode_image words it for the error column
        try:
            decode_image(path)
            out["error"] = "unreadable header"
        except ImageError as err:
            out["error"] = str(err)
        except Exception as err:  # noqa: BLE001
            out["error"] = f"unexpected {type(err).__name__}: {err}"
    return out


def preprocess(pixels: np.ndarray, *, center_crop: int | None = None, align_jpeg: int | None = None) -> np.ndarray:
    """What the evaluation does to every image of both classes: a central crop, then a JPEG round trip.

    The crop's origin is rounded down to a multiple of 8, which keeps a JPEG's 8x8 block grid in
    phase; an image smaller than ``center_crop`` keeps its size in that dimension.
    """
    if center_crop:
        h, w = pixels.shape[:2]
        ch, cw = min(center_crop, h), min(center_crop, w)
        top, left = (h - ch) // 2 // 8 * 8, (w - cw) // 2 // 8 * 8
        pixels = pixels[top : top + ch, left : left + cw]
    if align_jpeg:
        pixels = reencode_jpeg(pixels, align_jpeg)
    return np.ascontiguousarray(pixels)


def _condition_rng(seed: int, sha256: str, condition: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{sha256}:{condition}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _load_variant(job: tuple, options: EvalOptions) -> dict:
    """Decode, preprocess and perturb one (image, condition) job; ``pixels`` is a tensor (shared memory)."""
    path, sha256, perturbation = job[1:4]
    try:
        pixels = decode_image(path, max_pixels=options.max_pixels).pixels
        pixels = preprocess(pixels, center_crop=options.center_crop, align_jpeg=options.align_jpeg)
        if perturbation is not None:
            pixels = perturbation.apply(pixels, _condition_rng(options.seed, sha256, perturbation.name))
        return {"job": job, "pixels": torch.from_numpy(np.array(pixels, dtype=np.uint8)), "error": ""}
    except ImageError as err:
        error = str(err)
    except Exception as err:  # noqa: BLE001 - one file's failure must not stop the evaluation
        error = f"unexpected {type(err).__name__}: {err}"
    return {"job": job, "pixels": None, "error": error}


class _Jobs(Dataset):
    def __init__(self, fn: Callable, jobs: Sequence) -> None:
        self.fn, self.jobs = fn, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int):
        return self.fn(self.jobs[index])


def _unbatched(item):
    return item


def _in_workers(fn: Callable, jobs: Sequence, workers: int) -> Iterator:
    """``fn(job)`` for every job, in order, computed in up to ``workers`` DataLoader processes."""
    if not jobs:
        return iter(())
    n = min(workers, len(jobs))
    return iter(DataLoader(_Jobs(fn, jobs), batch_size=None, shuffle=False, num_workers=n, collate_fn=_unbatched,
                           prefetch_factor=2 if n else None))


# --------------------------------------------------------------------------------------------
# cache


def _crc(fields: Sequence[str]) -> str:
    return f"{zlib.crc32(','.join(fields).encode('utf-8')):08x}"


class ScoreCache:
    """Logits keyed by (file content sha256, :func:`settings_key`), kept as CSV parts in ``folder``.

    New scores are written as a new part every ``flush_every`` scores or ``flush_seconds``, and by
    :meth:`flush`; parts are never rewritten (:meth:`compact` merges many into one).
    """

    HEADER = ["content_sha256", "settings", "logit", "crc"]

    def __init__(self, folder: str | os.PathLike, *, flush_every: int = 64, flush_seconds: float = 30.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._values: dict[tuple[str, str], float] = {}
        self._new: list[tuple[str, str, float]] = []
        self._last = time.monotonic()
        self.n_damaged = 0
        for part in self._parts():
            self._read(part)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.csv"))

    def _read(self, part: Path) -> None:
        with open(part, newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.reader(fh):
                if row == self.HEADER:
                    continue
                if len(row) == 4 and _crc(row[:3]) == row[3]:
                    try:
                        self._values[(row[0], row[1])] = float(row[2])
                        continue
                    except ValueError:
                        pass
                self.n_damaged += 1

    def __len__(self) -> int:
        return len(self._values)

    def get(self, sha256: str, key: str) -> float | None:
        return self._values.get((sha256, key))

    def put(self, sha256: str, key: str, logit: float) -> None:
        self._values[(sha256, key)] = float(logit)
        self._new.append((sha256, key, float(logit)))
        if len(self._new) >= self.flush_every or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def _write_part(self, rows: Sequence[tuple[str, str, float]]) -> Path:
        target = self.folder / f"part-{time.time_ns():020d}-{os.getpid()}.csv"

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(self.HEADER)
                for sha256, key, logit in rows:
                    fields = [sha256, key, repr(logit)]
                    writer.writerow([*fields, _crc(fields)])

        atomic_write(target, write)
        return target

    def flush(self) -> None:
        """Write the scores added since the last flush as a new part."""
        if self._new:
            self._write_part(self._new)
            self._new = []
        self._last = time.monotonic()

    def compact(self, max_parts: int = 32) -> None:
        """Merge the parts into one when there are more than ``max_parts``."""
        self.flush()
        parts = self._parts()
        if len(parts) > max_parts:
            merged = self._write_part([(s, k, v) for (s, k), v in self._values.items()])
            for part in parts:
                if part != merged:
                    part.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# scoring


def _inspect_all(table: pd.DataFrame, workers: int) -> pd.DataFrame:
    meta = pd.DataFrame(list(_in_workers(inspect_file, list(table["path"]), workers)),
                        columns=["sha256", "bytes", "format", "width", "height", "jpeg_quality", "error"])
    return pd.concat([table.reset_index(drop=True), meta], axis=1)


def _score_all(
    table: pd.DataFrame, detectors: Sequence[Detector], models: Sequence[ModelSpec], options: EvalOptions,
    cache: ScoreCache,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Per condition, the table with one logit column per model; and counts of work done."""
    from tqdm import tqdm

    conditions = options.conditions
    described = [d.describe() for d in detectors]
    keys = {(m, c): settings_key(described[m], options, c.name if c else CLEAN)
            for m in range(len(detectors)) for c in conditions}
    jobs, seen, n_reused = [], set(), 0
    for i, row in enumerate(table.itertuples(index=False)):
        for c in conditions:
            if row.error or (row.sha256, c) in seen:
                continue
            seen.add((row.sha256, c))
            needed = tuple(m for m in range(len(detectors)) if cache.get(row.sha256, keys[(m, c)]) is None)
            n_reused += len(detectors) - len(needed)
            if needed:
                jobs.append((i, row.path, row.sha256, c, needed))
    errors: dict[tuple[str, Perturbation | None], str] = {}
    n_scored = 0
    bar = tqdm(total=len(jobs), disable=not options.progress, file=sys.stderr, unit="img", dynamic_ncols=True)
    try:
        for item in _in_workers(partial(_load_variant, options=options), jobs, options.workers):
            _, _, sha256, c, needed = item["job"]
            bar.update(1)
            if item["error"]:
                errors[(sha256, c)] = item["error"]
                continue
            pixels = item["pixels"].numpy()
            for m in needed:
                if cache.get(sha256, keys[(m, c)]) is not None:  # an identical model scored it in this run
                    n_reused += 1
                    continue
                try:
                    logit, _, _ = detectors[m].score_pixels(pixels, options.patches, fusion=options.fusion,
                                                            batch_size=options.batch_size)
                except Exception as err:  # noqa: BLE001 - one image's failure must not stop the evaluation
                    errors[(sha256, c)] = f"unexpected {type(err).__name__}: {err}"
                    break
                cache.put(sha256, keys[(m, c)], logit)
                n_scored += 1
    finally:
        bar.close()
        cache.compact()
    frames = {}
    for c in conditions:
        df = table.copy()
        df["error"] = [e or errors.get((s, c), "") for s, e in zip(df["sha256"], df["error"])]
        for m, model in enumerate(models):
            values = [cache.get(s, keys[(m, c)]) if not e else None for s, e in zip(df["sha256"], df["error"])]
            df[model.column] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        frames[c.name if c else CLEAN] = df
    return frames, {"scored": n_scored, "reused": n_reused}


# --------------------------------------------------------------------------------------------
# fusion, groups and metrics


def _fuse_rows(z: np.ndarray, rule: str) -> np.ndarray:
    if rule == "mean":
        return z.mean(axis=1)
    if rule == "max":
        return z.max(axis=1)
    if rule == "soft-or":
        # log prod(1 - p_i) = -sum softplus(z_i); logit(1 - prod(1 - p_i)) = log(1 - e^s) - s
        with np.errstate(invalid="ignore"):  # NaN rows (unreadable files) stay NaN
            s = -np.logaddexp(0.0, z).sum(axis=1)
            return np.log(-np.expm1(np.minimum(s, -1e-300))) - s
    raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {rule!r}")


def fuse_models(logits: np.ndarray, models: Sequence[ModelSpec], rule: str = "mean") -> tuple[np.ndarray, ModelSpec]:
    """Fuse the logits ``(n_images, n_models)`` of several models into one logit per image.

    Each model's logits (and threshold) are divided by its temperature, then ``rule`` (``mean``,
    ``max`` or ``soft-or``) combines them. Returns the fused logits and the fused model (name
    ``fused``, its threshold the rule applied to the thresholds, temperature 1). A NaN in a row
    gives NaN.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(models):
        raise ValueError(f"logits must be (n_images, {len(models)}), got {z.shape}")
    temperatures = np.array([m.temperature for m in models], dtype=np.float64)
    thresholds = np.array([[m.threshold for m in models]], dtype=np.float64) / temperatures
    fused = _fuse_rows(z / temperatures, rule)
    return fused, ModelSpec("fused", threshold=float(_fuse_rows(thresholds, rule)[0]), temperature=1.0)


@dataclass(frozen=True)
class Group:
    """A set of rows metrics are computed on: ``kind`` is generator, family, all, format or size."""

    name: str
    kind: str
    mask: np.ndarray


def metric_groups(df: pd.DataFrame) -> list[Group]:
    """Each generator's fakes with all reals, each family's (if the data names families), then all."""
    real = (df["label"] == 0).to_numpy()
    fake = ~real
    groups = []
    generators = sorted(set(df.loc[fake, "generator"]))
    for g in generators:
        name = f"generator:{g}" if g in RESERVED_GROUPS else g
        groups.append(Group(name, "generator", real | (fake & (df["generator"] == g).to_numpy())))
    if (df.loc[fake, "family"] != df.loc[fake, "generator"]).any():
        for f in sorted(set(df.loc[fake, "family"])):
            groups.append(Group(f"family:{f}", "family", real | (fake & (df["family"] == f).to_numpy())))
    groups.append(Group("all", "all", np.ones(len(df), dtype=bool)))
    return groups


def size_bucket(width: float, height: float) -> str:
    """The resolution bucket of an image, by its shorter side: ``<256``, ``256-511`` ... ``>=2048``."""
    if not (np.isfinite(width) and np.isfinite(height)):
        return "unknown"
    short = min(width, height)
    lower = 0
    for edge in _SIZE_EDGES:
        if short < edge:
            return f"<{edge}" if lower == 0 else f"{lower}-{edge - 1}"
        lower = edge
    return f">={_SIZE_EDGES[-1]}"


def breakdown_groups(df: pd.DataFrame) -> list[Group]:
    """Both classes restricted to one file format, then to one resolution bucket (the bias breakdown)."""
    groups = []
    formats = df["format"].fillna("").replace("", "unknown")
    for f in sorted(set(formats)):
        groups.append(Group(f"format:{f}", "format", (formats == f).to_numpy()))
    buckets = np.array([size_bucket(w, h) for w, h in zip(df["width"].astype(float), df["height"].astype(float))])
    order = ["<256", *[f"{a}-{b - 1}" for a, b in zip(_SIZE_EDGES, _SIZE_EDGES[1:])], f">={_SIZE_EDGES[-1]}", "unknown"]
    for b in order:
        if (buckets == b).any():
            groups.append(Group(f"size:{b}", "size", buckets == b))
    return groups


def group_metrics(
    df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group], *, n_boot: int = 1000, seed: int = 0,
    average: bool = True,
) -> pd.DataFrame:
    """Tidy metrics (group, model, metric, value) of every group and model, via :func:`metrics.summary`.

    Rows whose logit is NaN (unreadable files) are left out. With ``average``, an ``average`` row
    is the mean over the generator groups of each metric, except ``n_fake``, which is their sum.
    """
    labels = df["label"].to_numpy(dtype=int)
    rows = []
    for model in models:
        scores = df[model.column].to_numpy(dtype=np.float64)
        valid = np.isfinite(scores)
        per_generator = []
        for group in groups:
            keep = group.mask & valid
            values = M.summary(labels[keep], scores[keep], threshold=model.threshold, temperature=model.temperature,
                               n_boot=n_boot, seed=seed)
            rows.extend((group.name, model.name, k, float(v)) for k, v in values.items())
            if group.kind == "generator":
                per_generator.append(values)
        if average and per_generator:
            mean = pd.DataFrame(per_generator).mean(axis=0, skipna=False)
            mean["n_fake"] = float(sum(v["n_fake"] for v in per_generator))
            rows.extend(("average", model.name, k, float(v)) for k, v in mean.items())
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _separation(labels: np.ndarray, values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return M.auc(labels, values)


def bias_warnings(df: pd.DataFrame, *, align_jpeg: int | None = None, center_crop: int | None = None) -> list[str]:
    """Warnings where reals and fakes differ systematically in format, JPEG quality or size.

    Such a difference lets a detector, or a benchmark, separate the classes by the container alone.
    ``align_jpeg``/``center_crop`` (if the scores were computed with them) are named in the advice.
    """
    out = []
    df = df[df["error"].fillna("") == ""] if "error" in df else df
    real, fake = df[df["label"] == 0], df[df["label"] == 1]
    if real.empty or fake.empty:
        return [f"only one class present ({len(real)} real, {len(fake)} fake): metrics that need both are NaN"]

    def shares(part: pd.DataFrame) -> pd.Series:
        return part["format"].fillna("").replace("", "unknown").value_counts(normalize=True)

    pr, pf = shares(real), shares(fake)
    gap = 0.5 * pr.subtract(pf, fill_value=0.0).abs().sum()
    if gap >= FORMAT_GAP:
        def describe(p: pd.Series) -> str:
            return ", ".join(f"{v:.0%} {k}" for k, v in p.items())

        done = (f" (the scores are after --align-jpeg {align_jpeg}, which reduces but does not remove this cue)"
                if align_jpeg else "; compare with --align-jpeg 90")
        out.append(f"file format differs between the classes: reals {describe(pr)}; fakes {describe(pf)}{done}; "
                   f"see the format: rows of breakdown.csv")
    jpeg = df[np.isfinite(df["jpeg_quality"].astype(float))] if "jpeg_quality" in df else df.iloc[:0]
    labels = jpeg["label"].to_numpy(dtype=int)
    if len(set(labels)) == 2:
        q = jpeg["jpeg_quality"].to_numpy(dtype=float)
        auc = _separation(labels, q)
        if abs(auc - 0.5) >= SEPARATION:
            out.append(f"JPEG quality differs between the classes: median {np.median(q[labels == 0]):.0f} for reals, "
                       f"{np.median(q[labels == 1]):.0f} for fakes (quality alone ranks them with AUC {auc:.2f})"
                       + ("" if align_jpeg else "; compare with --align-jpeg 90"))
    sized = df[np.isfinite(df["width"].astype(float)) & np.isfinite(df["height"].astype(float))]
    labels = sized["label"].to_numpy(dtype=int)
    if len(set(labels)) == 2:
        w, h = sized["width"].to_numpy(dtype=float), sized["height"].to_numpy(dtype=float)
        auc = _separation(labels, w * h)
        if abs(auc - 0.5) >= SEPARATION:
            def median_size(mask: np.ndarray) -> str:
                return f"{np.median(w[mask]):.0f}x{np.median(h[mask]):.0f}"

            crop = max(8, int(np.minimum(w, h).min()) // 8 * 8)
            out.append(f"image size differs between the classes: median {median_size(labels == 0)} px for reals, "
                       f"{median_size(labels == 1)} for fakes (pixel count alone ranks them with AUC {auc:.2f})"
                       + (f"; the scores are after --center-crop {center_crop}" if center_crop
                          else f"; compare with --center-crop {crop}") + "; see the size: rows of breakdown.csv")
    if "sha256" in df:
        both = set(real["sha256"]) & set(fake["sha256"])
        if both:
            out.append(f"{len(both)} file(s) appear with identical content among both reals and fakes")
    return out


# --------------------------------------------------------------------------------------------
# reports


def _with_fusion(frames: dict[str, pd.DataFrame], models: Sequence[ModelSpec], rule: str) -> list[ModelSpec]:
    """Add the fused column to every frame when there are several models; the models to report."""
    if len(models) < 2:
        return list(models)
    fused = None
    for df in frames.values():
        df["logit_fused"], fused = fuse_models(df[[m.column for m in models]].to_numpy(), models, rule)
    return [*models, fused]


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


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("detector", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "pillow", "pillow-heif",
                 "safetensors", "timm", "matplotlib"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _colour(k: int, n: int):
    """Distinct line colours: matplotlib's ten, or tab20 for more groups."""
    if n <= 10:
        return f"C{k}"
    from matplotlib import colormaps

    return colormaps["tab20"](k % 20)


def _plot_roc(path: Path, df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group]) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    shown = [g for g in groups if g.kind in ("generator", "all")]
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    labels = df["label"].to_numpy(dtype=int)
    for ax, model in zip(axes, models):
        scores = df[model.column].to_numpy(dtype=np.float64)
        for k, group in enumerate(shown):
            keep = group.mask & np.isfinite(scores)
            if len(set(labels[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(labels[keep], scores[keep])
            style = ({"color": "black", "lw": 3.0, "alpha": 0.45, "zorder": 1} if group.kind == "all"
                     else {"color": _colour(k, len(shown) - 1), "lw": 1.3, "zorder": 2})
            ax.plot(fpr, tpr, label=f"{group.name} (AUC {M.auc(labels[keep], scores[keep]):.3f})", **style)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-alarm rate (reals called fake)",
               ylabel="detection rate (fakes caught)", title=f"ROC: {model.name}")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(models):]:
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _plot_scores(path: Path, df: pd.DataFrame, models: Sequence[ModelSpec], groups: Sequence[Group]) -> None:
    from matplotlib.figure import Figure

    generators = [g for g in groups if g.kind == "generator"]
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    real = (df["label"] == 0).to_numpy()
    for ax, model in zip(axes, models):
        scores = df[model.column].to_numpy(dtype=np.float64)
        finite = np.isfinite(scores)
        if not finite.any():
            continue
        lo, hi = float(scores[finite].min()), float(scores[finite].max())
        bins = np.linspace(lo - 1e-6, hi + 1e-6, 41)
        ax.hist(scores[real & finite], bins=bins, density=True, color="grey", alpha=0.5,
                label=f"real ({(real & finite).sum()})")
        for k, group in enumerate(generators):
            keep = group.mask & ~real & finite
            if keep.any():
                ax.hist(scores[keep], bins=bins, density=True, histtype="step", lw=1.4,
                        color=_colour(k, len(generators)), label=f"{group.name} ({keep.sum()})")
        ax.axvline(model.threshold, color="black", ls="--", lw=1, label=f"threshold {model.threshold:.3g}")
        ax.set(xlabel="logit", ylabel="density", title=f"scores: {model.name}")
        ax.legend(fontsize=7)
    for ax in axes[len(models):]:
        ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _condition_file(condition: str) -> str:
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
                f"{self.n_reused} taken from the cache, in {self.seconds:.1f} s -> {self.output_dir}")


_SCORE_COLUMNS = [*COLUMNS, "format", "width", "height", "jpeg_quality", "bytes", "sha256", "error"]


def _report(
    frames: dict[str, pd.DataFrame], models: Sequence[ModelSpec], output_dir: Path, options: EvalOptions, record: dict,
) -> EvalResult:
    """Metrics, tables, plots and the run record from per-condition score tables."""
    reported = _with_fusion(frames, models, options.model_fusion)
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
               "models": {m.name: {"threshold": m.threshold, "temperature": m.temperature} for m in reported}}
    if len(frames) > 1:
        sweep = []
        for condition, df in frames.items():
            tidy = group_metrics(df, reported, metric_groups(df), **kwargs)
            files[f"robustness/{_condition_file(condition)}.csv"] = tidy
            files[f"robustness/{_condition_file(condition)}_scores.csv"] = df[columns]
            sweep.append(tidy.assign(condition=condition))
        robustness = pd.concat(sweep, ignore_index=True)[["condition", *METRIC_COLUMNS]]
        files["robustness.csv"] = robustness
        summary["robustness"] = {c: _nested(t) for c, t in robustness.groupby("condition", sort=False)}
    for name, table in files.items():
        _write_csv(output_dir / name, table)
    _write_json(output_dir / "metrics.json", summary)
    _plot_roc(output_dir / "roc.png", clean, reported, groups)
    _plot_scores(output_dir / "scores.png", clean, reported, groups)
    record = {**record, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
              "settings": options.to_dict(), "seed": options.seed,
              "models": [{**record.get("models", {}).get(m.name, {}), "name": m.name, "threshold": m.threshold,
                          "temperature": m.temperature} for m in reported],
              "n_images": len(clean), "n_real": int((clean["label"] == 0).sum()),
              "n_fake": int((clean["label"] == 1).sum()), "n_errors": n_errors, "warnings": notes}
    _write_json(output_dir / "run.json", record)
    written = sorted([*files, "metrics.json", "roc.png", "scores.png", "run.json"])
    return EvalResult(output_dir=str(output_dir), metrics=metrics, warnings=notes, files=written,
                      n_images=len(clean), n_errors=n_errors)


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
    models = [ModelSpec(n, threshold=d.threshold, temperature=d.temperature)
              for n, d in zip(_model_names(stems), detectors)]
    with _Locked(output_dir):
        cache = ScoreCache(output_dir / "cache")
        scored = _inspect_all(table[COLUMNS], options.workers)
        frames, work = _score_all(scored, detectors, models, options, cache)
        record = {"inputs": list(inputs), "device": str(detectors[0].device), "precision": detectors[0].precision,
                  "models": {m.name: d.describe() for m, d in zip(models, detectors)},
                  "cache": {**work, "entries": len(cache), "damaged_rows_skipped": cache.n_damaged}}
        result = _report(frames, models, output_dir, options, record)
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
        result = _report({CLEAN: scores}, models, output_dir, options, record or {})
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
    model = ModelSpec(_model_names([stem])[0], threshold=float(detector.get("threshold", 0.0)),
                      temperature=float(detector.get("temperature", 1.0)))
    scores = pd.concat(parts, ignore_index=True).rename(columns={"logit": model.column})
    scores["jpeg_quality"] = [read_jpeg_quality(p) if f in ("JPEG", "MPO") and os.path.isfile(p) else None
                              for p, f in zip(scores["path"], scores["format"])]
    scores["jpeg_quality"] = scores["jpeg_quality"].astype(float)
    record = {"inputs": [str(p) for p in results_csvs], "scores_from": "scan outputs",
              "device": detector.get("device"), "precision": detector.get("precision"),
              "models": {model.name: detector}, "scan_records": records}
    return evaluate_scores(scores, [model], output_dir, options, record=record)


def summary_table(metrics: pd.DataFrame) -> str:
    """The terminal table: one row per group and model, the headline metrics."""
    shown = {"n_real": "reals", "n_fake": "fakes", "auc": "AUC", "auc_low": "lo", "auc_high": "hi", "ap": "AP",
             "balanced_acc": "bAcc", "acc_real": "acc real", "acc_fake": "acc fake", "eer": "EER",
             "pd@0.05far": "Pd@5%"}
    part = metrics[metrics["metric"].isin(list(shown))]
    table = part.pivot_table(index=["group", "model"], columns="metric", values="value", sort=False, dropna=False)
    table = table.reindex(columns=[c for c in shown if c in table.columns])
    table["AUC [95% CI]"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{a:.3f}"
                             for a, lo, hi in zip(table["auc"], table["auc_low"], table["auc_high"])]
    table = table.drop(columns=["auc", "auc_low", "auc_high"]).rename(columns=shown)
    for c in ("reals", "fakes"):
        table[c] = table[c].map(lambda v: f"{v:.0f}")
    order = ["reals", "fakes", "AUC [95% CI]", "AP", "bAcc", "acc real", "acc fake", "EER", "Pd@5%"]
    table = table[[c for c in order if c in table.columns]].rename_axis(columns=None)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        return table.to_string()
