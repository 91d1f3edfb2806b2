"""Training the CLIP linear probe: cached encoder features, a logistic regression, calibration.

Minutes on a CPU: the encoder runs once per image and view, its features are cached on disk keyed
by the file's content and every setting that changes them, and the logistic regression
(scikit-learn) fits in seconds. That makes the probe the way to adapt the tool to a new generator
from a hundred examples.

Each view of a training image is one sample (views of one image share its weight); an image's
logit is the mean of its views' logits, as in :class:`detector.probe.ProbeDetector`. The inverse
regularisation strength ``C`` is chosen on the validation set's AUC from a grid unless given, and
the calibration (Platt scaling as temperature and threshold) is fitted on the validation logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..backbones import Backbone, create_backbone
from ..checkpoints import atomic_write, file_sha256, save_checkpoint
from ..images import ImageError, decode_image
from ..metrics import auc
from ..patches import encoder_views
from ..probe import PROBE_PREFIX, LinearProbe, MLPProbe, ProbeConfig, normalise
from .calibration import fit_calibration

__all__ = ["C_GRID", "FeatureCache", "MLPRecipe", "ProbeTrainConfig", "embed_images", "fit_mlp_probe", "fit_probe",
           "group_weights", "probe_config", "train_probe"]

READ_AHEAD = 8  # images decoded ahead of the encoder, at most
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class ProbeTrainConfig:
    """Every option of ``detector train --arch clip-probe:BACKBONE``; recorded in the checkpoint."""

    train: list[str]
    val: list[str]
    output_dir: str
    backbone: str = "clip:onnx:weights/clip_vitb16.int8.onnx"
    feature: str = "embeds"
    views: int = 4
    view_mode: str = "crop"
    align_jpeg: int | None = None
    c: float | None = None
    head: str = "linear"  # "linear" (C chosen on validation) or "mlp" (MLPRecipe)
    mlp_seeds: int = 1  # MLP head: heads from this many seeds, merged into one (MLPRecipe.seeds)
    target_far: float | None = None
    threads: int | None = None
    max_pixels: int = 1 << 28
    cache_dir: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureCache:
    """Encoder features on disk, one ``.npy`` per image, under a folder named by the settings key."""

    def __init__(self, folder: str | os.PathLike, settings: dict) -> None:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(folder) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():
            atomic_write(settings_file, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2, sort_keys=True)))

    def _path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        if not path.exists():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a torn file from a kill: compute it again
            return None

    def put(self, sha256: str, features: np.ndarray) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # np.save on a name would add ".npy" to the temporary one
                np.save(fh, features.astype(np.float32))

        atomic_write(self._path(sha256), write)


def _views_of(path: str, *, size: int, n: int, mode: str, align_jpeg: int | None, center_crop: int | None,
              max_pixels: int) -> np.ndarray:
    from ..evaluation import preprocess

    pixels = preprocess(decode_image(path, max_pixels=max_pixels).pixels, center_crop=center_crop, align_jpeg=align_jpeg)
    return encoder_views(pixels, size=size, n=n, mode=mode)


def embed_images(
    paths: Sequence[str],
    backbone: Backbone,
    cache: FeatureCache | None,
    *,
    views: int,
    view_mode: str,
    align_jpeg: int | None = None,
    center_crop: int | None = None,
    max_pixels: int = 1 << 28,
    log: Callable[[str], None] = print,
) -> list[np.ndarray | None]:
    """Per image, its views' features ``(k, dim)`` (None where the file cannot be read).

    Files are read and cut by two threads while the encoder runs, at most ``READ_AHEAD`` images
    ahead of it (decoded views wait in memory); cached features are reused.
    """
    from collections import deque

    shas = [file_sha256(p) for p in paths]
    out: list[np.ndarray | None] = [cache.get(s) if cache else None for s in shas]
    todo = [i for i, f in enumerate(out) if f is None]
    size = backbone.config.input_size
    start, done = time.time(), 0

    def load(i: int):
        try:
            return i, _views_of(paths[i], size=size, n=views, mode=view_mode, align_jpeg=align_jpeg,
                                center_crop=center_crop, max_pixels=max_pixels), ""
        except ImageError as err:
            return i, None, str(err)

    with ThreadPoolExecutor(max_workers=2) as pool:
        queue: deque = deque()
        pending = iter(todo)
        for i in pending:
            queue.append(pool.submit(load, i))
            if len(queue) >= READ_AHEAD:
                break
        while queue:
            i, image_views, error = queue.popleft().result()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append(pool.submit(load, nxt))
            if image_views is None:
                log(f"skipped {paths[i]}: {error}")
                continue
            features = backbone.features(image_views)
            out[i] = features
            if cache:
                cache.put(shas[i], features)
            done += 1
            if done % 50 == 0:
                log(f"encoded {done}/{len(todo)} images ({time.time() - start:.0f} s)")
    return out


def _stack(features: Sequence[np.ndarray], labels: np.ndarray,
           image_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views as rows, their labels, and weights that give every image its weight (1 by default),
    shared among its views."""
    x = np.concatenate(features)
    y = np.concatenate([np.full(len(f), lab) for f, lab in zip(features, labels)])
    iw = np.ones(len(features)) if image_weights is None else np.asarray(image_weights, dtype=np.float64)
    w = np.concatenate([np.full(len(f), wi / len(f)) for f, wi in zip(features, iw)])
    return x, y, w


