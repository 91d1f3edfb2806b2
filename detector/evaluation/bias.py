"""Bias guards: warnings where reals and fakes differ in format, JPEG quality or size, not only in content,
and where their files carry provenance evidence (a benchmark whose fakes carry generator metadata is a
benchmark of metadata)."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pandas as pd

from .. import metrics as M

__all__ = ["bias_warnings"]

# A bias warning is raised when the formats of the classes differ by this total-variation distance,
# or when size or JPEG quality alone ranks the classes with an AUC this far from 0.5.
FORMAT_GAP = 0.3
SEPARATION = 0.25
_SIZE_EDGES = (256, 512, 1024, 2048)

def _separation(labels: np.ndarray, values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return M.auc(labels, values)


def _metadata_evidence(real: pd.DataFrame, fake: pd.DataFrame) -> list[str]:
    """How many files of each class carry provenance evidence in their metadata (the ``provenance``
    column of :func:`detector.evaluation.scoring.inspect_file`: ``kind:strength`` tags)."""
    if "provenance" not in real or "provenance" not in fake:
        return []

    def describe(part: pd.DataFrame, name: str) -> tuple[int, str]:
        tags = part["provenance"].fillna("").astype(str)
        kinds = Counter(tag for text in tags for tag in text.split(";") if tag)
        carried = int((tags != "").sum())
        listed = ", ".join(f"{n} {tag.replace(':', ' ')}" for tag, n in kinds.most_common())
        return carried, f"{carried} of {len(part)} {name}" + (f" ({listed})" if listed else "")

    n_real, reals = describe(real, "reals")
    n_fake, fakes = describe(fake, "fakes")
    if not n_real and not n_fake:
        return []
    return [f"metadata evidence: {fakes} and {reals} carry provenance evidence in their files (C2PA, XMP, EXIF, "
            f"PNG chunks); these scores are the pixels' and ignore it, but a detector or benchmark reading files "
            f"could tell the classes apart by their metadata alone"]


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
    out += _metadata_evidence(real, fake)
    if "sha256" in df:
        both = set(real["sha256"]) & set(fake["sha256"])
        if both:
            out.append(f"{len(both)} file(s) appear with identical content among both reals and fakes")
    return out


