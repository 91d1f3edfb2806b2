"""Labelled image collections in the layouts people already have, as one tidy table.

Every reader returns a :class:`pandas.DataFrame` with columns ``path`` (str), ``label`` (0 real,
1 generated), ``generator`` (``real`` for real photos), ``family`` and ``source`` (the real-photo
source or the generator, used to hold out whole sources when splitting).

Layouts:

* **manifest CSV**: ``path,label[,generator][,family][,source][,pair]``; label ``0/1`` or
  ``real/fake``; relative paths are relative to the CSV's folder. ``pair`` (optional, as ``path``)
  names the real photo an aligned twin was made from (``detector make-fakes``); training cuts a
  twin and its real at the same place. Only manifests carry it: the table then has a ``pair``
  column after :data:`COLUMNS` (``None`` where empty).
* **CNNDetection** (Wang et al. 2020): ``root/<generator>/[<class>/]0_real|1_fake/``.
* **GenImage** (Zhu et al. 2023): ``<generator>/[<subset>/]train|val/ai|nature/``; ``nature``
  holds the real photos (ImageNet), ``ai`` the generated ones.
* **Corvi et al. 2023**: one folder per source under ``root``; a folder named ``real``, ``reals``,
  ``0_real`` or ``real_*`` (any case) holds real photos, every other folder is a generator. Any
  other name containing "real" (``unreal_engine``, ``RealVisXL``) is refused: it could be either,
  and a wrong guess would flip a whole generator's labels; such data needs a manifest.
* **a ``detector scan`` output plus labels**: the scan's CSV gives the scores, any of the layouts
  above gives the labels (:func:`read_scan_output`), so a scan can be evaluated without scoring
  again.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .images import IMAGE_EXTENSIONS, InputError, find_images
from .provenance import evidence_tags, findings_from_json
from .results import RESULT_COLUMNS

__all__ = ["COLUMNS", "read_labelled", "read_manifest", "read_cnndetection", "read_genimage", "read_corvi",
           "read_scan_output", "is_scan_output", "split_by_source", "folder_label", "class_counts"]

COLUMNS = ["path", "label", "generator", "family", "source"]
# the first columns of every scan output, before and since the provenance columns
_SCAN_HEADER = RESULT_COLUMNS[: RESULT_COLUMNS.index("error") + 1]
# Folder names that mark real photos in the Corvi layout: real, reals, 0_real, real_<source>.
_REAL_FOLDER = re.compile(r"(0_)?reals?|real_.+", re.IGNORECASE)
_LABEL_WORDS = {"0": 0, "1": 1, "real": 0, "fake": 1, "generated": 1, "synthetic": 1, "0_real": 0, "1_fake": 1}


def _parse_label(value: object, where: str) -> int:
    key = str(value).strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in _LABEL_WORDS:
        raise InputError(f"{where}: label must be 0/1 or real/fake, got {value!r}")
    return _LABEL_WORDS[key]


def source_name(value: object) -> object:
    """A source as a group name: a value naming one file (``real/collection/photo.png``, as some
    manifests write it) stands for its folder (``real/collection``), so that a source never makes one
    group per image."""
    if not isinstance(value, str) or not value.lower().endswith(tuple(IMAGE_EXTENSIONS)):
        return value
    parent = os.path.dirname(value.replace("\\", "/"))
    return parent or value


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["generator"] = [g if lab == 1 else "real" for g, lab in zip(df["generator"], df["label"])]
    if "family" not in df or df["family"].isna().all():
        df["family"] = df["generator"]
    if "source" not in df or df["source"].isna().all():
        df["source"] = df["generator"]
    df["family"] = df["family"].fillna(df["generator"])
    df["source"] = [source_name(v) for v in df["source"].fillna(df["generator"])]
    return df[COLUMNS + (["pair"] if "pair" in df else [])].reset_index(drop=True)


def read_manifest(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A CSV listing ``path,label`` and optionally ``generator``, ``family``, ``source``, ``pair``."""
    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise InputError(f"{csv_path}: a manifest needs columns path and label (missing {sorted(missing)})")
    base = csv_path.parent
    df["path"] = [p if os.path.isabs(p) else str(base / p) for p in df["path"]]
    if "pair" in df:
        df["pair"] = [None if not p else p if os.path.isabs(p) else str(base / p) for p in df["pair"]]
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