def group_weights(groups: Sequence[str], power: float = 0.5) -> np.ndarray:
    """Per-image weights that give a group of ``n`` images a total weight of ``n ** power``.

    ``power`` 1 weighs images alike, 0 weighs groups (sources, generators) alike; 0.5 keeps a
    collection of a thousand photos from drowning forty small ones without letting three images
    of a rare generator count as much as a thousand.
    """
    counts = pd.Series(list(groups)).value_counts()
    n = np.array([counts[g] for g in groups], dtype=np.float64)
    return n ** power / n


def image_logits(probe: LinearProbe | MLPProbe, features: Sequence[np.ndarray]) -> np.ndarray:
    """Each image's logit: the mean of its views' logits."""
    return np.array([float(np.mean(probe.logits(f))) for f in features])


def _design(features: Sequence[np.ndarray], labels: np.ndarray, image_weights: np.ndarray | None):
    """What both heads are fitted on: standardised, L2-normalised view rows, their labels, and
    weights (summing to the number of rows) that give each class half of the total; plus the
    standardisation's mean and scale."""
    x, y, w = _stack(features, np.asarray(labels), image_weights)
    z = normalise(x)
    mean, scale = z.mean(axis=0), z.std(axis=0) + 1e-6
    for cls in (0, 1):  # each class carries half of the weight, whatever the counts
        w[y == cls] *= 0.5 / w[y == cls].sum()
    return (z - mean) / scale, y, w * len(w), mean, scale


def fit_probe(
    train_features: Sequence[np.ndarray],
    train_labels: np.ndarray,
    *,
    c: float,
    seed: int = 0,
    image_weights: np.ndarray | None = None,
) -> LinearProbe:
    """A class-balanced L2 logistic regression on standardised, L2-normalised view features
    (``image_weights``: each image's weight within its class, e.g. :func:`group_weights`)."""
    from sklearn.linear_model import LogisticRegression

    z, y, w, mean, scale = _design(train_features, train_labels, image_weights)
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    model.fit(z, y, sample_weight=w)
    return LinearProbe.from_arrays(model.coef_[0], float(model.intercept_[0]), mean, scale)


