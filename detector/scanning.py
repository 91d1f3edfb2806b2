"""The scan loop: decode in DataLoader workers, batch crops across images, stream one row per file.

Decoding and cutting crops happen in worker processes while the main process runs the network.
Crops of the same shape from consecutive images share batches; an image's row is written as soon
as all its crops are scored, in input order. A file that cannot be read gets a row with ``error``
set and the scan goes on. ``resume`` skips files already in the output (after repairing a torn
last row), and a lock file keeps two scans from writing one output.

Provenance (``ScanOptions.provenance``): each file's bytes are read once, decoded, and searched for
provenance evidence (:mod:`detector.provenance`); ``report`` writes it beside the pixels' verdict,
``decide`` also lets a proof-of-generation finding set the label (``decided_by`` says which did),
``off`` reads none.

Engines: :class:`LocalEngine` (this machine) or :class:`detector.ray.RayEngine` (a Ray cluster)
decode and score; this module keeps the output, its lock and resume, and the run record, so both
write the same rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from filelock import FileLock, Timeout

from .calibration import TOO_SMALL
from .ensemble import Ensemble
from .fusion import FUSION_RULES
from .images import DEFAULT_MAX_PIXELS, ImageError, InputError, decode_bytes, decode_image, find_images, read_image_bytes
from .patches import PatchSettings, relevant_settings
from .provenance import STRENGTHS as STRENGTH_ORDER
from .provenance import Finding, deciding, findings_from_json, findings_to_json, missing_packages, read_provenance, strongest
from .progress import Progress, plural
from .scoring import Preparation, Scored, score_stream
from .workers import in_workers
from .checkpoints import atomic_write
from .resources import require
from .results import (
    ImageResult,
    ResultWriter,
    column_kind,
    display_path,
    open_writer,
    output_format,
    run_record_path,
    read_run_record,
    repair_and_read,
    write_heatmap,
    write_run_record,
)

__all__ = ["Engine", "LocalEngine", "PROVENANCE_MODES", "ScanOptions", "ScanSummary", "prepare_file", "provenance_reader",
           "result_of", "scan", "scan_paths", "uncalibrated_members"]

PROVENANCE_MODES = ("off", "report", "decide")
# Files larger than this are decoded from disk as before and their provenance is not read: holding a
# file's bytes beside its pixels doubles its memory, and no camera or generator writes such files.
PROVENANCE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class ScanOptions:
    """Every scan option except inputs, weights and output."""

    patches: PatchSettings = field(default_factory=PatchSettings)
    fusion: str = "mean"
    batch_size: int = 16
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    heatmaps: str | None = None
    resume: bool = False
    progress: bool = True
    format: str = "csv"  # of rows streamed to standard output (output "-"); files go by their suffix
    provenance: str = "report"  # off | report | decide (see the module docstring)
    trust_anchors: str | None = None  # a PEM file of the C2PA trust anchors a signer must chain to

    def __post_init__(self) -> None:
        if self.provenance not in PROVENANCE_MODES:
            raise ValueError(f"provenance must be one of {PROVENANCE_MODES}, got {self.provenance!r}")
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if self.format not in ("csv", "jsonl"):
            raise ValueError(f"format must be csv or jsonl, got {self.format!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("batch_size must be >= 1 and workers >= 0")


@dataclass
class ScanSummary:
    output: str
    n_files: int = 0
    n_skipped: int = 0
    n_fake: int = 0
    n_real: int = 0
    n_too_small: int = 0  # images under the detector's minimum size: no verdict
    n_errors: int = 0
    seconds: float = 0.0
    uncalibrated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, printed after the summary
    # seconds from the scan's start to its first decoded image and to its first row (where a short
    # scan's time goes, see benchmarks/startup.py)
    first_decoded: float | None = None
    first_row: float | None = None
    started: float = field(default_factory=time.perf_counter, repr=False)  # perf_counter at the scan's start
    # files with each (kind, strength) of provenance evidence, and the labels provenance decided
    evidence: Counter = field(default_factory=Counter)
    n_decided: int = 0

    def count_provenance(self, result: ImageResult) -> None:
        """Add one written row's provenance findings to the counts (each kind and strength once per file)."""
        found = {(f.kind, f.strength) for f in findings_from_json(result.provenance_detail) if f.is_evidence}
        self.evidence.update(found)
        self.n_decided += result.decided_by == "provenance"

    def count(self, label: str, error: str) -> None:
        """Add one written row to the counts."""
        if error:
            self.n_errors += 1
        elif label == "fake":
            self.n_fake += 1
        elif label == TOO_SMALL:
            self.n_too_small += 1
        else:
            self.n_real += 1

    def line(self) -> str:
        done = self.n_files - self.n_skipped
        small = f"{self.n_too_small} too small to judge, " if self.n_too_small else ""
        text = (f"{done} scanned ({self.n_skipped} already done): {self.n_fake} fake, {self.n_real} real, "
                f"{small}{plural(self.n_errors, 'error')} in {self.seconds:.1f} s -> {self.output}")
        if self.evidence:
            counts = ", ".join(f"{n} {kind} ({strength})" for (kind, strength), n in sorted(
                self.evidence.items(), key=lambda item: (STRENGTH_ORDER.index(item[0][1]), -item[1], item[0][0])))
            text += f"\nprovenance evidence: {counts}" + (f"; {self.n_decided} labelled fake by it" if self.n_decided else "")
        if self.uncalibrated:
            text += (f"\nNOTE: probabilities are uncalibrated for these settings ({', '.join(self.uncalibrated)} "
                     f"calibrated with others; see the .json record): rank by them, do not read them as chances")
        for note in self.notes:
            text += f"\nNOTE: {note}"
        return text


