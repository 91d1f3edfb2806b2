"""Labelled image collections in the layouts people already have, as one tidy table.

Every reader returns a :class:`pandas.DataFrame` with columns ``path`` (str), ``label`` (0 real,
1 generated), ``generator`` (``real`` for real photos), ``family`` and ``source`` (the real-photo
source or the generator, used to hold out whole sources when splitting).

Layouts:

* **manifest CSV**: ``path,label[,generator][,family][,source]``; label ``0/1`` or ``real/fake``;
  relative paths are relative to the CSV's folder.
* **CNNDetection** (Wang et al. 2020): ``root/<generator>/[<class>/]0_real|1_fake/``.
* **Corvi et al. 2023**: one folder per source under ``root``; a folder whose name contains
  ``real`` holds real photos, every other folder is a generator.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .images import InputError, find_images

__all__ = ["COLUMNS", "read_labelled", "read_manifest", "read_cnndetection", "read_corvi", "split_by_source"]

COLUMNS = ["path", "label", "generator", "family", "source"]
_LABEL_WORDS = {"0": 0, "1": 1, "real": 0, "fake": 1, "generated": 1, "synthetic": 1, "0_real": 0, "1_fake": 1}


def _parse_label(value: object, where: str) -> int:
    key = str(value).strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in _LABEL_WORDS:
        raise InputError(f"{where}: label must be 0/1 or real/fake, got {value!r}")
    return _LABEL_WORDS[key]


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["generator"] = [g if lab == 1 else "real" for g, lab in zip(df["generator"], df["label"])]
    if "family" not in df or df["family"].isna().all():
        df["family"] = df["generator"]
    if "source" not in df or df["source"].isna().all():
        df["source"] = df["generator"]
    df["family"] = df["family"].fillna(df["generator"])
    df["source"] = df["source"].fillna(df["generator"])
    return df[COLUMNS].reset_index(drop=True)


def read_manifest(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A CSV listing ``path,label`` and optionally ``generator``, ``family``, ``source``."""
    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise InputError(f"{csv_path}: a manifest needs columns path and label (missing {sorted(missing)})")
    base = csv_path.parent
    df["path"] = [p if os.path.isabs(p) else str(base / p) for p in df["path"]]
    df["label"] = [_parse_label(v, f"{csv_path} row {i + 2}") for i, v in enumerate(df["label"])]
    if "generator" not in df:
        df["generator"] = ["fake" if lab else "real" for lab in df["label"]]
    df["generator"] = [g or ("fake" if lab else "real") for g, lab in zip(df["generator"], df["label"])]
    for col in ("family", "source"):
        if col in df:
            df[col] = df[col].replace("", None)
        else:
            df[col] = None
    return _finish(df)


def read_cnndetection(root: str | os.PathLike) -> pd.DataFrame:
    """``root/<generator>/[<class>/]0_real|1_fake/``: the generator is the first folder level."""
    root = Path(root)
    rows = []
    for class_dir in sorted(root.rglob("*")):
        if not class_dir.is_dir() or class_dir.name not in ("0_real", "1_fake"):
            continue
        rel = class_dir.relative_to(root).parts
        generator = rel[0] if len(rel) > 1 else root.name
        label = _LABEL_WORDS[class_dir.name]
        for path in find_images([class_dir]):
            rows.append({"path": str(path), "label": label, "generator": generator, "family": None,
                         "source": generator if label else f"{generator}/real"})
    if not rows:
        raise InputError(f"{root}: no 0_real or 1_fake folder with images found")
    return _finish(pd.DataFrame(rows))


def read_corvi(root: str | os.PathLike) -> pd.DataFrame:
    """One folder per source: names containing ``real`` are real photos, the rest generators."""
    root = Path(root)
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = 0 if "real" in sub.name.lower() else 1
        for path in find_images([sub]):
            rows.append({"path": str(path), "label": label, "generator": sub.name, "family": None, "source": sub.name})
    if not rows:
        raise InputError(f"{root}: no images in its sub-folders")
    return _finish(pd.DataFrame(rows))


def read_labelled(source: str | os.PathLike) -> pd.DataFrame:
    """Read any supported layout, recognised from what is on disk."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_manifest(path)
    if path.is_file():
        manifest = path
        raise InputError(f"{manifest}: a labelled input is a folder or a manifest CSV")
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    if (path / "manifest.csv").is_file():
        return read_manifest(path / "manifest.csv")
    if any(p.is_dir() and p.name in ("0_real", "1_fake") for p in path.rglob("*")):
        return read_cnndetection(path)
    return read_corvi(path)


def split_by_source(
    df: pd.DataFrame, held_out: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train/validation split that holds out whole sources (generators and real-photo sources).

    Holding out by source, not by image, keeps near-duplicates (crops of one photo, images of one
    subject) from landing on both sides, and measures what matters: images from sources unseen.
    """
    unknown = set(held_out) - set(df["source"]) - set(df["generator"])
    if unknown:
        raise InputError(f"held-out sources not in the data: {sorted(unknown)}")
    mask = df["source"].isin(held_out) | df["generator"].isin(held_out)
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)
