"""Per-image work of an evaluation: inspect every file, then score every (image, condition) with every model.

Inspection, decoding and cutting run in DataLoader workers (:func:`detector.workers.in_workers`);
scoring is the scan's own path (:func:`detector.scoring.score_stream`). A score already in the cache
is not computed again, and an image is decoded only if some model still needs it.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..ensemble import Ensemble
from ..images import ImageError, decode_image, jpeg_quality, open_image
from ..inference import Detector
from ..progress import Progress
from ..provenance import evidence_tags, read_provenance
from ..scoring import Preparation, score_stream
from ..workers import in_workers
from .cache import ScoreCache, settings_key
from .conditions import CLEAN, EvalOptions, Perturbation, condition_rng, preprocess
from .groups import ModelSpec

__all__ = ["inspect_file", "inspect_all", "score_all"]


def inspect_file(path: str | os.PathLike) -> dict:
    """Content sha256, byte size, format, width, height and JPEG quality of a file, from its header, and
    the provenance evidence its metadata carries (:func:`detector.provenance.evidence_tags`).

    A file that cannot be opened gets ``error`` set (the message :func:`decode_image` gives).
    """
    out = {"sha256": "", "bytes": np.nan, "format": "", "width": np.nan, "height": np.nan,
           "jpeg_quality": np.nan, "error": "", "provenance": ""}
    try:
        data = Path(path).read_bytes()
        out.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        # metadata evidence, for the bias guards only: the scores stay the pixels' (no watermark search, no decoding)
        out["provenance"] = evidence_tags(read_provenance(data, watermarks=False))
        with open_image(io.BytesIO(data), str(path)) as img:  # only the formats decode_image reads
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


def _load_variant(job: tuple, options: EvalOptions, prepare: Preparation) -> dict:
    """Decode, preprocess, perturb and prepare one (image, condition) job for the models."""
    path, sha256, perturbation = job[1:4]
    try:
        pixels = decode_image(path, max_pixels=options.max_pixels).pixels
        pixels = preprocess(pixels, center_crop=options.center_crop, align_jpeg=options.align_jpeg)
        if perturbation is not None:
            pixels = perturbation.apply(pixels, condition_rng(options.seed, sha256, perturbation.name))
        return {"job": job, **prepare(np.asarray(pixels, dtype=np.uint8)), "error": ""}
    except ImageError as err:
        error = str(err)
    except Exception as err:  # noqa: BLE001 - one file's failure must not stop the evaluation
        error = f"unexpected {type(err).__name__}: {err}"
    return {"job": job, "error": error}


def inspect_all(table: pd.DataFrame, workers: int) -> pd.DataFrame:
    meta = pd.DataFrame(list(in_workers(inspect_file, list(table["path"]), workers)),
                        columns=["sha256", "bytes", "format", "width", "height", "jpeg_quality", "error", "provenance"])
    return pd.concat([table.reset_index(drop=True), meta], axis=1)


def _sets(detectors: Sequence) -> list[list[int]]:
    """The detectors' indices in sets that :func:`detector.scoring.score_stream` can score in one pass:
    at most one convolutional model per set (the probes ride along with the first)."""
    convs = [i for i, d in enumerate(detectors) if isinstance(d, Detector)]
    probes = [i for i in range(len(detectors)) if i not in convs]
    sets = [[c] for c in convs] or [[]]
    sets[0] = sorted(sets[0] + probes)
    return sets


def score_all(
    table: pd.DataFrame, detectors: Sequence, models: Sequence[ModelSpec], options: EvalOptions,
    cache: ScoreCache,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Per condition, the table with one logit column per model; and counts of work done.

    The models are scored together, as one set, through the scan's path; each one's raw logit is
    cached under its own settings key.
    """
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
    bar = Progress(len(jobs) * len(_sets(detectors)), enabled=options.progress, verb="scored")
    try:
        for members in _sets(detectors):
            together = Ensemble([detectors[m] for m in members], [models[m].name for m in members])
            mine = [j for j in jobs if set(j[4]) & set(members)]
            bar.update(len(jobs) - len(mine))
            items = in_workers(partial(_load_variant, options=options, prepare=together.transforms(options.patches)),
                               mine, options.workers)
            for scored in score_stream(together, items, batch_size=options.batch_size, mode=options.patches.mode,
                                       fusion=options.fusion):
                _, _, sha256, c, needed = scored.item["job"]
                bar.update(1)
                if scored.verdict is None:
                    errors.setdefault((sha256, c), scored.error)
                    continue
                own = scored.verdict.members or {together.names[0]: scored.verdict}
                for m in set(needed) & set(members):
                    if cache.get(sha256, keys[(m, c)]) is not None:  # an identical model scored it in this run
                        n_reused += 1
                        continue
                    cache.put(sha256, keys[(m, c)], own[models[m].name].logit)
                    n_scored += 1
    finally:
        bar.close()
        cache.compact()
    frames = {}
    for c in conditions:
        df = table.copy()
        df["error"] = [e or errors.get((s, c), "") for s, e in zip(df["sha256"], df["error"])]
        # the shorter side the models saw, against which a detector's minimum size is checked
        df["short_side"] = [min(options.scored_size(int(w), int(h), c)) if np.isfinite(w) and np.isfinite(h) else np.nan
                            for w, h in zip(df["width"].astype(float), df["height"].astype(float))]
        for m, model in enumerate(models):
            values = [cache.get(s, keys[(m, c)]) if not e else None for s, e in zip(df["sha256"], df["error"])]
            df[model.column] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        frames[c.name if c else CLEAN] = df
    return frames, {"scored": n_scored, "reused": n_reused}