def uncalibrated_members(ensemble: Ensemble, patches: dict | None, fusion: str) -> list[str]:
    """Names of the members whose stored calibration was fitted with other cutting settings (only
    the settings that apply in the mode count, see :func:`detector.patches.relevant_settings`)."""

    def key(cuts: dict | None, rule: str | None) -> tuple:
        relevant = relevant_settings(cuts or {})
        return json.dumps(relevant, sort_keys=True), rule if relevant["mode"] == "patches" else None

    names = []
    for name, member in zip(ensemble.names, ensemble.members):
        fitted = (member.info.metadata.get("calibration") or {}).get("settings") if member.info else None
        if member is ensemble.conv and (not fitted or key(fitted.get("patches"), fitted.get("fusion")) != key(patches, fusion)):
            names.append(name)
    return names


ProvenanceReader = Callable[..., "list[Finding]"]  # read_provenance with its settings: (data, pixels=...) -> findings


def provenance_reader(options: ScanOptions) -> ProvenanceReader | None:
    """The provenance reader of a scan's options (None when ``provenance`` is ``off``), picklable for the
    decode workers. Raises ``ValueError`` for a trust-anchor file that holds no PEM certificate."""
    if options.provenance == "off":
        return None
    return functools.partial(read_provenance, trust_anchors=_trust_anchors(options.trust_anchors))


