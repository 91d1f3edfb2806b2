"""The training loop: class-balanced batches, validation every epoch, atomic checkpoints, resume.

Determinism: batch composition and every augmentation are pure functions of ``(seed, step)``,
so the only state a resumed run needs is the model, the optimizer, the scheduler and the step
counter, all saved (without pickle) in ``training_state.safetensors`` after every epoch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import atomic_write, load_model, save_checkpoint
from ..images import ImageError, decode_image
from ..inference import Detector, autocast, input_scale, normalise, resolve_device
from ..metrics import auc, logloss, sigmoid
from ..models import create_model
from ..results import software_versions
from .calibration import fit_calibration
from .recipe import Recipe, augment, validation_crops

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


@dataclass
class _Item:
    pixels: np.ndarray
    label: int
    was_jpeg: bool
    group: str
    jpeg_quality: int | None = None


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


def _load_items(table: pd.DataFrame, min_size: int, max_pixels: int, log) -> list[_Item]:
    items = []
    for row in table.itertuples():
        try:
            img = decode_image(row.path, max_pixels=max_pixels)
        except ImageError as err:
            log(f"skipped {row.path}: {err}")
            continue
        if min(img.height, img.width) < min_size:
            log(f"skipped {row.path}: {img.width}x{img.height} is smaller than the {min_size} px crop")
            continue
        group = str(row.generator) if row.label == 1 else str(row.source)
        items.append(_Item(img.pixels, int(row.label), img.format in ("JPEG", "MPO"), group, img.jpeg_quality))
    return items


def _sampling_weights(items: list[_Item]) -> np.ndarray:
    """Half the mass on each class; within a class, groups weighted by the square root of their size.

    Square-root weighting keeps the large groups (64 DCGAN faces) from drowning the small ones
    (one BigGAN image) without repeating a single image hundreds of times per epoch.
    """
    labels = np.array([it.label for it in items])
    groups = np.array([f"{it.label}:{it.group}" for it in items])
    counts = pd.Series(groups).value_counts()
    w = np.array([1.0 / math.sqrt(counts[g]) for g in groups])
    for c in (0, 1):
        m = labels == c
        if not m.any():
            raise ValueError(f"the training data has no {'real' if c == 0 else 'generated'} images")
        w[m] = 0.5 * w[m] / w[m].sum()
    return w


def _make_batch(items, weights, config: TrainConfig, step: int, prior_q, rank: int | None = None):
    """The batch of ``step``: a pure function of (seed, step[, rank]), so resuming needs no sampler state."""
    rng = np.random.default_rng([config.seed, step] if rank is None else [config.seed, step, rank])
    idx = rng.choice(len(items), size=config.batch_size, p=weights)
    crops, labels = [], []
    for i in idx:
        it = items[i]
        crops.append(augment(it.pixels, config.recipe, rng, was_jpeg=it.was_jpeg, prior_qualities=prior_q))
        labels.append(it.label)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    return x, torch.tensor(labels, dtype=torch.float32)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


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


def train(config: TrainConfig, *, train_table: pd.DataFrame, val_table: pd.DataFrame, log=print) -> dict:
    """Train (or fine-tune, or resume) a detector; returns the final record (also in the checkpoints)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    if state_path.exists() and not config.resume:
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
    say = log
    if rank != 0:
        log = lambda message: None  # noqa: E731 - rank 0 speaks for the run

    t0 = time.time()
    train_items = _load_items(train_table, config.recipe.crop_size, config.max_pixels, log)
    val_items = _load_items(val_table, 8, config.max_pixels, log)
    if not train_items or not val_items:
        raise ValueError("no usable training or validation images")
    n_simulated = 0
    if config.simulate_fakes:
        from .simulator import load_simulator, simulate

        simulator = load_simulator(config.simulate_fakes)
        fakes = [simulate(simulator, it.pixels) for it in train_items if it.label == 0]
        fakes = [f for f in fakes if min(f.shape[:2]) >= config.recipe.crop_size]
        train_items += [_Item(f, 1, False, "simulated") for f in fakes]
        n_simulated = len(fakes)
        log(f"added {n_simulated} simulated fakes from {config.simulate_fakes}")
    # the JPEG qualities of the training set: never-compressed crops are first compressed like these
    prior_q = np.array([it.jpeg_quality for it in train_items if it.jpeg_quality is not None], dtype=int)
    weights = _sampling_weights(train_items)
    val_crops = [
        (it.label, validation_crops(it.pixels, config.val_crop, config.val_crops_per_image, config.val_quality))
        for it in val_items
    ]
    log(f"loaded {len(train_items)} training and {len(val_items)} validation images in {time.time() - t0:.0f} s")
    if rank == 0:  # the exact split, so that `detector evaluate` can measure the same images
        for name, table in (("train_manifest.csv", train_table), ("val_manifest.csv", val_table)):
            rel = table.assign(path=[os.path.relpath(os.path.abspath(p), out.resolve()) for p in table["path"]])
            atomic_write(out / name, lambda tmp, t=rel: t.to_csv(tmp, index=False))

    if config.init == "scratch":
        model = create_model(config.architecture)
    else:
        model, info = load_model(config.init, None if config.architecture == "resnet50nodown" else config.architecture)
        log(f"initialised from {config.init} ({info.architecture}, sha256 {info.sha256[:12]})")
    arch = model.config.architecture
    mean, std = input_scale(model.config, device)
    model = model.to(device, memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=config.lr_patience)

    history: list[dict] = []
    step, best_auc, bad_epochs, elapsed_before = 0, -1.0, 0, 0.0
    if config.resume and state_path.exists():
        meta = _load_state(state_path, model, optimizer, scheduler)
        step, best_auc, bad_epochs = meta["step"], meta["best_auc"], meta["bad_epochs"]
        history, elapsed_before = meta["history"], meta["elapsed"]
        log(f"resumed at step {step} (best validation AUC {best_auc:.4f})")

    record = {
        "config": config.to_dict(),
        "data": {"train": config.train, "val": config.val, "n_train": len(train_items), "n_val": len(val_items),
                 "n_train_real": sum(it.label == 0 for it in train_items),
                 "n_train_fake": sum(it.label == 1 for it in train_items), "n_simulated_fakes": n_simulated},
        "versions": software_versions(),
        "git_commit": _git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    start = time.time()
    stop_reason = "max_epochs"
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    while step < config.max_epochs * config.steps_per_epoch:
        losses = []
        for _ in range(config.steps_per_epoch):
            x, y = _make_batch(train_items, weights, config, step, prior_q, rank=rank if world > 1 else None)
            x, y = x.to(device), y.to(device)
            with autocast(device, config.precision):
                logits = net(normalise(x, mean, std))
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        stop = False
        if rank == 0:
            labels, val_logits = _validate(model, val_crops, device, config.precision)
            val_auc = auc(labels, val_logits)
            val_loss = logloss(labels, sigmoid(val_logits))
        else:
            val_auc = val_loss = float("nan")
        if world > 1:  # every rank steps its scheduler with rank 0's validation figures
            val_auc, val_loss = _broadcast_floats([val_auc, val_loss], device)
        scheduler.step(val_auc)
        elapsed = elapsed_before + time.time() - start
        row = {"epoch": step // config.steps_per_epoch, "step": step, "train_loss": float(np.mean(losses)),
               "val_auc": val_auc, "val_loss": val_loss, "lr": optimizer.param_groups[0]["lr"], "minutes": elapsed / 60}
        history.append(row)
        improved = val_auc > best_auc
        if improved:
            best_auc, bad_epochs = val_auc, 0
        else:
            bad_epochs += 1
        if rank == 0:
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            meta = {**record, "step": step, "best_auc": best_auc, "bad_epochs": bad_epochs, "history": history,
                    "elapsed": elapsed, "architecture": arch}
            if improved:
                _write_checkpoint(out / "best.safetensors", model, meta, labels, val_logits, config)
            _write_checkpoint(out / "last.safetensors", model, meta, labels, val_logits, config)
            _save_state(state_path, model, optimizer, scheduler, meta)
            _write_history(out / "history.csv", history)
            _plot_curves(history, out / "curves.png")
        if bad_epochs >= config.early_stop_patience:
            stop_reason = "early_stop"
            stop = True
        elif config.max_minutes is not None and (time.time() - start) / 60 >= config.max_minutes:
            stop_reason = "time_budget"
            stop = True
        if world > 1:  # rank 0's clock decides, so that all ranks stop after the same epoch
            stop = bool(_broadcast_floats([float(stop)], device)[0])
        if stop:
            break
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    if world > 1:
        import torch.distributed as dist

        sums = [None] * world
        dist.all_gather_object(sums, checksum)
        record["ranks_agree"] = all(v == sums[0] for v in sums)
        say(f"rank {rank}: weights checksum {checksum!r}; ranks agree: {record['ranks_agree']}")
        dist.destroy_process_group()
    log(f"stopped ({stop_reason}) at step {step}; best validation AUC {best_auc:.4f}")
    return {**record, "step": step, "best_auc": best_auc, "stop_reason": stop_reason, "checksum": checksum}


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
