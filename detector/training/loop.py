"""The training loop: streamed class-balanced batches, validation every epoch, atomic checkpoints, resume.

Determinism: batch composition and every augmentation are pure functions of ``(seed, step)``
(see :mod:`detector.training.data`), so the only state a resumed run needs is the model, the
optimizer, the scheduler and the step counter, all saved (without pickle) in
``training_state.safetensors`` after every epoch.

:func:`train` runs named steps: :func:`_start` (output folder, device, ranks), :func:`_prepare_data`,
:func:`_build_model`, :func:`_resume`, then per epoch :func:`_train_epoch`,
:func:`_validate_and_checkpoint` and :func:`_stop_decision`, and :func:`_finish`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import atomic_write, file_sha256, load_backbone, save_checkpoint
from ..hardware import autocast, input_scale, normalise, resolve_device
from ..inference import Detector
from ..metrics import auc, logloss, sigmoid
from ..models import create_model
from ..results import software_versions
from .calibration import fit_calibration
from .data import BatchPlan, TrainingSamples, TrainingTable, simulated_fakes, training_batches, validation_set
from .recipe import Recipe

__all__ = ["TrainConfig", "train"]

STATE_FILE = "training_state.safetensors"


@dataclass
class TrainConfig:
    """Every ``detector train`` option; recorded in each checkpoint it writes."""

    train: list[str]
    val: list[str]
    output_dir: str
    architecture: str = "resnet50nodown"
    init: str = "scratch"
    recipe: Recipe = field(default_factory=Recipe)
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    steps_per_epoch: int = 100
    max_epochs: int = 100
    max_minutes: float | None = None
    lr_patience: int = 3
    early_stop_patience: int = 8
    val_crop: int = 128
    val_crops_per_image: int = 4
    val_quality: int | None = 90
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    target_far: float | None = None
    resume: bool = False
    max_pixels: int = 1 << 28
    simulate_fakes: str | None = None
    paired: bool = True
    workers: int = 2
    decode_cache_mb: int = 1024  # per decoding worker: large photos kept decoded (see TrainingSamples)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def _git_commit() -> str | None:
    """The commit of the code that trains, with ``+dirty`` if it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None