def _trust_anchors(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="ascii", errors="replace")
    except OSError as err:
        raise ValueError(f"C2PA trust anchors {path}: {err.strerror or err}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"C2PA trust anchors {path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    return text


def prepare_file(path: "str | os.PathLike", prepare: Preparation, max_pixels: int, data: bytes | None = None,
                 provenance: ProvenanceReader | None = None) -> dict:
    """One input decoded and cut for the model set: the item :func:`~detector.scoring.score_stream`
    takes, with its ``path``, ``format``, ``error``, ``seconds`` and ``provenance`` (the findings of
    ``provenance``, see :func:`provenance_reader`; read from the same bytes as the pixels, even when
    they cannot be decoded). Never raises: a file that cannot be read or decoded gets its ``error``
    set, a reader that fails a ``reader-error`` finding. ``data``, the file's bytes when a caller
    already holds them (an upload, object storage read by Ray), is decoded instead of reading ``path``."""
    t0 = time.perf_counter()
    item = {"path": path, "error": "", "width": None, "height": None, "format": "", "provenance": []}
    pixels = None
    try:
        if data is None and provenance is not None:
            data = read_image_bytes(path, max_bytes=PROVENANCE_MAX_BYTES)  # None: too large, decoded from disk
        img = decode_image(path, max_pixels=max_pixels) if data is None else decode_bytes(
            data, os.fspath(path), max_pixels=max_pixels)
        pixels = img.pixels
        item.update(format=img.format)
        item.update(prepare(img.pixels))
    except ImageError as err:
        item["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - any failure on one file must not stop the scan
        item["error"] = f"unexpected {type(err).__name__}: {err}"
    if provenance is not None and data is not None:
        try:
            item["provenance"] = provenance(data, pixels=pixels)
        except Exception as err:  # noqa: BLE001 - read_provenance does not raise; a reader passed in might
            item["provenance"] = [Finding("reader-error", f"provenance not read: {type(err).__name__}", "none")]
    item["seconds"] = time.perf_counter() - t0
    return item


class _Decoder:
    """Decodes an image and prepares it for the model set (called in a worker with its index)."""

    def __init__(self, paths: Sequence[Path], prepare: Preparation, max_pixels: int,
                 provenance: ProvenanceReader | None = None):
        self.paths, self.prepare, self.max_pixels, self.provenance = list(paths), prepare, max_pixels, provenance

    def __call__(self, index: int) -> dict:
        return {"index": index, **prepare_file(self.paths[index], self.prepare, self.max_pixels,
                                               provenance=self.provenance)}


def _as_ensemble(models: "Ensemble | object") -> Ensemble:
    """Any detector or probe as a set of one (its own verdicts); an ensemble as it is."""
    if isinstance(models, Ensemble):
        return models
    name = Path(models.info.path).stem if getattr(models, "info", None) else "model"
    return Ensemble([models], [name])


def _settings_record(ensemble: Ensemble, options: ScanOptions, summary: ScanSummary, record: dict | None) -> dict:
    """The run record: the model set, every member with its say and calibration, the cuts, and which
    model (if any) draws the heatmaps."""
    conv = ensemble.conv
    patches = asdict(conv.resolve_settings(options.patches)) if conv else None
    summary.uncalibrated = uncalibrated_members(ensemble, patches, options.fusion)
    drawn = next((n for n, m, w in zip(ensemble.names, ensemble.members, ensemble.weights) if m is conv and w > 0), None)
    if options.heatmaps and drawn is None:
        summary.notes.append(
            "no heatmaps: no model of this set draws a logit map (the CLIP probe scores whole views); add a "
            "convolutional member with --weights to get them" if conv is None else
            "no heatmaps: the convolutional member has no say in this set's verdict, and a map of a model that "
            "does not decide would mislead")
    anchors = _trust_anchors(options.trust_anchors)  # a bad file fails here, before any scoring
    missing = missing_packages() if options.provenance != "off" else []
    if missing:
        summary.notes.append(f"provenance: {' and '.join(missing)} not installed, so C2PA manifests and watermarks "
                             f"were not read (pip install 'detector[provenance]'); PNG chunks, XMP and EXIF were")
    provenance = {"mode": options.provenance, "not_installed": missing,
                  "trust_anchors_sha256": hashlib.sha256(anchors.encode()).hexdigest() if anchors else None}
    return {**(record or {}), "detector": ensemble.describe(), "patches": patches, "fusion": options.fusion,
            "provenance": provenance,
            "max_pixels": options.max_pixels, "probabilities_calibrated": not summary.uncalibrated,
            "uncalibrated_models": summary.uncalibrated,
            "heatmaps": {"folder": str(Path(options.heatmaps).resolve()), "model": drawn}
            if options.heatmaps and drawn else None}


def scan_paths(
    paths: Sequence[Path],
    detector: "Ensemble",
    output: "str | os.PathLike",
    options: ScanOptions = ScanOptions(),
    *,
    record: dict | None = None,
    fmt: str | None = None,
    engine: Engine | None = None,
) -> ScanSummary:
    """Score ``paths`` into ``output``: a ``.csv``, ``.jsonl`` or ``.parquet`` file (``fmt``, by
    default from the suffix: see :func:`detector.results.output_format`), or ``-`` for standard
    output (rows in ``options.format``, no run record, no resume). ``engine`` runs the decoding and
    scoring (default: :class:`LocalEngine`)."""
    ensemble = _as_ensemble(detector)
    engine = engine or LocalEngine()
    summary = ScanSummary(output=str(output), n_files=len(paths))
    start = summary.started
    settings_record = _settings_record(ensemble, options, summary, record)
    names = ensemble.names if len(ensemble.members) > 1 else []
    if str(output) == "-":
        if options.resume:
            raise ValueError("resume needs an output file, not standard output")
        summary.output = "standard output"
        writer = open_writer(sys.stdout, names, options.format)
        _run(list(paths), ensemble, options, writer, summary, _heat_dir(settings_record), engine, start)
        writer.close()
        summary.seconds = time.perf_counter() - start
        return summary
    output = Path(output)
    fmt = fmt or output_format(output)
    # parquet is written whole at the end, from a CSV streamed (and resumable) beside it
    work = output.with_name(output.name + ".partial.csv") if fmt == "parquet" else output
    if fmt == "parquet":
        require("pyarrow", "parquet", "writing .parquet results")
        if output.exists() and not work.exists():
            raise FileExistsError(f"{output} exists and is complete; choose another output")
    lock = FileLock(f"{work}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another scan is writing {output} (lock file {work}.lock); wait for it or choose another "
                           f"output") from None
    try:
        done: Counter[str] = Counter()
        if work.exists() and work.stat().st_size > 0:
            if not options.resume:
                raise FileExistsError(f"{output} exists: pass resume=True to continue it, or choose another output")
            previous = read_run_record(output)
            if previous and _scoring_settings(previous) != _scoring_settings(settings_record):
                raise ValueError(f"{output} was made with other weights, model set or settings (see "
                                 f"{run_record_path(output).name}); resume needs the same ones, or choose another output")
            done = Counter(str(row["path"]) for row in repair_and_read(work))
        # Counted, not a set: two names can display alike (b"a\xff" and the text "a\\xff"). Rows are
        # written in input order, so the first ones with a displayed path are the ones done.
        todo = []
        for p in paths:
            if done[display_path(p)] > 0:
                done[display_path(p)] -= 1
            else:
                todo.append(p)
        summary.n_skipped = len(paths) - len(todo)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_run_record(output, {**settings_record, "started": started})
        with open_writer(work, names, "jsonl" if fmt == "jsonl" else "csv") as writer:
            _run(todo, ensemble, options, writer, summary, _heat_dir(settings_record), engine, start)
        # the engine's resources are known once it ran (a Ray cluster's nodes and actors)
        write_run_record(output, {**settings_record, "started": started, "engine": engine.record()})
        if fmt == "parquet":
            _to_parquet(work, output)
    finally:
        # Unlink while still holding the lock: a scan that opened the old file then finds it
        # unlinked when it gets the lock and starts over on a new one, so two never both hold it.
        try:
            os.unlink(f"{work}.lock")
        except OSError:
            pass
        lock.release()
    summary.seconds = time.perf_counter() - start
    return summary


def _heat_dir(settings_record: dict) -> Path | None:
    """The heatmap folder, created, when the run record names a model that draws the maps."""
    if not settings_record.get("heatmaps"):
        return None
    folder = Path(settings_record["heatmaps"]["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _to_parquet(csv_path: Path, output: Path) -> None:
    """The finished CSV as Parquet (same columns, numbers typed), written atomically; the CSV goes."""
    import pandas as pd

    table = pd.read_csv(csv_path, keep_default_na=False, dtype=str)
    for column in table.columns:
        if column_kind(column) != "str":
            table[column] = pd.to_numeric(table[column].replace("", None))
    atomic_write(output, lambda tmp: table.to_parquet(tmp, index=False))
    csv_path.unlink()


def _scoring_settings(record: dict) -> tuple:
    """What must not change between a scan and its resume: the model set (its members' weights,
    say and calibration, digested in ``weights_sha256``), architecture, precision, threshold, and the
    cuts and patch fusion where they apply (patch options mean nothing in full mode, tile options
    nothing in patches mode)."""
    d = record.get("detector", {})
    patches = relevant_settings(record.get("patches") or {})
    fusion = record.get("fusion") if patches["mode"] == "patches" else None
    provenance = record.get("provenance") or {}
    return (d.get("weights_sha256"), d.get("architecture"), d.get("precision"), d.get("threshold"),
            d.get("temperature"), json.dumps(patches, sort_keys=True), fusion, provenance.get("mode"),
            provenance.get("trust_anchors_sha256"))


class Engine(Protocol):
    """What runs a scan's decoding and scoring: :class:`LocalEngine` on this machine, or
    :class:`detector.ray.RayEngine` on a Ray cluster. :func:`scan_paths` keeps the rest (the output,
    its lock and resume, the run record, the counts), so every engine writes the same rows."""

    def record(self) -> dict:
        """What the run record says of the engine (its name and resources)."""
        ...

    def results(self, todo: list[Path], ensemble: Ensemble, options: ScanOptions, heat_dir: Path | None,
                summary: ScanSummary) -> Iterator[ImageResult]:
        """One row per path of ``todo``, in its order."""
        ...


class LocalEngine:
    """Decode in this machine's worker processes, score in this process (the default engine)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def record(self) -> dict:
        return {"name": "local", "workers": self.workers}

    def results(self, todo: list[Path], ensemble: Ensemble, options: ScanOptions, heat_dir: Path | None,
                summary: ScanSummary) -> Iterator[ImageResult]:
        self.workers = options.workers
        prepare = ensemble.transforms(options.patches, thumbnail=heat_dir is not None)
        loader = in_workers(_Decoder(todo, prepare, options.max_pixels, provenance_reader(options)), range(len(todo)),
                            options.workers, prefetch=4, pin_memory=ensemble.device.type == "cuda")

        def timed(items):
            for item in items:
                if summary.first_decoded is None:
                    summary.first_decoded = time.perf_counter() - summary.started
                yield item

        for scored in score_stream(ensemble, timed(loader), batch_size=options.batch_size, mode=options.patches.mode,
                                   fusion=options.fusion):
            yield result_of(scored, ensemble, heat_dir, decide=options.provenance == "decide")


def _run(todo: list[Path], ensemble: Ensemble, options: ScanOptions, writer: ResultWriter, summary: ScanSummary,
         heat_dir: Path | None, engine: Engine, start: float) -> None:
    """Write the engine's rows as they come, counting them."""
    bar = Progress(len(todo), enabled=options.progress)
    for result in engine.results(todo, ensemble, options, heat_dir, summary):
        writer.write(result)
        summary.count(result.label, result.error)
        summary.count_provenance(result)
        if summary.first_row is None:
            summary.first_row = time.perf_counter() - start
        bar.update(1)
    bar.close()


def result_of(scored: Scored, ensemble: Ensemble, heat_dir: Path | None = None, *, decide: bool = False) -> ImageResult:
    """The output row of one scored input (drawing its heatmap into ``heat_dir`` when given). With
    ``decide``, a proof-of-generation finding labels the file fake with probability 1.0 (the logit stays
    the pixels'), so that label and probability agree; ``decided_by`` says ``provenance``."""
    item, verdict = scored.item, scored.verdict
    findings = item.get("provenance") or []
    shown = strongest(findings)
    result = ImageResult(path=display_path(item["path"]), width=item["width"], height=item["height"],
                         format=item["format"], seconds=scored.seconds, error=scored.error,
                         provenance=shown.text if shown else "", provenance_detail=findings_to_json(findings))
    if verdict is None:
        return result
    result.n_patches = verdict.n_patches
    result.logit, result.probability, result.label = verdict.logit, verdict.probability, verdict.label
    result.decided_by = "pixels"
    if decide and deciding(findings) is not None:
        result.label, result.probability, result.decided_by = "fake", 1.0, "provenance"
    if len(ensemble.members) > 1:
        result.models = {n: (v.logit, v.probability) for n, v in verdict.members.items()}
    if heat_dir is not None and verdict.logit_map is not None and item.get("thumbnail") is not None:
        conv = ensemble.conv  # the map in its model's calibrated terms: red where it calls generated
        write_heatmap(heat_dir, item["path"], item["thumbnail"], (verdict.logit_map - conv.threshold) / conv.temperature)
    return result


def scan(
    inputs: Sequence[str | os.PathLike],
    detector: "Ensemble",
    output: str | os.PathLike = "results.csv",
    options: ScanOptions = ScanOptions(),
    *,
    engine: Engine | None = None,
) -> ScanSummary:
    """Find the images in ``inputs`` and score them into ``output`` (see :func:`scan_paths` for the
    formats and engines; the module docstring for the rest). No image found is an
    :class:`~detector.images.InputError`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("scans no longer shard under torchrun (each rank would score every file): run one "
                           "scan per machine, or scan on a cluster with --engine ray (see README)")
    paths = find_images(inputs)
    if not paths:
        raise InputError(f"no image found in {', '.join(display_path(i) for i in inputs)}")
    record = {"inputs": [display_path(i) for i in inputs], "n_inputs": len(paths)}
    return scan_paths(paths, detector, output, options, record=record, engine=engine)