def _class_folder_table(root: Path, classes: dict[str, int], generator_of, real_source: str) -> pd.DataFrame:
    """The images of every folder under ``root`` named after a class (``classes``: name -> label).

    ``generator_of(class_dir)`` names the generator; the reals beside it form the source
    ``<generator>/<real_source>``.
    """
    rows = []
    for class_dir in sorted(_folders(root)):
        label = classes.get(class_dir.name)
        if label is None:
            continue
        generator = generator_of(class_dir)
        for path in find_images([class_dir]):
            rows.append({"path": str(path), "label": label, "generator": generator, "family": None,
                         "source": generator if label else f"{generator}/{real_source}"})
    if not rows:
        raise InputError(f"{root}: no {' or '.join(classes)} folder with images found")
    return _finish(pd.DataFrame(rows))


def read_cnndetection(root: str | os.PathLike) -> pd.DataFrame:
    """``root/<generator>/[<class>/]0_real|1_fake/``: the generator is the first folder level."""
    root = Path(root)

    def generator_of(class_dir: Path) -> str:
        rel = class_dir.relative_to(root).parts
        return rel[0] if len(rel) > 1 else root.name

    return _class_folder_table(root, {"0_real": 0, "1_fake": 1}, generator_of, "real")


_GENIMAGE_CLASSES = {"nature": 0, "ai": 1}
_SPLIT_NAMES = {"train", "val", "test"}


def _genimage_generator(class_dir: Path, root: Path) -> str:
    """The generator of a GenImage class folder: the outermost folder that is neither a split nor a subset.

    GenImage nests ``<generator>/imagenet_<...>/train|val/ai|nature``; a root below the
    generator folder (``.../ADM/imagenet_ai_0508_adm/train``) takes the name from its parents.
    """
    def is_generator(name: str) -> bool:
        return bool(name) and name.lower() not in _SPLIT_NAMES and not name.lower().startswith("imagenet_")

    names = [p for p in class_dir.relative_to(root).parts[:-1] if is_generator(p)]
    if names:
        return names[0]
    return next((p.name for p in class_dir.resolve().parents if is_generator(p.name)), "fake")


def read_genimage(root: str | os.PathLike) -> pd.DataFrame:
    """``<generator>/[<subset>/]train|val/ai|nature/``: GenImage's published layout.

    Every split found under ``root`` is read: point at a ``train`` or ``val`` folder (or pass
    several) to keep them apart. The reals of each generator are its own source
    (``<generator>/nature``), so holding out a generator holds out its photos too.
    """
    root = Path(root)
    return _class_folder_table(root, _GENIMAGE_CLASSES, lambda d: _genimage_generator(d, root), "nature")


