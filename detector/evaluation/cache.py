"""The score cache: logits keyed by (file content sha256, settings key), kept as CSV parts.

The settings key covers the package and torch versions, the weights' sha256, architecture, device,
precision, every patch and preprocessing setting, the seed and the condition, so a cached score is reused only where it would come out the
same. Scores go to new part files written whole with :func:`~detector.checkpoints.atomic_write`;
every row carries a CRC, so a damaged part costs only its damaged rows, which are scored again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import zlib
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Sequence

from ..checkpoints import atomic_write
from .conditions import EvalOptions

__all__ = ["ScoreCache", "settings_key"]


def _package_version() -> str:
    try:
        return importlib_metadata.version("detector")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def settings_key(model: dict, options: EvalOptions, condition: str) -> str:
    """The cache key of a model's scores under ``options`` and ``condition`` (a hex digest).

    ``model`` is :meth:`Detector.describe`: the sha256 of its tensors (not of the file, whose
    calibration a rescore does not depend on: a recalibrated checkpoint reuses its scores),
    architecture, device, precision and torch version count, for a probe its encoder and views, and
    for an exported model its runtime and version (its model file's sha256 is the weights'); a probe's
    size offsets count too (they are taken off its logit, and a recalibration can change them);
    its file path does not; so does this package's version, since a new version may compute a
    score differently.
    """
    payload = {"weights_sha256": model.get("tensors_sha256") or model.get("weights_sha256"),
               "architecture": model.get("architecture"), "device": model.get("device"),
               "precision": model.get("precision"), "torch": model.get("torch"), "detector": _package_version(),
               "scoring": options.scoring_settings(), "condition": condition,
               **{k: model[k] for k in ("backbone_sha256", "feature", "views", "view_mode", "size_offsets", "runtime")
                  if k in model}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:24]


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
