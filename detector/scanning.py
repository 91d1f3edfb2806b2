"""The scan loop: decode in DataLoader workers, batch crops across images, stream one row per file.

Decoding and cutting crops happen in worker processes while the main process runs the network.
Crops of the same shape from consecutive images share batches; an image's row is written as soon
as all its crops are scored, in input order. A file that cannot be read gets a row with ``error``
set and the scan goes on. ``resume`` skips files already in the output (after repairing a torn
last row), and a lock file keeps two scans from writing one output.

Sharding: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or with ``rank``/``world_size``,
each rank scores every ``world_size``-th file into ``<output>.rank<R>of<W>``; rank 0 merges the
parts into the output once every part is complete (:func:`merge_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from filelock import FileLock, Timeout

from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image, find_images
from .metrics import sigmoid
from .fusion import FUSION_RULES, combine_crops
from .inference import Detector, Ensemble
from .patches import PatchSettings, encoder_views, relevant_settings
from .workers import in_workers
from .results import (
    ImageResult,
    ResultWriter,
    display_path,
    read_run_record,
    repair_and_read,
    write_heatmap,
    write_run_record,
)

__all__ = ["ScanOptions", "ScanSummary", "as_ensemble", "scan", "scan_paths", "uncalibrated_members"]

_THUMBNAIL = 1024


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

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("batch_size must be >= 1 and workers >= 0")


@dataclass
class ScanSummary:
    output: str
    n_files: int = 0
    n_skipped: int = 0
    n_fake: int = 0
    n_real: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    uncalibrated: list[str] = field(default_factory=list)
    # seconds from the scan's start to its first decoded image and to its first row (where a short
    # scan's time goes, see benchmarks/startup.py)
    first_decoded: float | None = None
    first_row: float | None = None

    def line(self) -> str:
        done = self.n_files - self.n_skipped
        text = (f"{done} scanned ({self.n_skipped} already done): {self.n_fake} fake, {self.n_real} real, "
                f"{self.n_errors} errors in {self.seconds:.1f} s -> {self.output}")
        if self.uncalibrated:
            text += (f"\nNOTE: probabilities are uncalibrated for these settings ({', '.join(self.uncalibrated)} "
                     f"calibrated with others; see the .json record): rank by them, do not read them as chances")
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


class _Decoder:
    """Decodes an image and cuts its crops and the probes' views (called in a worker with its index).

    ``settings`` is None when no convolutional model scores crops; ``view_specs`` holds one
    ``(size, n, mode)`` per probe (see :func:`detector.patches.encoder_views`).
    """

    def __init__(self, paths: Sequence[Path], settings: PatchSettings | None, max_pixels: int, align: int,
                 thumbnails: bool, view_specs: Sequence[tuple[int, int, str]] = ()):
        self.paths, self.settings, self.max_pixels = list(paths), settings, max_pixels
        self.align, self.thumbnails, self.view_specs = align, thumbnails, list(view_specs)

    def __call__(self, index: int) -> dict:
        t0 = time.perf_counter()
        item = {"index": index, "path": self.paths[index], "error": "", "crops": [], "plan": [], "views": [],
                "width": None, "height": None, "format": "", "thumbnail": None}
        try:
            img = decode_image(self.paths[index], max_pixels=self.max_pixels)
            item.update(width=img.width, height=img.height, format=img.format)
            plan = self.settings.plan(img.height, img.width, align=self.align) if self.settings else []
            item["plan"] = plan
            # As tensors: a worker hands them over in shared memory, not through the main process's
            # heap, where megapixel crops would fragment the memory that the network keeps reusing.
            # np.array copies: the decoded pixels are read-only, and torch wants memory it may write.
            item["crops"] = [torch.from_numpy(np.array(c.cut(img.pixels), order="C")) for c in plan]
            item["views"] = [torch.from_numpy(encoder_views(img.pixels, size=size, n=n, mode=mode))
                             for size, n, mode in self.view_specs]
            if self.thumbnails:
                step = max(1, int(np.ceil(max(img.height, img.width) / _THUMBNAIL)))
                item["thumbnail"] = np.ascontiguousarray(img.pixels[::step, ::step])
        except ImageError as err:
            item["error"] = str(err)
        except Exception as err:  # noqa: BLE001 - any failure on one file must not stop the scan
            item["error"] = f"unexpected {type(err).__name__}: {err}"
        item["seconds"] = time.perf_counter() - t0
        return item


@dataclass
class _Pending:
    item: dict
    maps: list
    remaining: int
    seconds: float


def _shard_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def shard_path(output: Path, rank: int, world_size: int) -> Path:
    return output if world_size == 1 else output.with_name(f"{output.name}.rank{rank}of{world_size}")


def as_ensemble(models: "Detector | Ensemble | object") -> Ensemble:
    """Any detector, probe or ensemble as an :class:`Ensemble` (one member: its own verdicts)."""
    if isinstance(models, Ensemble):
        return models
    name = Path(models.info.path).stem if getattr(models, "info", None) else "model"
    return Ensemble([models], [name])


def _describe(ensemble: Ensemble) -> dict:
    """The run record's ``detector`` entry: the model itself, or the ensemble with its members.

    An ensemble's ``logit`` column is the fused calibrated logit, so its threshold is 0 and its
    temperature 1; ``weights_sha256`` then digests the members' hashes and the rule.
    """
    if len(ensemble.members) == 1:
        return ensemble.members[0].describe()
    described = ensemble.describe()
    digest = hashlib.sha256(json.dumps([[m.get("weights_sha256") for m in described["members"].values()],
                                        ensemble.rule]).encode()).hexdigest()
    return {**described, "weights": "ensemble", "weights_sha256": digest, "architecture": "ensemble",
            "precision": "+".join(m.precision for m in ensemble.members), "threshold": 0.0, "temperature": 1.0,
            "device": str(ensemble.device)}


def scan_paths(
    paths: Sequence[Path],
    detector: "Detector | Ensemble",
    output: str | os.PathLike,
    options: ScanOptions = ScanOptions(),
    *,
    record: dict | None = None,
) -> ScanSummary:
    """Score ``paths`` into the CSV ``output`` (one rank's share when sharded)."""
    ensemble = as_ensemble(detector)
    conv = ensemble.conv
    output = Path(output)
    start = time.perf_counter()
    summary = ScanSummary(output=str(output), n_files=len(paths))
    lock = FileLock(f"{output}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another scan is writing {output} (lock file {output}.lock); wait for it or choose another --output") from None
    try:
        patches = asdict(conv.resolve_settings(options.patches)) if conv else None
        summary.uncalibrated = uncalibrated_members(ensemble, patches, options.fusion)
        settings_record = {
            **(record or {}),
            "detector": _describe(ensemble),
            "patches": patches,
            "fusion": options.fusion,
            "max_pixels": options.max_pixels,
            "probabilities_calibrated": not summary.uncalibrated,
            "uncalibrated_models": summary.uncalibrated,
        }
        done: Counter[str] = Counter()
        if output.exists() and output.stat().st_size > 0:
            if not options.resume:
                raise FileExistsError(f"{output} exists; pass --resume to continue it or choose another --output")
            previous = read_run_record(output)
            if previous and _scoring_settings(previous) != _scoring_settings(settings_record):
                raise ValueError(f"{output} was made with other weights or settings; resume needs the same ones")
            done = Counter(row["path"] for row in repair_and_read(output))
        # Counted, not a set: two names can display alike (b"a\xff" and the text "a\\xff"). Rows are
        # written in input order, so the first ones with a displayed path are the ones done.
        todo = []
        for p in paths:
            if done[display_path(p)] > 0:
                done[display_path(p)] -= 1
            else:
                todo.append(p)
        summary.n_skipped = len(paths) - len(todo)
        write_run_record(output, {**settings_record, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        heat_dir = Path(options.heatmaps) if options.heatmaps else None
        if heat_dir:
            heat_dir.mkdir(parents=True, exist_ok=True)
        names = ensemble.names if len(ensemble.members) > 1 else []
        with ResultWriter(output, names) as writer:
            _run(todo, ensemble, options, writer, summary, heat_dir, start)
    finally:
        # Unlink while still holding the lock: a scan that opened the old file then finds it
        # unlinked when it gets the lock and starts over on a new one, so two never both hold it.
        try:
            os.unlink(f"{output}.lock")
        except OSError:
            pass
        lock.release()
    summary.seconds = time.perf_counter() - start
    return summary


def _scoring_settings(record: dict) -> tuple:
    """What must not change between a scan and its resume: weights, architecture, precision, and the
    cuts and patch fusion where they apply (patch options mean nothing in full mode, tile options
    nothing in patches mode)."""
    d = record.get("detector", {})
    patches = relevant_settings(record.get("patches") or {})
    fusion = record.get("fusion") if patches["mode"] == "patches" else None
    return (d.get("weights_sha256"), d.get("architecture"), d.get("precision"), json.dumps(patches, sort_keys=True),
            fusion)


def _run(todo, ensemble: Ensemble, options: ScanOptions, writer: ResultWriter, summary: ScanSummary, heat_dir,
         start: float) -> None:
    from tqdm import tqdm

    detector = ensemble.conv
    settings = detector.resolve_settings(options.patches) if detector else None
    probes = [m for m in ensemble.members if m is not detector]
    view_specs = [(p.backbone.config.input_size, p.config.views, p.config.view_mode) for p in probes]
    decoder = _Decoder(todo, settings, options.max_pixels, align=8,
                       thumbnails=heat_dir is not None and detector is not None, view_specs=view_specs)
    loader = in_workers(decoder, range(len(todo)), options.workers, prefetch=4,
                        pin_memory=ensemble.device.type == "cuda")
    pending: dict[int, _Pending] = {}
    queues: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    next_index = 0
    max_pending = max(8, 4 * options.batch_size)
    bar = tqdm(total=len(todo), disable=not options.progress, file=sys.stderr, unit="img", dynamic_ncols=True)

    def run_batch(shape: tuple[int, int], entries: list[tuple[int, int, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        batch = torch.stack([e[2] for e in entries]).permute(0, 3, 1, 2)
        maps = detector.crop_maps(batch)
        share = (time.perf_counter() - t0) / len(entries)
        for (index, k, _), m in zip(entries, maps):
            p = pending[index]
            p.maps[k] = m
            p.remaining -= 1
            p.seconds += share

    def flush(all_shapes: bool, stale: frozenset = frozenset()) -> None:
        """Run every full batch; also the partial ones of ``stale`` shapes (or of all shapes)."""
        for shape in list(queues):
            q = queues[shape]
            size = detector.batch_limit(shape, options.batch_size)
            while len(q) >= size or ((all_shapes or shape in stale) and q):
                chunk, queues[shape] = q[:size], q[size:]
                q = queues[shape]
                run_batch(shape, chunk)
            if not q:
                del queues[shape]

    def emit() -> None:
        nonlocal next_index
        while next_index in pending and pending[next_index].remaining == 0:
            p = pending.pop(next_index)
            writer.write(_finish(p, ensemble, options, summary, heat_dir))
            if summary.first_row is None:
                summary.first_row = time.perf_counter() - start
            bar.update(1)
            next_index += 1

    for item in loader:
        if summary.first_decoded is None:
            summary.first_decoded = time.perf_counter() - start
        index = item["index"]
        pending[index] = _Pending(item, [None] * len(item["crops"]), len(item["crops"]), item["seconds"])
        shapes = frozenset(tuple(crop.shape[:2]) for crop in item["crops"])
        for k, crop in enumerate(item["crops"]):
            queues.setdefault(tuple(crop.shape[:2]), []).append((index, k, crop))
        item["crops"] = None  # the queue holds them now
        # A shape that this image does not continue will not fill its batch soon: score it now,
        # so that rows (written in input order) and the progress bar advance as images finish
        # instead of waiting for the end of the scan behind a lone small image.
        if detector is not None:
            flush(all_shapes=len(pending) >= max_pending, stale=frozenset(queues) - shapes if shapes else frozenset())
        emit()
    if detector is not None:
        flush(all_shapes=True)
    emit()
    bar.close()


def _finish(p: _Pending, ensemble: Ensemble, options: ScanOptions, summary: ScanSummary, heat_dir) -> ImageResult:
    item = p.item
    detector = ensemble.conv
    n_scored = len(item["plan"]) if detector else sum(len(v) for v in item["views"])
    result = ImageResult(path=display_path(item["path"]), width=item["width"], height=item["height"],
                         format=item["format"], n_patches=n_scored, seconds=p.seconds, error=item["error"])
    if item["error"]:
        summary.n_errors += 1
        return result
    try:
        t0 = time.perf_counter()
        views = iter(item["views"])
        logits = []
        for member in ensemble.members:
            if member is detector:
                logit, canvas = combine_crops(item["plan"], p.maps, mode=options.patches.mode, rule=options.fusion,
                                              stride=detector.stride, height=item["height"], width=item["width"])
                if heat_dir is not None and item["thumbnail"] is not None:
                    write_heatmap(heat_dir, item["path"], item["thumbnail"], canvas)
            else:
                logit = member.score_views(next(views).numpy())
            logits.append(logit)
        result.seconds += time.perf_counter() - t0
        if len(logits) == 1:
            member = ensemble.members[0]
            result.logit, result.probability, result.label = logits[0], member.probability(logits[0]), member.label(logits[0])
        else:
            margin = ensemble.fused_margin(logits)
            result.logit, result.probability = margin, float(sigmoid(margin))
            result.label = "fake" if result.probability >= 0.5 else "real"
            result.models = {n: (z, m.probability(z)) for n, m, z in zip(ensemble.names, ensemble.members, logits)}
    except Exception as err:  # noqa: BLE001 - one image's failure must not stop the scan
        result.error = f"unexpected {type(err).__name__}: {err}"
        result.logit = result.probability = None
        result.label = ""
        result.models = {}
        summary.n_errors += 1
        return result
    if result.label == "fake":
        summary.n_fake += 1
    else:
        summary.n_real += 1
    return result


def scan(
    inputs: Sequence[str | os.PathLike],
    detector: "Detector | Ensemble",
    output: str | os.PathLike = "results.csv",
    options: ScanOptions = ScanOptions(),
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> ScanSummary:
    """Find the images in ``inputs`` and score them into ``output`` (see the module docstring)."""
    paths = find_images(inputs)
    rank, world_size = _shard_env(rank, world_size)
    output = Path(output)
    mine = paths[rank::world_size]
    record = {"inputs": [display_path(i) for i in inputs], "n_inputs": len(paths), "rank": rank, "world_size": world_size}
    summary = scan_paths(mine, detector, shard_path(output, rank, world_size), options, record=record)
    if world_size > 1:
        _barrier()
        if rank == 0:
            merge_shards(output, world_size)
    return summary


def _barrier() -> None:
    """Wait for every rank (torch.distributed, joined from torchrun's environment if needed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def merge_shards(output: str | os.PathLike, world_size: int) -> int:
    """Concatenate the ranks' parts into ``output`` (atomically); returns the number of rows.

    The parts stay on disk, so each rank can ``--resume`` its own part and the merge be redone.
    """
    from .checkpoints import atomic_write
    from .results import result_columns

    output = Path(output)
    model_names: list[str] = []
    rows: list[dict[str, str]] = []
    records = []
    for r in range(world_size):
        part = shard_path(output, r, world_size)
        if not part.exists():
            raise FileNotFoundError(f"rank {r}'s part {part} is missing; rerun that rank with --resume")
        part_rows = repair_and_read(part)
        rows.extend(part_rows)
        records.append(read_run_record(part) or {})
        if part_rows:  # per-model columns come in pairs after the common ones
            model_names = [c[len("logit_"):] for c in part_rows[0] if c.startswith("logit_")]

    def write(tmp: str) -> None:
        os.unlink(tmp)  # ResultWriter writes the header only into a new file
        with ResultWriter(tmp, model_names) as writer:
            columns = result_columns(model_names)
            for row in rows:
                writer.write_row([row[c] for c in columns])

    atomic_write(output, write)
    merged = {**records[0], "merged_from": [str(shard_path(output, r, world_size)) for r in range(world_size)]}
    write_run_record(output, merged)
    return len(rows)