def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _broadcast_floats(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return t.tolist()


@torch.no_grad()
def _validate(model: nn.Module, val_crops, device: torch.device, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Image logits (mean over its crops) of the validation set, scored as ``scan`` scores them."""
    detector = Detector(model, device=device, precision=precision)  # puts the model in eval mode
    labels, logits = [], []
    for label, crops in val_crops:
        values: list[float] = []
        for shape in dict.fromkeys(c.shape for c in crops):
            batch = torch.from_numpy(np.stack([c for c in crops if c.shape == shape])).permute(0, 3, 1, 2)
            values.extend(detector.crop_maps(batch).mean(axis=(1, 2)).tolist())
        labels.append(label)
        logits.append(float(np.mean(values)))
    model.train()
    return np.array(labels), np.array(logits)


def _save_state(path: Path, model, optimizer, scheduler, meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            tensors[f"opt.{pid}.{name}"] = (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu().contiguous()
    meta = dict(meta, param_groups=opt["param_groups"], scheduler=scheduler.state_dict(),
                torch_rng=torch.get_rng_state().tolist())
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def _load_state(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["state"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(df["step"], df["train_loss"], label="train loss")
    a.plot(df["step"], df["val_loss"], label="val loss")
    a.set_xlabel("step")
    a.legend()
    b.plot(df["step"], df["val_auc"], marker="o")
    b.set_xlabel("step")
    b.set_ylabel("validation AUC")
    b.set_ylim(0, 1)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


@dataclass
class _Run:
    """Where and as what this process trains."""

    out: Path
    device: torch.device
    rank: int
    world: int
    log: Callable[[str], None]  # rank 0 speaks for the run; the other ranks' log is silent
    say: Callable[[str], None]  # every rank

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE


@dataclass
class _Data:
    table: TrainingTable
    val_crops: list[tuple[int, list[np.ndarray]]]
    n_simulated: int


@dataclass
class _Model:
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    mean: torch.Tensor
    std: torch.Tensor
    init: dict


@dataclass
class _Progress:
    step: int = 0
    best_auc: float = -1.0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started


def train(config: TrainConfig, *, train_table: pd.DataFrame, val_table: pd.DataFrame, log=print) -> dict:
    """Train (or fine-tune, or resume) a detector; returns the final record (also in the checkpoints)."""
    run = _start(config, log)
    data = _prepare_data(config, run, train_table, val_table)
    m = _build_model(config, run)
    progress = _resume(config, run, m)
    record = _record(config, data, m)
    total = config.max_epochs * config.steps_per_epoch
    plan = BatchPlan(data.table, config.batch_size, config.seed, progress.step, total,
                     rank=run.rank if run.world > 1 else None, paired=config.paired)
    batches = training_batches(plan, TrainingSamples(data.table, config.recipe, config.max_pixels,
                                                   config.decode_cache_mb << 20), config.workers,
                               pin_memory=run.device.type == "cuda")
    progress.started = time.time()
    stop_reason = "max_epochs"
    while progress.step < total:
        losses = _train_epoch(config, run, m, batches, progress)
        _validate_and_checkpoint(config, run, m, data, progress, record, losses)
        reason = _stop_decision(config, run, progress)
        if reason:
            stop_reason = reason
            break
    del batches  # stops the decoding workers
    return _finish(run, m, record, progress, stop_reason)


def _start(config: TrainConfig, log: Callable[[str], None]) -> _Run:
    """Output folder (refusing to overwrite a run unless resuming), seeds, device, DDP rank."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / STATE_FILE).exists() and not config.resume:
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or choose another --output-dir")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(config.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    rank, world = _distributed(device)
    quiet = lambda message: None  # noqa: E731 - rank 0 speaks for the run
    return _Run(out, device, rank, world, log if rank == 0 else quiet, log)


def _prepare_data(config: TrainConfig, run: _Run, train_table: pd.DataFrame, val_table: pd.DataFrame) -> _Data:
    """The training table (headers only), the validation crops, and the split written beside the run."""
    t0 = time.time()
    given, n_simulated = train_table, 0
    if config.simulate_fakes:
        reals = [str(p) for p, label in zip(train_table["path"], train_table["label"]) if label == 0]
        folder = run.out / f"simulated-{file_sha256(config.simulate_fakes)[:12]}"
        fakes = simulated_fakes(config.simulate_fakes, reals, folder, config.recipe.crop_size, rank=run.rank,
                                world=run.world, barrier=_barrier if run.world > 1 else lambda: None, log=run.log)
        n_simulated = len(fakes)
        run.log(f"added {n_simulated} simulated fakes from {config.simulate_fakes} (in {folder})")
        train_table = pd.concat([train_table, fakes], ignore_index=True)
    table = TrainingTable.build(train_table, config.recipe.crop_size, config.max_pixels, run.log)
    val_crops = validation_set(val_table, config.val_crop, config.val_crops_per_image, config.val_quality,
                               config.max_pixels, run.log)
    if not val_crops:
        raise ValueError("no usable validation images")
    pairs = f", {table.n_pairs} of them aligned twins of a training real" if table.n_pairs else ""
    run.log(f"indexed {len(table)} training images{pairs} and loaded {len(val_crops)} validation images "
            f"in {time.time() - t0:.0f} s")
    if run.rank == 0:  # the exact split, so that `detector evaluate` can measure the same images
        for name, t in (("train_manifest.csv", given), ("val_manifest.csv", val_table)):
            rel = t.assign(path=[os.path.relpath(os.path.abspath(p), run.out.resolve()) for p in t["path"]])
            atomic_write(run.out / name, lambda tmp, t=rel: t.to_csv(tmp, index=False))
    return _Data(table, val_crops, n_simulated)


def _build_model(config: TrainConfig, run: _Run) -> _Model:
    """The network (from scratch or ``--init``), on its device, with its optimizer and scheduler."""
    init: dict = {"from": config.init}
    if config.init == "scratch":
        model = create_model(config.architecture)
    else:
        model, info, reinit = load_backbone(config.init, None if config.architecture == "resnet50nodown" else config.architecture)
        init.update(sha256=info.sha256, reinitialised=reinit)
        run.log(f"initialised from {config.init} ({info.architecture}, sha256 {info.sha256[:12]})")
        if reinit:
            run.log("re-initialised the head, which does not fit this detector's single logit: "
                    + "; ".join(f"{k} ({why})" for k, why in reinit.items()))
    mean, std = input_scale(model.config, run.device)
    model = model.to(run.device, memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=config.lr_patience)
    net = model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return _Model(model, net, optimizer, scheduler, mean, std, init)


def _resume(config: TrainConfig, run: _Run, m: _Model) -> _Progress:
    """Where the run stands: the saved state of an earlier run with ``--resume``, else the start."""
    progress = _Progress()
    if config.resume and run.state_path.exists():
        meta = _load_state(run.state_path, m.model, m.optimizer, m.scheduler)
        progress = _Progress(meta["step"], meta["best_auc"], meta["bad_epochs"], meta["history"], meta["elapsed"])
        run.log(f"resumed at step {progress.step} (best validation AUC {progress.best_auc:.4f})")
    return progress


def _record(config: TrainConfig, data: _Data, m: _Model) -> dict:
    """What every checkpoint of the run says about how it was made."""
    labels = data.table.labels
    return {
        "config": config.to_dict(),
        "data": {"train": config.train, "val": config.val, "n_train": len(data.table), "n_val": len(data.val_crops),
                 "n_train_real": int((labels == 0).sum()), "n_train_fake": int((labels == 1).sum()),
                 "n_simulated_fakes": data.n_simulated, "n_twin_pairs": data.table.n_pairs},
        "init": m.init,
        "versions": software_versions(),
        "git_commit": _git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _train_epoch(config: TrainConfig, run: _Run, m: _Model, batches: Iterator, progress: _Progress) -> list[float]:
    """``steps_per_epoch`` optimizer steps; returns their losses."""
    losses = []
    for _ in range(config.steps_per_epoch):
        x, y, failures = next(batches)
        for failure in failures:
            run.log(f"replaced a training image that failed to decode: {failure}")
        x, y = x.to(run.device), y.to(run.device)
        with autocast(run.device, config.precision):
            logits = m.net(normalise(x, m.mean, m.std))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        losses.append(loss.item())
        progress.step += 1
    return losses


def _validate_and_checkpoint(config: TrainConfig, run: _Run, m: _Model, data: _Data, progress: _Progress,
                             record: dict, losses: list[float]) -> None:
    """Validate (rank 0), step the scheduler on every rank, and write checkpoints, state and history."""
    if run.rank == 0:
        labels, val_logits = _validate(m.model, data.val_crops, run.device, config.precision)
        val_auc = auc(labels, val_logits)
        val_loss = logloss(labels, sigmoid(val_logits))
    else:
        val_auc = val_loss = float("nan")
    if run.world > 1:  # every rank steps its scheduler with rank 0's validation figures
        val_auc, val_loss = _broadcast_floats([val_auc, val_loss], run.device)
    m.scheduler.step(val_auc)
    elapsed = progress.elapsed
    row = {"epoch": progress.step // config.steps_per_epoch, "step": progress.step,
           "train_loss": float(np.mean(losses)), "val_auc": val_auc, "val_loss": val_loss,
           "lr": m.optimizer.param_groups[0]["lr"], "minutes": elapsed / 60}
    progress.history.append(row)
    improved = val_auc > progress.best_auc
    if improved:
        progress.best_auc, progress.bad_epochs = val_auc, 0
    else:
        progress.bad_epochs += 1
    if run.rank == 0:
        run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        meta = {**record, "step": progress.step, "best_auc": progress.best_auc, "bad_epochs": progress.bad_epochs,
                "history": progress.history, "elapsed": elapsed, "architecture": m.model.config.architecture}
        if improved:
            _write_checkpoint(run.out / "best.safetensors", m.model, meta, labels, val_logits, config)
        _write_checkpoint(run.out / "last.safetensors", m.model, meta, labels, val_logits, config)
        _save_state(run.state_path, m.model, m.optimizer, m.scheduler, meta)
        _write_history(run.out / "history.csv", progress.history)
        _plot_curves(progress.history, run.out / "curves.png")


def _stop_decision(config: TrainConfig, run: _Run, progress: _Progress) -> str | None:
    """``early_stop`` or ``time_budget`` when the run should stop now; rank 0 decides for all ranks."""
    reason = None
    if progress.bad_epochs >= config.early_stop_patience:
        reason = "early_stop"
    elif config.max_minutes is not None and (time.time() - progress.started) / 60 >= config.max_minutes:
        reason = "time_budget"
    if run.world > 1:  # rank 0's clock decides, so that all ranks stop after the same epoch
        stop = bool(_broadcast_floats([float(reason is not None)], run.device)[0])
        reason = (reason or "time_budget") if stop else None
    return reason


def _finish(run: _Run, m: _Model, record: dict, progress: _Progress, stop_reason: str) -> dict:
    """The final record; under DDP, checks that every rank ends with the same weights."""
    checksum = float(sum(p.detach().double().sum() for p in m.model.parameters()))
    if run.world > 1:
        import torch.distributed as dist

        sums = [None] * run.world
        dist.all_gather_object(sums, checksum)
        record["ranks_agree"] = all(v == sums[0] for v in sums)
        run.say(f"rank {run.rank}: weights checksum {checksum!r}; ranks agree: {record['ranks_agree']}")
        dist.destroy_process_group()
    run.log(f"stopped ({stop_reason}) at step {progress.step}; best validation AUC {progress.best_auc:.4f}")
    return {**record, "step": progress.step, "best_auc": progress.best_auc, "stop_reason": stop_reason,
            "checksum": checksum}


def _write_checkpoint(path: Path, model, meta: dict, labels, logits, config: TrainConfig) -> None:
    calibration = fit_calibration(labels, logits, target_far=config.target_far)
    save_checkpoint(path, model, {**meta, "calibration": calibration.to_dict(), "val_auc": auc(labels, logits)})


def _write_history(path: Path, history: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    atomic_write(path, write)