@dataclass(frozen=True)
class MLPRecipe:
    """How :func:`fit_mlp_probe` trains: chosen by the grouped cross-validation of #18
    (``experiments/wild_probe.py cv --heads``); recorded in the checkpoint."""

    hidden: int = 256
    dropout: tuple[float, float] = (0.5, 0.3)  # on the standardised features, on the hidden units
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    # heads trained from seeds seed, seed + 1, ... and merged into one (:func:`merge_mlp_probes`):
    # a deep ensemble (Lakshminarayanan et al., NeurIPS 2017) in the checkpoint format of one head
    seeds: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def fit_mlp_probe(
    train_features: Sequence[np.ndarray],
    train_labels: np.ndarray,
    *,
    recipe: MLPRecipe = MLPRecipe(),
    seed: int = 0,
    image_weights: np.ndarray | None = None,
) -> MLPProbe:
    """A one-hidden-layer head trained with AdamW on the same rows and weights as :func:`fit_probe`
    (weighted binary cross-entropy, dropout; deterministic for a given ``seed``). With
    ``recipe.seeds`` > 1, that many heads from consecutive seeds, merged into one whose logit is
    the mean of theirs."""
    z, y, w, mean, scale = _design(train_features, train_labels, image_weights)
    heads = [_fit_one_mlp(z, y, w, mean, scale, recipe, seed + k) for k in range(recipe.seeds)]
    return heads[0] if len(heads) == 1 else merge_mlp_probes(heads)


def merge_mlp_probes(heads: Sequence[MLPProbe]) -> MLPProbe:
    """One MLP probe whose logit is exactly the mean of the ``heads``' logits: their hidden units side by
    side, each head's output weights divided by their number. The heads must share the standardisation
    (they were fitted on the same rows)."""
    import torch

    first = heads[0]
    for head in heads[1:]:
        if not (torch.equal(head.mean, first.mean) and torch.equal(head.scale, first.scale)):
            raise ValueError("the heads were standardised differently: fit them on the same rows")
    merged = MLPProbe(first.dim, sum(h.hidden.out_features for h in heads),
                      dropout=(first.drop_in.p, first.drop_hidden.p))
    with torch.no_grad():
        merged.mean.copy_(first.mean)
        merged.scale.copy_(first.scale)
        merged.hidden.weight.copy_(torch.cat([h.hidden.weight for h in heads]))
        merged.hidden.bias.copy_(torch.cat([h.hidden.bias for h in heads]))
        merged.out.weight.copy_(torch.cat([h.out.weight for h in heads], dim=1) / len(heads))
        merged.out.bias.copy_(torch.stack([h.out.bias for h in heads]).mean(dim=0))
    return merged.eval()


def _fit_one_mlp(z: np.ndarray, y: np.ndarray, w: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                 recipe: MLPRecipe, seed: int) -> MLPProbe:
    import torch

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initialisation
    probe = MLPProbe(z.shape[1], recipe.hidden, dropout=recipe.dropout)
    with torch.no_grad():
        probe.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        probe.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    zt, yt, wt = (torch.as_tensor(a, dtype=torch.float32) for a in (z, y, w))
    optimiser = torch.optim.AdamW(probe.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    probe.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(zt), generator=generator)
        for i in range(0, len(zt), recipe.batch_size):
            b = order[i : i + recipe.batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(zt[b]), yt[b], weight=wt[b])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return probe.eval()


def _usable(table: pd.DataFrame, features: list[np.ndarray | None]) -> tuple[list[np.ndarray], np.ndarray, pd.DataFrame]:
    keep = [i for i, f in enumerate(features) if f is not None]
    return [features[i] for i in keep], table["label"].to_numpy()[keep], table.iloc[keep].reset_index(drop=True)


def probe_config(backbone_name: str, backbone: Backbone, *, views: int, view_mode: str,
                 head: str = "linear") -> ProbeConfig:
    """The architecture record of a probe on ``backbone`` (created from ``backbone_name``).

    An ONNX encoder is recorded by file name: a checkout and an installed package keep it in
    different folders, and :func:`detector.probe.find_encoder` looks for it by name and sha256.
    """
    record = backbone.config.to_dict()
    if backbone_name.startswith("clip:onnx:"):
        record = {**record, "name": f"clip:onnx:{Path(backbone_name[len('clip:onnx:'):]).name}"}
    return ProbeConfig(architecture=f"{PROBE_PREFIX}:{backbone_name}", backbone=record, views=views,
                       view_mode=view_mode, head=head)