def _folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included), without stat-ing the files."""
    found = []
    for parent, dirs, _ in os.walk(root):
        found.append(Path(parent))
        dirs.sort()
    return found


def folder_label(folder: str | os.PathLike) -> int:
    """0 for a folder whose name marks real photos (``real``, ``reals``, ``0_real``, ``real_*``), 1 otherwise.

    Raises :class:`InputError` for any other name containing "real", which could name either class.
    """
    name = Path(folder).name
    if _REAL_FOLDER.fullmatch(name):
        return 0
    if "real" in name.lower():
        raise InputError(f"{folder}: the folder name {name!r} contains 'real' but is not one of the names that mark "
                         f"real photos (real, reals, 0_real, real_<source>); rename it, or list the images in a "
                         f"manifest CSV (path,label[,generator]) to say which class it holds")
    return 1


def read_corvi(root: str | os.PathLike) -> pd.DataFrame:
    """One folder per source: real photos in folders named as :func:`folder_label` says, the rest generators."""
    root = Path(root)
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = folder_label(sub)
        for path in find_images([sub]):
            rows.append({"path": str(path), "label": label, "generator": sub.name, "family": None, "source": sub.name})
    if not rows:
        raise InputError(f"{root}: no images in its sub-folders")
    return _finish(pd.DataFrame(rows))


def read_labelled(source: str | os.PathLike) -> pd.DataFrame:
    """Read any supported layout, recognised from what is on disk."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        if is_scan_output(path):
            raise InputError(f"{path}: is a `detector scan` output, which holds no labels; "
                             f"read it with read_scan_output (`detector evaluate ... --labels`)")
        return read_manifest(path)
    if path.is_file():
        manifest = path
        raise InputError(f"{manifest}: a labelled input is a folder or a manifest CSV")
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    if (path / "manifest.csv").is_file():
        return read_manifest(path / "manifest.csv")
    names = {p.name for p in _folders(path)}
    if names & {"0_real", "1_fake"}:
        return read_cnndetection(path)
    if names & set(_GENIMAGE_CLASSES):
        return read_genimage(path)
    return read_corvi(path)


def is_scan_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CSV written by ``detector scan`` (recognised by its header)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), None) or []
        return header[: len(_SCAN_HEADER)] == _SCAN_HEADER


def _path_key(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


def read_scan_output(results_csv: str | os.PathLike, labels: pd.DataFrame) -> pd.DataFrame:
    """A scan's scores joined to labels from any layout (a table from :func:`read_labelled`).

    A scan row is matched to a label by its path, taken relative to the working folder and, failing
    that, to the scan CSV's folder. Rows without a label are dropped with a warning; labelled
    images the scan lacks are left out. Returns :data:`COLUMNS` plus the scan's ``logit``,
    ``format``, ``width``, ``height``, ``error`` (``logit`` NaN where the scan failed) and ``provenance``
    (its evidence as :func:`detector.provenance.evidence_tags`).
    """
    results_csv = Path(results_csv)
    if not is_scan_output(results_csv):
        raise InputError(f"{results_csv}: not a `detector scan` output (its header differs)")
    scan = pd.read_csv(results_csv, dtype=str, keep_default_na=False)
    index = {_path_key(p): i for i, p in enumerate(labels["path"])}
    matched, unmatched = [], 0
    for row in scan.itertuples(index=False):
        for candidate in (row.path, results_csv.parent / row.path):
            i = index.get(_path_key(candidate))
            if i is not None:
                matched.append((i, row))
                break
        else:
            unmatched += 1
    if not matched:
        raise InputError(f"{results_csv}: none of its {len(scan)} paths is in the labels "
                         f"(paths are matched relative to the working folder or to the CSV's folder)")
    if unmatched:
        warnings.warn(f"{results_csv}: {unmatched} of {len(scan)} scanned files have no label and are left out",
                      stacklevel=2)
    df = labels.iloc[[i for i, _ in matched]][COLUMNS].reset_index(drop=True)
    df["logit"] = [float(r.logit) if r.logit and not r.error else np.nan for _, r in matched]
    df["format"] = [r.format for _, r in matched]
    df["width"] = [int(r.width) if r.width else np.nan for _, r in matched]
    df["height"] = [int(r.height) if r.height else np.nan for _, r in matched]
    df["error"] = [r.error for _, r in matched]
    # the scan's provenance evidence, for the bias guards (scans before it have no such column)
    df["provenance"] = [evidence_tags(findings_from_json(getattr(r, "provenance_detail", ""))) for _, r in matched]
    return df


def class_counts(df: pd.DataFrame) -> str:
    """What a labelled table holds, one line: reals, fakes, then the images per generator."""
    real = int((df["label"] == 0).sum())
    per_generator = df.loc[df["label"] == 1, "generator"].value_counts().sort_index()
    parts = ", ".join(f"{g} {n}" for g, n in per_generator.items())
    return f"{real} real, {len(df) - real} fake" + (f" ({parts})" if parts else "")


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
