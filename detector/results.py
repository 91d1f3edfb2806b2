"""Per-image results on disk: the streamed CSV or JSON lines, their resume and repair, the run record,
heatmaps.

The CSV is written one row at a time and flushed, so a killed scan loses at most the row being
written; :func:`repair_and_read` cuts such a torn last row off before a resume. Paths are
written as text: names that are not valid UTF-8 are escaped with backslashes, so the file is
always valid UTF-8 that pandas and the csv module parse; commas, quotes and newlines are quoted.
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
from dataclasses import dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write
from .metrics import sigmoid

__all__ = ["OUTPUT_FORMATS", "RESULT_COLUMNS", "ImageResult", "JsonlWriter", "column_kind", "format_value", "typed_value", "result_columns", "ResultWriter",
           "display_path", "open_writer", "output_format", "read_rows", "repair_and_read", "write_heatmap", "write_run_record",
           "read_run_record", "heatmap_name", "software_versions"]

# what -o may end with; parquet is written from a streamed CSV at the end (see detector.scanning)
OUTPUT_FORMATS = ("csv", "jsonl", "parquet")


@dataclass
class ImageResult:
    """One row of a scan's output.

    With several models, ``logit`` and ``probability`` are the fused ones and ``models`` holds
    each model's own ``(logit, probability)``, written as ``logit_<name>`` and
    ``probability_<name>`` columns after the common ones.

    ``provenance`` is the text of the file's strongest provenance finding (empty when none),
    ``provenance_detail`` all of them as JSON (see :mod:`detector.provenance`), and ``decided_by``
    what set the label: ``pixels``, or ``provenance`` when ``--provenance decide`` let a
    proof-of-generation finding call the file fake (probability 1.0, the pixels' logit kept).
    """

    path: str
    logit: float | None = None
    probability: float | None = None
    label: str = ""
    width: int | None = None
    height: int | None = None
    format: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    provenance: str = ""
    provenance_detail: str = ""
    decided_by: str = ""
    models: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def row(self, model_names: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The row's fields as the CSV writes them (in :func:`result_columns` order)."""
        base = [format_value(getattr(self, name)) for name in RESULT_COLUMNS]
        for name in model_names:
            logit, probability = self.models.get(name, (None, None))
            base += [format_value(logit), format_value(probability)]
        return base


    def record(self, model_names: list[str] | tuple[str, ...] = ()) -> dict[str, "float | int | str | None"]:
        """The row as typed values by column (what JSON lines, Parquet and Ray datasets hold): the
        CSV's text read back, so every output carries the same values."""
        return {name: typed_value(name, text) for name, text in zip(result_columns(model_names), self.row(model_names))}

    @classmethod
    def from_record(cls, record: dict, model_names: list[str] | tuple[str, ...] = ()) -> "ImageResult":
        """The inverse of :meth:`record`."""
        common = {name: record.get(name) for name in RESULT_COLUMNS}
        common.update({name: value or "" for name, value in common.items() if column_kind(name) == "str"})
        models = {name: (record.get(f"logit_{name}"), record.get(f"probability_{name}")) for name in model_names}
        return cls(**common, models=models)


def format_value(v: object) -> str:
    """A field as text: empty for None and non-finite numbers, 6 significant digits for floats."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return str(v)


def column_kind(name: str) -> str:
    """``float``, ``int`` or ``str``: the type of a result column's values (JSON lines, Parquet, Ray)."""
    if name in ("width", "height", "n_patches"):
        return "int"
    if name in ("logit", "probability", "seconds") or name.startswith(("logit_", "probability_")):
        return "float"
    return "str"


def typed_value(name: str, text: str) -> "float | int | str | None":
    """A CSV field as the typed value of its column (None for an empty number)."""
    kind = column_kind(name)
    if kind == "str":
        return text
    if not text:
        return None
    return int(float(text)) if kind == "int" else float(text)


RESULT_COLUMNS = [f.name for f in fields(ImageResult) if f.name != "models"]
_BEFORE_PROVENANCE = RESULT_COLUMNS[: RESULT_COLUMNS.index("provenance")]  # the header of outputs before #23


def result_columns(model_names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The CSV header: :data:`RESULT_COLUMNS`, then ``logit_<name>, probability_<name>`` per model."""
    return RESULT_COLUMNS + [f"{kind}_{name}" for name in model_names for kind in ("logit", "probability")]


def display_path(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text: undecodable bytes become ``\\xNN`` escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def _record_ends(text: str) -> list[int]:
    """Offsets just after each complete CSV record (a newline outside quotes)."""
    ends, in_quotes = [], False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == "\n" and not in_quotes:
            ends.append(i + 1)
    return ends


def output_format(path: str | os.PathLike) -> str:
    """The format an output path asks for by its suffix (``.csv``, ``.jsonl``, ``.parquet``); any other
    suffix is a ``ValueError``: writing CSV into ``out.json`` would mislead the next program."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: choose an output ending in .csv, .jsonl or .parquet (or - for standard output)")
    return suffix


def _repair_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good != len(data):  # a torn last line from a kill
        with open(path, "r+b") as fh:
            fh.truncate(good)
    rows = []
    for line in data[:good].decode("utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "path" not in row:
            raise ValueError(f"{path} is not a detector results file (a line is not a result); choose another --output")
        rows.append(row)
    return rows


def repair_and_read(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of an existing output (CSV, or JSON lines for ``.jsonl``), after cutting off a torn last
    row (from a kill) in place.

    Raises ``ValueError`` if the file is not a results file (another header), so that a wrong
    ``--output`` never gets overwritten or appended to.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    if path.suffix.lower() == ".jsonl":
        return _repair_jsonl(path)
    data = path.read_bytes()
    text = data.decode("utf-8", errors="strict")
    ends = _record_ends(text)
    good = ends[-1] if ends else 0
    if len(text[:good].encode("utf-8")) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(text[:good].encode("utf-8")))
        text = text[:good]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = rows[0]
    if header[: len(RESULT_COLUMNS)] != RESULT_COLUMNS and header[: len(_BEFORE_PROVENANCE)] == _BEFORE_PROVENANCE:
        raise ValueError(f"{path} was written by an older version of detector (no provenance columns): it cannot be "
                         f"continued; choose another --output")
    if header[: len(RESULT_COLUMNS)] != RESULT_COLUMNS:
        raise ValueError(f"{path} is not a detector results file (header {rows[0][:4]}...); choose another --output")
    return [dict(zip(header, r)) for r in rows[1:] if len(r) == len(header)]


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a finished output of any format (see :data:`OUTPUT_FORMATS`), as dicts."""
    if Path(path).suffix.lower() == ".parquet":
        import pandas as pd

        table = pd.read_parquet(path)
        return table.astype(object).where(table.notna(), "").to_dict("records")
    return repair_and_read(path)


class ResultWriter:
    """Append rows to the output CSV (a path, or an open text stream such as standard output),
    writing the header for a new file; flush every row."""

    def __init__(self, path: "str | os.PathLike | io.TextIOBase", model_names: list[str] | tuple[str, ...] = ()) -> None:
        self.model_names = tuple(model_names)
        if isinstance(path, io.TextIOBase):
            self.path, self._fh, self._owned, new = None, path, False, True
        else:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh, self._owned = open(self.path, "a", newline="", encoding="utf-8"), True
        self._start(new)

    def _start(self, new: bool) -> None:
        self._csv = csv.writer(self._fh, lineterminator="\n")
        # The csv module quotes a field holding the line terminator but not a bare "\r", which
        # pandas and the csv module read as a line break: rows holding one quote every field.
        self._quoted = csv.writer(self._fh, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if new:
            self._csv.writerow(result_columns(self.model_names))
            self._fh.flush()

    def write(self, result: ImageResult) -> None:
        self.write_row(result.row(self.model_names))

    def write_row(self, row: list[str]) -> None:
        """Write one row of text fields (in :func:`result_columns` order) and flush it."""
        (self._quoted if any("\r" in field for field in row) else self._csv).writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.flush()
        if self._owned:
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlWriter(ResultWriter):
    """Append rows as JSON lines: one object per image with the CSV's fields (numbers as numbers,
    empty fields as null), flushed one by one."""

    def _start(self, new: bool) -> None:
        self._columns = result_columns(self.model_names)

    def write_row(self, row: list[str]) -> None:
        record = {name: typed_value(name, value) for name, value in zip(self._columns, row)}
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()


def open_writer(target: "str | os.PathLike | io.TextIOBase", model_names: list[str] | tuple[str, ...] = (),
                fmt: str = "csv") -> ResultWriter:
    """The writer of ``fmt`` (``csv`` or ``jsonl``) appending to ``target``."""
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"rows are streamed as csv or jsonl, not {fmt!r}")
    return (JsonlWriter if fmt == "jsonl" else ResultWriter)(target, model_names)


_RECORDED_DISTRIBUTIONS = ("detector", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "pillow",
                           "pillow-heif", "safetensors", "timm", "matplotlib")


def software_versions() -> dict:
    """Python, platform and the installed versions of the packages a result depends on (for run records)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in _RECORDED_DISTRIBUTIONS:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_record_path(output: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(output)}.json")


def write_run_record(output: str | os.PathLike, record: dict) -> None:
    """The sidecar ``<output>.json``: weights sha256, settings, versions, date."""
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    atomic_write(run_record_path(output), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_run_record(output: str | os.PathLike) -> dict | None:
    path = run_record_path(output)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def heatmap_name(path: str | os.PathLike) -> str:
    """A file name for an input's heatmap that cannot escape the heatmap folder.

    The digest is of the path's bytes: two inputs whose paths display alike (``b"a\\xff"`` and the
    text ``a\\xff``, see :func:`display_path`) get two heatmaps, not one overwriting the other.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._")[:60] or "image"
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:10]
    return f"{stem}_{digest}.png"


def write_heatmap(
    folder: str | os.PathLike, path: str | os.PathLike, thumbnail: np.ndarray, logit_map: np.ndarray
) -> Path:
    """Overlay a calibrated logit map on a thumbnail of the image: the colour runs from blue
    (probability 0, real) to red (1, generated); cells never scored (NaN, e.g. between the patches of
    a large photo) keep the photo in grey under dark diagonal hatching, so they cannot be read as a
    probability of 0.5."""
    from PIL import Image

    h, w = thumbnail.shape[:2]
    scored = np.isfinite(logit_map)
    prob = sigmoid(np.where(scored, logit_map, 0.0))
    heat = np.asarray(Image.fromarray((prob * 255).astype(np.uint8)).resize((w, h), Image.NEAREST), np.float32)
    seen = np.asarray(Image.fromarray(scored.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    p = heat[:, :, None] / 255.0
    colour = np.concatenate([p, np.zeros_like(p), 1.0 - p], axis=2) * 255.0
    grey = thumbnail.astype(np.float32).mean(axis=2, keepdims=True)
    blend = np.where(seen[:, :, None], 0.5 * grey + 0.5 * colour, 0.35 * grey + 0.65 * 235.0)
    rows, cols = np.indices((h, w))
    hatch = ~seen & (((rows + cols) // 3) % 4 == 0)
    blend[hatch] = 70.0
    target = Path(folder) / heatmap_name(path)
    atomic_write(target, lambda tmp: Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(tmp, format="PNG"))
    return target
