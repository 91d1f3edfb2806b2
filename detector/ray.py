"""Scans on a Ray cluster: Ray Data streams the inputs to a pool of actors that each load the
detector once, decode the files with the project's own decoder and score them on the one scoring
path (:func:`detector.scoring.score_stream`), so a row is the same as a local scan's.

Two entry points:

* :func:`scan_dataset` for people who hold a Ray Dataset already: a Dataset with a ``path`` column
  (files every node can read) or a ``bytes`` column (read by Ray, e.g. ``ray.data.read_binary_files``
  from object storage) becomes, lazily, one with the scan's columns::

      import ray, detector.ray
      listing = ray.data.read_parquet("listing.parquet")          # a "path" column
      detector.ray.scan_dataset(listing).write_parquet("verdicts/")

* :class:`RayEngine`, the engine of ``detector scan --engine ray`` (see
  :class:`detector.scanning.Engine`): the command keeps its output, resume, lock and run record, and
  the engine hands it the rows in input order, each exactly once.

Faults: Ray Data restarts an actor whose worker process (or node) died and retries its calls, and
the engine hands on each input's row once, whatever Ray retried. Images are never resized or colour-converted by a Ray reader: Ray moves paths or
bytes, the project decodes them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .hub import LoadRecipe
from .resources import require
from .results import ImageResult, column_kind, display_path, result_columns
from .scanning import ScanOptions, ScanSummary, prepare_file, provenance_reader, result_of
from .scoring import score_stream

if TYPE_CHECKING:
    import pyarrow
    import ray.data

    from .ensemble import Ensemble

__all__ = ["RayEngine", "RayResources", "ScanActor", "plan_resources", "scan_dataset"]

# Threads per actor by default: enough for the networks' matrix products to scale, few enough
# that a node runs several actors (each decodes its own files, in one thread).
_DEFAULT_CPUS_PER_ACTOR = 4


def _ray():
    return require("ray", "ray", "scanning on Ray")


@dataclass(frozen=True)
class RayResources:
    """How many scan actors run and what each holds: CPUs (its networks' threads), GPUs, and the
    images it takes per call."""

    actors: int
    cpus_per_actor: int
    gpus_per_actor: float = 0.0
    images_per_call: int = 8


def plan_resources(actors: int | None = None, cpus_per_actor: int | None = None, gpus_per_actor: float | None = None,
                   images_per_call: int = 8) -> RayResources:
    """Defaults from the connected cluster's resources: one actor per GPU if it has GPUs; else
    actors of up to 4 CPUs (a quarter of the smallest node's, at least 1) filling every CPU."""
    ray = _ray()
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes] or [int(total.get("CPU", 1))]
    gpus = float(total.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if cpus_per_actor is None:
        cpus_per_actor = max(1, min(_DEFAULT_CPUS_PER_ACTOR, min(c for c in node_cpus if c > 0) // 4 if any(node_cpus) else 1))
    if actors is None:
        by_cpu = sum(c // cpus_per_actor for c in node_cpus)
        actors = max(1, int(gpus // gpus_per_actor) if gpus_per_actor > 0 else by_cpu)
    if actors < 1 or cpus_per_actor < 1 or gpus_per_actor < 0 or images_per_call < 1:
        raise ValueError("Ray actors, CPUs per actor and images per call must be >= 1, GPUs per actor >= 0")
    return RayResources(actors, cpus_per_actor, gpus_per_actor, images_per_call)


class ScanActor:
    """One actor of the pool: loads the detector once, then turns batches of inputs (a ``path``
    column, and a ``bytes`` column when Ray read the files) into the scan's columns. Other input
    columns pass through unchanged."""

    def __init__(self, recipe: LoadRecipe, options: ScanOptions, heat_dir: str | None = None):
        from .hardware import tune_process

        self.ensemble = recipe.load()
        for member in self.ensemble.members:
            tune_process(member.device)
        self.options = options
        self.heat_dir = Path(heat_dir) if heat_dir else None
        self.prepare = self.ensemble.transforms(options.patches, thumbnail=self.heat_dir is not None)
        self.provenance = provenance_reader(options)
        self.names = self.ensemble.names if len(self.ensemble.members) > 1 else []

    def __call__(self, batch: "pyarrow.Table") -> "pyarrow.Table":
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        blobs = batch.column("bytes").to_pylist() if "bytes" in batch.column_names else [None] * len(paths)
        items = [prepare_file(p, self.prepare, self.options.max_pixels, data=b, provenance=self.provenance)
                 for p, b in zip(paths, blobs)]
        decide = self.options.provenance == "decide"
        records = [result_of(s, self.ensemble, self.heat_dir, decide=decide).record(self.names)
                   for s in score_stream(self.ensemble, items, batch_size=self.options.batch_size,
                                         mode=self.options.patches.mode, fusion=self.options.fusion)]
        types = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}
        kept = batch.drop_columns([c for c in ("path", "bytes") if c in batch.column_names])
        for name in result_columns(self.names):
            kept = kept.append_column(name, pa.array([r[name] for r in records], type=types[column_kind(name)]))
        return kept


def scan_dataset(ds: "ray.data.Dataset", detector: "str | os.PathLike | LoadRecipe | None" = None,
                 options: ScanOptions = ScanOptions(), *, resources: RayResources | None = None,
                 heatmaps: "str | os.PathLike | None" = None) -> "ray.data.Dataset":
    """The scan of ``ds`` (a ``path`` or ``bytes`` column; ``path`` names the row in the output
    either way), lazily: a Dataset with the scan's columns (see :func:`detector.results.result_columns`)
    after the input's other columns. ``detector`` is a weights path, a :class:`~detector.hub.LoadRecipe`,
    or None for the bundled default; every node must be able to read it. ``resources`` default to
    :func:`plan_resources` of the connected cluster."""
    ray = _ray()
    columns = ds.columns()
    if "path" not in columns:
        raise ValueError(f"the dataset needs a 'path' column (and, to score bytes read by Ray, a 'bytes' one); "
                         f"it has {columns}")
    recipe = detector if isinstance(detector, LoadRecipe) else LoadRecipe(() if detector is None else (os.fspath(detector),))
    resources = resources or plan_resources()
    recipe = replace(recipe, threads=resources.cpus_per_actor)
    return ds.map_batches(
        ScanActor,
        fn_constructor_kwargs={"recipe": recipe, "options": options,
                               "heat_dir": os.fspath(heatmaps) if heatmaps else None},
        batch_size=resources.images_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )  # Ray Data restarts a dead actor and retries its calls (max_restarts = max_task_retries = -1)


class RayEngine:
    """Decode and score on a Ray cluster (``detector scan --engine ray``).

    ``address`` joins that cluster; None joins the local one started by ``ray start`` if there is
    one, else starts a Ray instance inside this process for the scan's duration. ``recipe`` must
    load the same detector the caller passed to :func:`detector.scanning.scan` (the run record
    describes that one).
    """

    def __init__(self, recipe: LoadRecipe, address: str | None = None, *, actors: int | None = None,
                 cpus_per_actor: int | None = None, gpus_per_actor: float | None = None, images_per_call: int = 8):
        self.recipe, self.address = recipe, address
        self.asked = dict(actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                          images_per_call=images_per_call)
        self._record: dict = {"name": "ray", "address": address}

    def record(self) -> dict:
        return self._record

    def results(self, todo: list[Path], ensemble: "Ensemble", options: ScanOptions, heat_dir: Path | None,
                summary: ScanSummary) -> Iterator[ImageResult]:
        if not todo:
            return
        ray = _ray()
        started_here = _connect(self.address)
        try:
            resources = plan_resources(**self.asked)
            self._record = {"name": "ray", "address": self.address or "local", "ray": ray.__version__,
                            "nodes": _nodes(), "actors": resources.actors, "cpus_per_actor": resources.cpus_per_actor,
                            "gpus_per_actor": resources.gpus_per_actor, "images_per_call": resources.images_per_call}
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # rows in input order, as a local scan writes them
            context.enable_progress_bars = False  # the scan shows its own
            context.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notices would interleave with ours
            listing = ray.data.from_items([{"index": i, "path": display_path(p)} for i, p in enumerate(todo)],
                                          override_num_blocks=max(1, -(-len(todo) // resources.images_per_call)))
            names = ensemble.names if len(ensemble.members) > 1 else []
            scanned = scan_dataset(listing, self.recipe, options, resources=resources, heatmaps=heat_dir)
            written = bytearray(len(todo))
            for batch in scanned.iter_batches(batch_format="pyarrow", batch_size=None):
                for record in batch.to_pylist():
                    index = record["index"]
                    if written[index]:  # a retried call delivered twice: the row is out already
                        continue
                    written[index] = 1
                    if summary.first_decoded is None:
                        summary.first_decoded = time.perf_counter() - summary.started
                    yield ImageResult.from_record(record, names)
            missing = len(todo) - sum(written)
            if missing:
                raise RuntimeError(f"Ray returned no row for {missing} of {len(todo)} files; the rows written are "
                                   f"kept: run the same command with --resume to score the rest")
        finally:
            if started_here:
                ray.shutdown()


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or the local one ``ray start`` began), or start a local
    instance when there is none and no address was given; True if this process started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    quiet = {"logging_level": "ERROR", "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
        return False
    try:
        ray.init(address="auto", **quiet)
        return False
    except ConnectionError:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray.init(num_cpus=cores, include_dashboard=False, **quiet)
        return True


def _nodes() -> list[dict]:
    """The live nodes of the connected cluster: address, CPUs, GPUs."""
    ray = _ray()
    return [{"address": n.get("NodeManagerAddress"), "cpus": n["Resources"].get("CPU", 0),
             "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n.get("Alive")]