def train_probe(config: ProbeTrainConfig, *, train_table: pd.DataFrame, val_table: pd.DataFrame,
                log: Callable[[str], None] = print) -> dict:
    """Encode, fit (a linear head: ``C`` chosen on validation; an MLP head: :class:`MLPRecipe`),
    calibrate on validation, and write ``probe.safetensors``."""
    if config.head not in ("linear", "mlp"):
        raise ValueError(f"head must be linear or mlp, got {config.head!r}")
    if config.mlp_seeds < 1:
        raise ValueError(f"mlp_seeds must be at least 1, got {config.mlp_seeds}")
    t0 = time.time()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = create_backbone(config.backbone, feature=config.feature, threads=config.threads)
    settings = {"backbone": backbone.config.fingerprint, "feature": config.feature, "views": config.views,
                "view_mode": config.view_mode, "align_jpeg": config.align_jpeg,
                "input_size": backbone.config.input_size}
    cache = FeatureCache(config.cache_dir or out / "features", settings)
    kw = dict(views=config.views, view_mode=config.view_mode, align_jpeg=config.align_jpeg,
              max_pixels=config.max_pixels, log=log)
    train_f, train_y, train_t = _usable(train_table, embed_images(list(train_table["path"]), backbone, cache, **kw))
    val_f, val_y, val_t = _usable(val_table, embed_images(list(val_table["path"]), backbone, cache, **kw))
    if len(set(train_y)) < 2 or len(set(val_y)) < 2:
        raise ValueError("the probe needs real and generated images in both the training and the validation data")
    encode_minutes = (time.time() - t0) / 60
    scores: dict[float, float] = {}
    best_c = None
    recipe = MLPRecipe(seeds=config.mlp_seeds)
    if config.head == "mlp":
        probe = fit_mlp_probe(train_f, train_y, recipe=recipe, seed=config.seed)
    else:
        grid = [config.c] if config.c is not None else list(C_GRID)
        for c in grid:
            probe = fit_probe(train_f, train_y, c=c, seed=config.seed)
            scores[c] = auc(val_y, image_logits(probe, val_f))
            log(f"C={c:g}: validation AUC {scores[c]:.4f}")
        best_c = max(grid, key=lambda c: (scores[c], -abs(np.log(c))))
        probe = fit_probe(train_f, train_y, c=best_c, seed=config.seed)
    val_logits = image_logits(probe, val_f)
    calibration = fit_calibration(val_y, val_logits, target_far=config.target_far)
    arch = f"{PROBE_PREFIX}:{config.backbone}"
    probe.config = probe_config(config.backbone, backbone, views=config.views, view_mode=config.view_mode,
                                head=config.head)
    record = {
        "architecture": arch,
        "probe": probe.config.to_dict(),
        "config": config.to_dict(),
        "data": {"train": config.train, "val": config.val, "n_train": len(train_f), "n_val": len(val_f),
                 "n_train_real": int((train_y == 0).sum()), "n_train_fake": int((train_y == 1).sum())},
        "c_grid": {f"{c:g}": s for c, s in scores.items()},
        "c": best_c,
        **({"mlp": recipe.to_dict()} if config.head == "mlp" else {}),
        "val_auc": auc(val_y, val_logits),
        "calibration": calibration.to_dict(),
        "minutes": {"encode": encode_minutes, "total": (time.time() - t0) / 60},
        "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(out / "probe.safetensors", probe, record, dtype=None)
    for name, table in (("train_manifest.csv", train_t), ("val_manifest.csv", val_t)):
        atomic_write(out / name, lambda tmp, t=table: t.to_csv(tmp, index=False))
    log(f"probe: {'MLP head' if best_c is None else f'C={best_c:g}'}, validation AUC {record['val_auc']:.4f}, {record['minutes']['total']:.1f} min "
        f"-> {out / 'probe.safetensors'}")
    return record
