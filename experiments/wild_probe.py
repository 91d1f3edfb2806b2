"""The in-the-wild campaign (#18): choose the probe's training views, scan views and C by grouped
cross-validation, fit the operating point, and write the default probe.

Inputs are the features of ``experiments/wild_features.py`` (resized views per image: the file as
stored, two independent arrivals, a close-up, a thumbnail and the four conditions of ``detector
evaluate --wild``; the class token and mean patch token of every block).
Steps, each a subcommand:

``split``  assigns every image of the given manifests to the sealed test split or to the pool, by
           group: real photos by source, generated images by generator family. The previous sealed
           test split's sources and generators stay in test; any other group goes to test when the
           first hex digit of sha256(group name) is below 3 (about 19%), a rule no result can steer.
           A group keeps at most ``--cap`` images in the pool and ``--test-cap`` in test (those with
           the smallest sha256: a content rule),
           so that a thousand-photo collection does not outweigh forty small ones and the CPU budget
           goes to variety. Writes ``data/splits/wild_pool.csv`` and ``data/splits/wild_test.csv``.
``cv``     5-fold cross-validation on the pool, grouped (no source and no generator family on both
           sides of a fold), for the arms named by ``--features``, ``--train-views``, ``--heads``
           and ``--c`` (each a list; every combination is run; C applies to the linear head only).
           An arm is scored under three conditions: the held-out images as stored, after their
           first arrival, and as a close-up (a 128-512 px native crop, re-encoded). Rows accumulate
           in ``experiments/wild_probe.json`` across runs (a rerun of an arm replaces its row), so a
           staged search is recorded whole; among the arms measured on the current pool (rows carry
           its ``pool_id``), the one with the best mean AUC over the three conditions wins. An arm
           whose out-of-fold logits for exactly this pool are saved beside the cache is read, not
           refitted (``--refit`` fits again); an ensemble head (``mlpx3``) is the mean of its
           members' saved logits. Earlier campaigns (scored on stored and arrival only) are in
           ``experiments/wild_probe_2026-12-04.json`` (views, C, native crops) and
           ``experiments/wild_probe_2026-12-05.json`` (blocks and tokens), and in
           experiments/EXPERIMENTS.md.
``resnet`` scores a sample of the pool's new images (the data engine's; the ResNet-50 trained on
           the older ones) with the bundled ResNet-50 as ``detector scan`` does, and measures on it the
           fusion of the ResNet's calibrated margin with the winner's out-of-fold margin for several
           weights: the ResNet's weight in ``weights/detector.json`` is the best of them when the
           paired-bootstrap interval of its AUC gain over the probe alone lies above 0, else 0 (rule
           since 2026-12-06; before, the best weight whatever its margin).
``bands``  compares bands of image sizes for the probe's size offsets (:meth:`detector.probe.ProbeConfig.
           size_offset`) on the winner's out-of-fold logits under seven conditions (the three above
           and the four of ``detector evaluate --wild``): per candidate, the offsets that give every
           band the same false-positive rate, then the operating point; the candidate with the best
           mean recall over the conditions is recorded as chosen (``size_bands`` in the record).
``fit``    fits the winner on the whole pool and writes ``--out`` (a probe checkpoint) with the chosen
           size offsets and a calibration that puts 0.5 on the operating point: the strictest
           threshold, over the seven conditions, at which at most ``--target-fpr`` of the out-of-fold
           real scores (offsets taken off; each source weighing as the training weighs it) would be
           called generated. A view under ``--min-side`` (default 0: none) gets no verdict: it counts as a
           photo not called generated, a generated image not caught; the minimum is stored with the weights.
           ``--tensors CHECKPOINT`` keeps that probe's network and refits only the operating point.
``experts`` measures, out of fold, a second head for small images (trained only on views under
           ``--edge`` px, scoring the held-out views under it) against the winner alone, each with
           its size offset and operating point; rows accumulate under ``experts`` in the record.
``sources`` counts, per real source of the pool, the photos whose out-of-fold logit (offsets taken
           off) reaches the shipped threshold under each condition: where the false positives that
           set the operating point come from. Prints only.

Run from the repository root::

    .venv/bin/python experiments/wild_probe.py split ../shared/data/dev/manifest.csv ...
    .venv/bin/python experiments/wild_probe.py cv --features cls-5,7,9,11 cls+tokens-5,7,9,11 --c 0.001
    .venv/bin/python experiments/wild_probe.py bands
    .venv/bin/python experiments/wild_probe.py fit --out weights/clip_probe_vitb16.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "data"))
from blocklist import Blocklist  # noqa: E402
from detector.backbones import create_backbone  # noqa: E402
from detector.checkpoints import file_sha256, read_state_dict, save_checkpoint  # noqa: E402
from detector.datasets import read_labelled  # noqa: E402
from detector.metrics import auc, auc_difference_interval  # noqa: E402
from detector.probe import ProbeConfig, probe_from_state, size_band  # noqa: E402
from detector.training.calibration import (FPR_TARGETS, fit_operating_point, fit_size_offsets,  # noqa: E402
                                           strictest_thresholds)
from detector.training.probe import MLPRecipe, fit_mlp_probe, fit_probe, group_weights, probe_config  # noqa: E402
from wild_features import CLOSEUP, ENCODER, RECIPE, THUMB, VIEW_SETS, VIEWS, cache_for, feature_columns  # noqa: E402

SPLITS = ROOT / "data" / "splits"
RESULTS = ROOT / "experiments" / "wild_probe.json"
OLD_TEST = SPLITS / "test.csv"
FOLDS = 5
# training views: which of VIEWS each training image contributes
TRAIN_VIEWS = {
    "stored+arrival": ("stored_resize", "arrival_resize"),  # the first campaign's winner
    "stored+2arrivals": ("stored_resize", "arrival_resize", "arrival2_resize"),
    "stored+arrival+closeup": ("stored_resize", "arrival_resize", "closeup_resize"),
    "stored+arrival+closeup+thumb": ("stored_resize", "arrival_resize", "closeup_resize", "thumb_resize"),
}
# the view scored under each condition: as stored, after an arrival, as a close-up, and the four
# conditions of `detector evaluate --wild` (added after the arms were chosen: the operating point holds
# under them, the choice of arm is still the mean AUC over the first three, CHOICE_CONDITIONS)
SCAN_VIEWS = ("stored_resize", "arrival_resize", "closeup_resize", "center256+jpeg90_resize", "resize0.5_resize",
              "jpeg75_resize", "screenshot1080_resize")
CONDITIONS = ("stored", "arrival", "closeup", "crop256+jpeg90", "half", "jpeg75", "screenshot")
CHOICE_CONDITIONS = CONDITIONS[:3]
# heads: linear; mlp (seed 0); mlp-sK (one head from seed K: a member); mlpxN (seeds 0..N-1 merged into one
# head, detector.training.probe.merge_mlp_probes: its logit is the mean of its members', so its out-of-fold
# logits are the mean of theirs and each member's are saved and reused on their own)
HEADS = ("linear", "mlp", "mlpx3", "mlpx5")
# the logit given to a view under the probe's minimum size (no verdict): below any threshold, so it is never
# called generated nor caught, and stays in the denominators of the false-positive rates that fit the operating point
NO_VERDICT = -1e9


def mlp_recipe(head: str) -> tuple[MLPRecipe, int]:
    """The recipe and first seed of an MLP head name (``mlp``, ``mlp-s2``, ``mlpx3``)."""
    if head.startswith("mlp-s"):
        return MLPRecipe(), int(head[len("mlp-s"):])
    if head.startswith("mlpx"):
        return MLPRecipe(seeds=int(head[len("mlpx"):])), 0
    if head == "mlp":
        return MLPRecipe(), 0
    raise SystemExit(f"unknown head {head!r}")


def members_of(head: str) -> list[str]:
    """The single-seed heads whose mean an ensemble head's logit is (a single head: itself)."""
    if head == "linear":
        return [head]
    recipe, seed = mlp_recipe(head)
    if recipe.seeds == 1:
        return [head]
    return ["mlp" if k == 0 else f"mlp-s{k}" for k in range(seed, seed + recipe.seeds)]


def product_head(head: str) -> str:
    """The head kind a checkpoint records (every MLP arm is one :class:`detector.probe.MLPProbe`)."""
    return "linear" if head == "linear" else "mlp"


def feature_set(name: str) -> tuple[str, tuple[int, ...]]:
    """``cls-5,7,9,11`` -> (``cls``, (5, 7, 9, 11)); the kinds are those of detector.backbones."""
    kind, _, blocks = name.rpartition("-")
    if kind not in ("cls", "tokens", "cls+tokens"):
        raise SystemExit(f"feature set {name!r}: give KIND-I,J,... with KIND cls, tokens or cls+tokens")
    return kind, tuple(int(b) for b in blocks.split(","))


def product_feature(name: str) -> str:
    """The detector.backbones feature name of a feature set (``cls-5,7`` -> ``cls-blocks:5,7``)."""
    kind, blocks = feature_set(name)
    return f"{kind}-blocks:{','.join(map(str, blocks))}"


MIN_GROUP = 5  # groups smaller than this get no row of their own in the worst-group figure


def family(generator: str) -> str:
    """A generator's family: what must not sit on both sides of a fold (``sdxl-1.0`` and
    ``sdxl-turbo`` are one family; Stable Diffusion keeps its version: ``sd-v2-unclip`` -> ``sd-v2-unclip``)."""
    tokens = generator.lower().split("-")
    return "-".join(tokens[:3]) if tokens[0] == "sd" else tokens[0]


def group_of(row) -> str:
    return f"real:{row.source}" if int(row.label) == 0 else f"fake:{family(str(row.generator))}"


def read_pool(manifests: list[str]) -> pd.DataFrame:
    tables = []
    for manifest in manifests:
        t = read_labelled(manifest)
        t["dataset"] = str(manifest)
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table["source"] = table["source"].fillna("").astype(str) if "source" in table else ""
    blocklist = Blocklist.read()
    table["source"] = [blocklist.public_origin(s) for s in table["source"]]
    table["sha256"] = [file_sha256(p) for p in table["path"]]
    table = table.drop_duplicates("sha256").reset_index(drop=True)
    table["group"] = [group_of(r) for r in table.itertuples(index=False)]
    return table


def sealed_groups() -> set[str]:
    old = pd.read_csv(OLD_TEST)
    return {group_of(r) for r in old.itertuples(index=False)}


def in_test(group: str, old: set[str]) -> bool:
    return group in old or int(hashlib.sha256(group.encode()).hexdigest()[0], 16) < 3


def cmd_split(args) -> None:
    table = read_pool(args.manifests)
    old = sealed_groups()
    test = table["group"].map(lambda g: in_test(g, old))
    before = len(table)
    table = table.assign(cap=np.where(test, args.test_cap, args.cap))
    table = table.sort_values("sha256")
    rank = table.groupby("group", sort=False).cumcount()
    table = table[rank < table["cap"]].sort_values(["label", "group", "sha256"]).reset_index(drop=True)
    print(f"{before} images, {len(table)} after the caps ({args.cap} per group in the pool, {args.test_cap} in test)")
    test = table["group"].map(lambda g: in_test(g, old))
    columns = ["path", "label", "generator", "source", "group", "dataset", "sha256"]
    for name, part in (("wild_pool.csv", table[~test]), ("wild_test.csv", table[test])):
        out = part[columns].copy()
        out["path"] = [os.path.relpath(Path(p).resolve(), SPLITS) for p in out["path"]]
        out.to_csv(SPLITS / name, index=False)
        print(f"{name}: {(out.label == 0).sum()} real from {out[out.label == 0].group.nunique()} sources, "
              f"{(out.label == 1).sum()} generated from {out[out.label == 1].group.nunique()} families")


def needed_view_sets(train_views: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The view sets that the scan conditions and the named training view sets read."""
    views = set(SCAN_VIEWS) | {v for tv in train_views for v in TRAIN_VIEWS[tv]}
    return [name for name, (names, _, _) in VIEW_SETS.items() if views & set(names)]


def load_features(table: pd.DataFrame, cache_dir: str, features: str,
                  train_views: list[str] | tuple[str, ...] = ()) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows with cached features and their ``(n, len(VIEWS), dim)`` array of feature set ``features``.
    Only the view sets that the scan conditions and ``train_views`` read are required; the views of
    any other set are NaN, so that an arm never needs an encoding it does not use."""
    kind, blocks = feature_set(features)
    columns = feature_columns(blocks, tuple(kind.split("+")))
    needed = needed_view_sets(train_views)
    caches = {view_set: cache_for(cache_dir, view_set) for view_set in needed}
    keep, feats = [], []
    for i, sha in enumerate(table["sha256"]):
        parts = {view_set: cache.get(sha) for view_set, cache in caches.items()}
        if all(f is not None for f in parts.values()):
            keep.append(i)
            feats.append(np.concatenate([parts[vs][:, columns] if vs in parts else
                                         np.full((len(names), len(columns)), np.nan, np.float32)
                                         for vs, (names, _, _) in VIEW_SETS.items()]))
    missing = len(table) - len(keep)
    if missing:
        print(f"note: {missing} of {len(table)} images lack the features of some view set (run wild_features.py "
              f"--views {' / '.join(needed)}); left out")
    return table.iloc[keep].reset_index(drop=True), np.stack(feats)


def load_sides(table: pd.DataFrame, cache_dir: str, views=SCAN_VIEWS) -> np.ndarray:
    """``(n, len(views))``: the short side, in pixels, of every image's view under each condition (or
    of the named ``views``) before the encoder's resize, from the shapes wild_features.py keeps."""
    wanted = [vs for vs, (names, _, _) in VIEW_SETS.items() if set(names) & set(views)]
    shapes = {view_set: cache_for(cache_dir, view_set, "shapes") for view_set in wanted}
    out = np.zeros((len(table), len(views)))
    for i, sha in enumerate(table["sha256"]):
        parts = {view_set: cache.get(sha) for view_set, cache in shapes.items()}
        if any(part is None for part in parts.values()):
            raise SystemExit(f"no view sizes for {sha}: run wild_features.py again (it fills in the sizes)")
        sides = np.concatenate([parts[vs].min(axis=1) if vs in parts else np.full(len(names), np.nan)
                                for vs, (names, _, _) in VIEW_SETS.items()])
        out[i] = sides[view_index(views)]
    return out


def band_offsets(sides: np.ndarray, edges: list[float], offsets: list[float]) -> np.ndarray:
    """The offset (ProbeConfig.size_offset) of every entry of ``sides``."""
    return np.asarray(offsets)[size_band(edges, sides)]


def view_index(names) -> list[int]:
    return [VIEWS.index(n) for n in names]


def fit_arm(features: np.ndarray, labels: np.ndarray, weights: np.ndarray, train_views: str, c: float,
            head: str = "linear"):
    idx = view_index(TRAIN_VIEWS[train_views])
    if head == "linear":
        return fit_probe(features[:, idx], labels, c=c, image_weights=weights)
    recipe, seed = mlp_recipe(head)
    return fit_mlp_probe(features[:, idx], labels, recipe=recipe, seed=seed, image_weights=weights)


def condition_logits(probe, features: np.ndarray) -> np.ndarray:
    """``(n, conditions)``: the probe's logit of every image under each condition."""
    idx = view_index(SCAN_VIEWS)
    n, d = len(features), features.shape[2]
    return probe.logits(features[:, idx].reshape(n * len(idx), d)).reshape(n, len(idx))


def out_of_fold(table: pd.DataFrame, features: np.ndarray, train_views: str, c: float,
                head: str = "linear") -> np.ndarray:
    """``(n, conditions)`` out-of-fold logits (grouped folds: unseen sources and families)."""
    y = table["label"].to_numpy()
    w = group_weights(table["group"])
    out = np.zeros((len(table), len(SCAN_VIEWS)))
    for train_idx, test_idx in folds(table):
        probe = fit_arm(features[train_idx], y[train_idx], w[train_idx], train_views, c, head)
        out[test_idx] = condition_logits(probe, features[test_idx])
    return out


def worst_group_auc(table: pd.DataFrame, scores: np.ndarray) -> tuple[float, str]:
    """The lowest AUC of one real source (>= MIN_GROUP images) against all generated images."""
    y = table["label"].to_numpy()
    fakes = scores[y == 1]
    worst = (1.0, "")
    for group, idx in table[table.label == 0].groupby("group").groups.items():
        if len(idx) < MIN_GROUP:
            continue
        reals = scores[np.asarray(idx)]
        value = auc(np.r_[np.zeros(len(reals)), np.ones(len(fakes))], np.r_[reals, fakes])
        worst = min(worst, (value, group))
    return worst


def folds(table: pd.DataFrame, seed: int = 0):
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(table)), table["label"], table["group"]))


def operating_point(table: pd.DataFrame, oof: np.ndarray, target_fpr: float = 0.05) -> dict:
    """The threshold ``fit`` would set from these out-of-fold logits (the strictest, over the
    conditions, at which ``target_fpr`` of the real photos are called generated, sources weighted as
    in training) and each condition's FPR and recall there."""
    y = table["label"].to_numpy()
    real = y == 0
    w = group_weights(table["group"])
    t = strictest_thresholds([oof[real, k] for k in range(oof.shape[1])], (target_fpr,), w[real])[f"{target_fpr:g}"]
    out = {"op_threshold": float(t)}
    for k, name in enumerate(CONDITIONS):
        out[f"op_fpr_{name}"] = float((oof[real, k] >= t).mean())
        out[f"op_recall_{name}"] = float((oof[~real, k] >= t).mean())
    return out


def oof_path(cache_dir: str, row: dict) -> Path:
    """Where an arm's out-of-fold logits are kept, beside the feature cache."""
    name = "_".join(str(v) for v in arm_key(row)).replace(",", ".").replace("+", "-")
    return Path(cache_dir) / "oof" / f"{name}.csv"


def save_oof(cache_dir: str, row: dict, table: pd.DataFrame, oof: np.ndarray) -> Path:
    """An arm's out-of-fold logits beside the feature cache (for later analysis of operating points)."""
    path = oof_path(cache_dir, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = table[["sha256", "label", "group"]].copy()
    for k, condition in enumerate(CONDITIONS):
        frame[condition] = oof[:, k]
    frame.to_csv(path, index=False)
    return path


def saved_oof(cache_dir: str, row: dict, table: pd.DataFrame) -> np.ndarray | None:
    """An arm's out-of-fold logits as ``cv`` (or an earlier ``fit``) saved them, when they hold exactly
    these images under every condition; else None. Both heads fit deterministically, so a saved
    file is what a refit would give."""
    path = oof_path(cache_dir, row)
    if path.exists():
        saved = pd.read_csv(path)
        if saved["sha256"].tolist() == table["sha256"].tolist() and set(CONDITIONS) <= set(saved.columns):
            print(f"out-of-fold logits of {arm_key(row)} read from {path}")
            return saved[list(CONDITIONS)].to_numpy()
    return None


def arm_oof(cache_dir: str, arm: dict, table: pd.DataFrame, features: np.ndarray, refit: bool = False) -> np.ndarray:
    """An arm's out-of-fold logits: saved ones when they match (unless ``refit``), else recomputed and
    saved; an ensemble head's are the mean of its members', each saved on its own."""
    members = members_of(arm["head"])
    if len(members) > 1:
        return np.mean([arm_oof(cache_dir, {**arm, "head": m}, table, features, refit) for m in members], axis=0)
    oof = None if refit else saved_oof(cache_dir, arm, table)
    if oof is None:
        oof = out_of_fold(table, features, arm["train_views"], arm["C"], arm["head"])
        save_oof(cache_dir, arm, table, oof)
    return oof


def pool_id(table: pd.DataFrame) -> str:
    """A short id of the images a row was measured on (the SHA-256 of their sorted SHA-256s)."""
    return hashlib.sha256("\n".join(sorted(table["sha256"])).encode()).hexdigest()[:16]


def arm_key(row: dict) -> tuple:
    return row["features"], row["train_views"], row["head"], row["C"]


def cmd_cv(args) -> None:
    pool = pd.read_csv(SPLITS / "wild_pool.csv")
    record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"arms": []}
    rows = {arm_key(r): r for r in record["arms"]}
    for features_name in args.features:
        table, features = load_features(pool, args.cache, features_name, args.train_views)
        y = table["label"].to_numpy()
        print(f"{features_name}: {features.shape[2]} dims; pool {(y == 0).sum()} real ({table[y == 0].group.nunique()} "
              f"sources), {(y == 1).sum()} generated ({table[y == 1].group.nunique()} families)", flush=True)
        arms = [(tv, head, c) for tv in args.train_views for head in args.heads
                for c in (args.c if head == "linear" else [None])]
        for train_views, head, c in arms:
            t0 = time.time()
            row = {"features": features_name, "train_views": train_views, "head": head, "C": c}
            oof = arm_oof(args.cache, row, table, features, args.refit)
            for k, name in enumerate(CONDITIONS):
                row[f"auc_{name}"] = auc(y, oof[:, k])
                row[f"worst_{name}"], row[f"worst_{name}_group"] = worst_group_auc(table, oof[:, k])
            row["score"] = float(np.mean([row[f"auc_{name}"] for name in CHOICE_CONDITIONS]))
            row.update(operating_point(table, oof))
            row["seconds"] = round(time.time() - t0, 1)
            row["pool_id"] = pool_id(pool)
            rows[arm_key(row)] = row
            print(f"{features_name:22s} {train_views:22s} {head:6s} C={c if c is not None else '-'!s:6s} "
                  + " ".join(f"{name} {row[f'auc_{name}']:.4f} (worst {row[f'worst_{name}']:.3f})" for name in CONDITIONS)
                  + f"; at the operating point, recall as stored {row['op_recall_stored']:.3f} "
                  f"[{row['seconds']:.0f} s]", flush=True)
        del features
    # only arms measured on this pool compete: earlier rows stay on the record but scored other images
    current = [r for r in rows.values() if r.get("pool_id") == pool_id(pool)]
    best = max(current, key=lambda r: (round(r["score"], 4), -(r["C"] or 0)))
    print(f"winner so far: features {best['features']}, train views {best['train_views']}, head {best['head']}, "
          f"C={best['C']} (mean AUC {best['score']:.4f})")
    record.update({"pool": {"n_real": int((pool.label == 0).sum()), "n_fake": int((pool.label == 1).sum()),
                            "real_sources": int(pool[pool.label == 0].group.nunique()),
                            "fake_families": int(pool[pool.label == 1].group.nunique())},
                   "folds": FOLDS, "arms": list(rows.values()), "winner": best,
                   "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    RESULTS.write_text(json.dumps(record, indent=1))


RESNET_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)


def cmd_resnet(args) -> None:
    import subprocess

    from detector.checkpoints import load_model

    record = json.loads(RESULTS.read_text())
    best = record["winner"]
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                    [best["train_views"]])
    probe_stored = arm_oof(args.cache, best, table, features)[:, 0]
    del features
    cal = record.get("operating_point") or {}
    if cal.get("size_offsets"):  # the shipped probe's logit has its size offset taken off
        edges, offsets = cal["size_offsets"]["edges"], cal["size_offsets"]["offsets"]
        probe_stored = probe_stored - band_offsets(load_sides(table, args.cache)[:, 0], edges, offsets)
    new = table["dataset"].str.contains("shared-corpus")
    sample = pd.concat([table[new & (table.label == lab)].sort_values("sha256").head(args.n // 2) for lab in (0, 1)])
    listing = Path(args.cache) / "resnet_sample.csv"
    sample = sample.assign(path=[str((SPLITS / p).resolve()) for p in sample["path"]])
    sample[["path"]].to_csv(listing, index=False)
    out = Path(args.cache) / "resnet_sample_scores.csv"
    weights = ROOT / "weights" / "resnet50nodown_dev.safetensors"
    command = [sys.executable, "-m", "detector.cli", "scan", str(listing), "--weights", str(weights), "-o", str(out),
               "-q", *(["--resume"] if out.exists() else [])]
    subprocess.run(command, check=True, cwd=ROOT)
    scores = pd.read_csv(out, keep_default_na=False)
    scores = scores[scores["error"] == ""]
    resnet = dict(zip(scores["path"], scores["logit"].astype(float)))
    _, info = load_model(weights)
    t, temp = cal.get("threshold", 0.0), cal.get("temperature", 1.0)
    keep = [i for i, p in zip(sample.index, sample["path"]) if p in resnet]
    y = table.loc[keep, "label"].to_numpy()
    m_probe = (probe_stored[keep] - t) / temp
    m_resnet = np.array([info.margin(resnet[p]) for p in sample.loc[keep, "path"]])
    rows = []
    for wr in RESNET_WEIGHTS:
        fused = (m_probe + wr * m_resnet) / (1 + wr)
        low, high = auc_difference_interval(y, fused, m_probe)
        rows.append({"resnet_weight": wr, "auc": auc(y, fused), "gain_ci": [low, high]})
        print(f"ResNet weight {wr:<4g} (probe 1): AUC {rows[-1]['auc']:.4f} on {int((y == 0).sum())} real + "
              f"{int((y == 1).sum())} generated new pool images, gain over weight 0 [{low:+.4f}, {high:+.4f}] "
              f"(ResNet alone {auc(y, m_resnet):.4f})")
    # the best weight earns its vote only when its gain over the probe alone is more than resampling noise
    best_w = max(rows, key=lambda r: (round(r["auc"], 4), -r["resnet_weight"]))
    chosen = best_w["resnet_weight"] if best_w["gain_ci"][0] > 0 else 0.0
    record["resnet"] = {"sample": len(keep), "rows": rows, "resnet_alone": auc(y, m_resnet),
                        "best_weight": best_w["resnet_weight"], "chosen_weight": chosen,
                        "rule": "the best weight if the paired-bootstrap 95% interval of its AUC gain over "
                                "weight 0 lies above 0, else 0"}
    RESULTS.write_text(json.dumps(record, indent=1))
    print(f"best ResNet weight {best_w['resnet_weight']:g}; chosen {chosen:g}")


# candidate edges of the size bands (short side, px), compared by `bands`; () is one band: no offsets
BAND_CANDIDATES = ((), (320,), (320, 640), (320, 640, 1280), (400, 800, 1600), (288, 448, 704, 1088),
                   (160, 400, 800, 1600), (224, 400, 800, 1600))


def with_size_offsets(table: pd.DataFrame, oof: np.ndarray, sides: np.ndarray, edges,
                      target_fpr: float) -> tuple[list[float], np.ndarray]:
    """The size offsets that the out-of-fold real scores give for bands bounded by ``edges`` (none:
    one band, offset 0), and the out-of-fold logits with them taken off."""
    if not len(edges):
        return [0.0], oof
    real = table["label"].to_numpy() == 0
    w = group_weights(table["group"])
    offsets = fit_size_offsets([oof[real, k] for k in range(oof.shape[1])],
                               [sides[real, k] for k in range(oof.shape[1])], edges, target_fpr=target_fpr,
                               weights=w[real])
    return offsets, oof - band_offsets(sides, list(edges), offsets)


def cmd_bands(args) -> None:
    """Compare the candidate size bands on the winner's out-of-fold scores: offsets fitted, then the
    operating point over all conditions; the bands with the best mean recall over the conditions win
    (the false-positive rate is held at the target in every condition by construction)."""
    record = json.loads(RESULTS.read_text())
    best = record["winner"]
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                    [best["train_views"]])
    oof = arm_oof(args.cache, best, table, features)
    del features
    sides = load_sides(table, args.cache)
    rows = []
    for edges in BAND_CANDIDATES:
        offsets, shifted = with_size_offsets(table, oof, sides, edges, args.target_fpr)
        row = {"edges": list(edges), "offsets": offsets, **operating_point(table, shifted, args.target_fpr)}
        row["mean_recall"] = float(np.mean([row[f"op_recall_{name}"] for name in CONDITIONS]))
        rows.append(row)
        print(f"edges {str(list(edges)):26s} offsets {' '.join(f'{o:+.2f}' for o in offsets):28s} mean recall "
              f"{row['mean_recall']:.3f}; " + ", ".join(f"{name} {row[f'op_fpr_{name}']:.3f}/{row[f'op_recall_{name}']:.3f}"
                                                       for name in CONDITIONS), flush=True)
    chosen = max(rows, key=lambda r: (round(r["mean_recall"], 3), -len(r["edges"])))
    print(f"chosen: edges {chosen['edges']} (mean recall {chosen['mean_recall']:.3f}); per condition FPR/recall above")
    record["size_bands"] = {"target_fpr": args.target_fpr, "rows": rows, "chosen": chosen["edges"],
                            "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    RESULTS.write_text(json.dumps(record, indent=1))


def cmd_experts(args) -> None:
    """A second head for small images: per fold, an MLP trained only on the training images' views
    whose short side is under ``--edge`` (both classes), scoring the held-out views under the edge
    while the winner scores the rest; then the size offset at that edge and the operating point, as
    ``bands`` computes them. Out-of-fold; the same folds as the winner's."""
    record = json.loads(RESULTS.read_text())
    best = record["winner"]
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                    [best["train_views"], args.train_views])
    oof = arm_oof(args.cache, best, table, features)
    y = table["label"].to_numpy()
    w = group_weights(table["group"])
    sides = load_sides(table, args.cache, VIEWS)
    train_views = view_index(TRAIN_VIEWS[args.train_views])
    scan = view_index(SCAN_VIEWS)
    mixed = oof.copy()
    t0 = time.time()
    for train_idx, test_idx in folds(table):
        rows = [(features[i, [v for v in train_views if sides[i, v] < args.edge]], y[i], w[i]) for i in train_idx
                if any(sides[i, v] < args.edge for v in train_views)]
        expert = fit_mlp_probe([r[0] for r in rows], np.array([r[1] for r in rows]),
                               image_weights=np.array([r[2] for r in rows]))
        for k, v in enumerate(scan):
            small = test_idx[sides[test_idx, v] < args.edge]
            if len(small):
                mixed[small, k] = expert.logits(features[small, v])
        print(f"fold: expert trained on {len(rows)} images' small views", flush=True)
    del features
    scan_sides = sides[:, scan]
    out = {"edge": args.edge, "train_views": args.train_views, "seconds": round(time.time() - t0, 1)}
    for name, logits in (("winner", oof), ("with_expert", mixed)):
        offsets, shifted = with_size_offsets(table, logits, scan_sides, [args.edge], args.target_fpr)
        row = {"offsets": offsets, **operating_point(table, shifted, args.target_fpr)}
        for k, condition in enumerate(CONDITIONS):
            row[f"auc_{condition}"] = auc(y, shifted[:, k])
            row[f"auc_small_{condition}"] = auc(y[scan_sides[:, k] < args.edge], logits[scan_sides[:, k] < args.edge, k])
        row["mean_recall"] = float(np.mean([row[f"op_recall_{c}"] for c in CONDITIONS]))
        out[name] = row
        print(f"{name:12s} offsets {offsets[0]:+.2f}; mean recall {row['mean_recall']:.3f}; " + ", ".join(
            f"{c} FPR {row[f'op_fpr_{c}']:.3f} recall {row[f'op_recall_{c}']:.3f} AUC {row[f'auc_{c}']:.3f} "
            f"(small {row[f'auc_small_{c}']:.3f})" for c in CONDITIONS), flush=True)
    record.setdefault("experts", []).append({**out, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    RESULTS.write_text(json.dumps(record, indent=1))


def cmd_fit(args) -> None:
    record = json.loads(RESULTS.read_text())
    best = record["winner"]
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                    [best["train_views"]])
    y = table["label"].to_numpy()
    w = group_weights(table["group"])
    # out-of-fold scores of the winner (the operating point must come from unseen sources)
    oof = arm_oof(args.cache, best, table, features)
    real = y == 0
    sides = load_sides(table, args.cache)
    judged = sides >= args.min_side  # a view under the minimum gets no verdict (see NO_VERDICT)
    oof = np.where(judged, oof, NO_VERDICT)
    edges = args.size_edges if args.size_edges is not None else (record.get("size_bands") or {}).get("chosen", [])
    size_offsets = None
    if edges:
        offsets, oof = with_size_offsets(table, oof, sides, edges, args.target_fpr)
        size_offsets = {"edges": [float(e) for e in edges], "offsets": offsets}
        print("size offsets (short side below " + ", ".join(f"{e:g}" for e in edges) + " px, then above): "
              + ", ".join(f"{o:+.3f}" for o in offsets))
    per_condition = {name: oof[:, k] for k, name in enumerate(CONDITIONS)}
    points = strictest_thresholds([oof[real, k] for k in range(oof.shape[1])],
                                  sorted({*FPR_TARGETS, args.target_fpr}), w[real])
    k = len(CONDITIONS)
    seen = judged.T.ravel()  # the temperature is fitted on views that get a verdict
    calibration = fit_operating_point(np.tile(y, k)[seen], oof.T.ravel()[seen], target_fpr=args.target_fpr,
                                      points=points)
    for j, (name, s) in enumerate(per_condition.items()):
        fpr = float((s[real] >= calibration.threshold).mean())
        recall = float((s[~real] >= calibration.threshold).mean())
        print(f"out-of-fold, {name}: FPR {fpr:.3f}, recall {recall:.3f} at threshold {calibration.threshold:.3f}; "
              f"too small: {(~judged[real, j]).mean():.3f} of reals, {(~judged[~real, j]).mean():.3f} of generated")
    if args.dry_run:
        return
    feature = product_feature(best["features"])
    if args.tensors:  # only the operating point is refitted: the network is the given checkpoint's, unchanged
        state, meta = read_state_dict(args.tensors)
        kept = ProbeConfig(**meta["probe"])
        if kept.head != product_head(best["head"]) or kept.backbone.get("feature") != feature:
            raise SystemExit(f"{args.tensors}: a {kept.head} head on {kept.backbone.get('feature')}, not the winner's "
                             f"{product_head(best['head'])} on {feature}")
        probe = probe_from_state(kept.head, state)
    else:
        probe = fit_arm(features, y, w, best["train_views"], best["C"], best["head"])
    backbone = create_backbone(ENCODER, feature=feature)
    probe.config = replace(probe_config(ENCODER, backbone, views=1, view_mode="resize",
                                        head=product_head(best["head"])),
                           size_offsets=size_offsets, min_side=args.min_side)
    metadata = {
        "architecture": probe.config.architecture,
        "probe": probe.config.to_dict(),
        "config": {"campaign": "experiments/wild_probe.py", "train_views": list(TRAIN_VIEWS[best["train_views"]]),
                   "arrival_recipe": RECIPE.to_dict(), "closeup_recipe": CLOSEUP.to_dict(),
                   **({"thumbnail_recipe": THUMB.to_dict()} if "thumb" in best["train_views"] else {}),
                   "head": best["head"],
                   **({"mlp": mlp_recipe(best["head"])[0].to_dict()} if best["head"] != "linear" else {}),
                   "c": best["C"],
                   "group_weight_power": 0.5, "operating_point_conditions": list(CONDITIONS),
                   "feature": feature, "backbone": ENCODER},
        **({"tensors_from": {"file": str(args.tensors), "sha256": file_sha256(args.tensors)}} if args.tensors else {}),
        "data": {"pool": "data/splits/wild_pool.csv", "n_train": int(len(y)), "n_train_real": int(real.sum()),
                 "n_train_fake": int((~real).sum()), "sealed_test": "data/splits/wild_test.csv"},
        "cv": {key: best[key] for key in best if key.startswith(("auc_", "worst_", "op_")) or key == "score"},
        "c": best["C"],
        "calibration": calibration.to_dict(),
        "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(args.out, probe, metadata, dtype=None)
    record["operating_point"] = {"threshold": calibration.threshold, "temperature": calibration.temperature,
                                 "target_fpr": args.target_fpr, "size_offsets": size_offsets,
                                 "min_side": args.min_side}
    RESULTS.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}: features {feature}, train views {best['train_views']}, head {best['head']}, "
          f"C={best['C']}, one resized view, "
          f"threshold {calibration.threshold:.3f}, temperature {calibration.temperature:.3f}")


def cmd_sources(args) -> None:
    """Which real sources of the pool put photos over the shipped operating point, out of fold, under each
    condition: where the false positives that set the threshold come from."""
    record = json.loads(RESULTS.read_text())
    best, cal = record["winner"], record.get("operating_point") or {}
    table, features = load_features(pd.read_csv(SPLITS / "wild_pool.csv"), args.cache, best["features"],
                                    [best["train_views"]])
    logits = arm_oof(args.cache, best, table, features)
    del features
    sides = load_sides(table, args.cache)
    if cal.get("size_offsets"):
        logits = logits - band_offsets(sides, cal["size_offsets"]["edges"], cal["size_offsets"]["offsets"])
    logits = np.where(sides >= cal.get("min_side", 0), logits, NO_VERDICT)
    real = (table["label"] == 0).to_numpy()
    over = pd.DataFrame(logits[real] >= cal.get("threshold", 0.0), columns=list(CONDITIONS))
    counts = over.groupby(table.loc[real, "group"].to_numpy()).sum()
    counts.insert(0, "photos", table.loc[real].groupby("group").size())
    counts["all"] = counts[list(CONDITIONS)].sum(axis=1)
    counts = counts.sort_values("all", ascending=False)
    print(f"real photos over the threshold ({cal.get('threshold', 0.0):.3f}, offsets taken off), out of fold, "
          f"per source; {int((counts['all'] > 0).sum())} of {len(counts)} sources have at least one")
    print(counts.head(args.top).to_string())
    stored = counts["stored"] / counts["photos"]  # each source's own false-positive rate as stored
    print("as stored, share of each source's photos called generated: median "
          + f"{stored.median():.3f}; " + ", ".join(f"over {t:.0%}: {int((stored > t).sum())} sources"
                                                   for t in (0.05, 0.10, 0.25))
          + "; highest: " + ", ".join(f"{g} {r:.3f} of {int(counts.loc[g, 'photos'])}"
                                      for g, r in stored.sort_values(ascending=False).head(5).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("manifests", nargs="+")
    p.add_argument("--cap", type=int, default=50, help="images per group of the pool at most")
    p.add_argument("--test-cap", type=int, default=15, help="images per group of the sealed test split at most")
    for name in ("cv", "fit", "resnet", "bands", "experts", "sources"):
        p = sub.add_parser(name)
        p.add_argument("--cache", default="../shared-features/wild")
        if name == "cv":
            p.add_argument("--features", nargs="+", default=["cls-5,7,9,11"],
                           help="feature sets KIND-I,J,... (KIND cls, tokens or cls+tokens; blocks 0-11)")
            p.add_argument("--train-views", nargs="+", default=["stored+arrival"], choices=sorted(TRAIN_VIEWS))
            p.add_argument("--heads", nargs="+", default=["linear"], choices=HEADS)
            p.add_argument("--c", nargs="+", type=float, default=[0.001], help="the linear head's C values")
            p.add_argument("--refit", action="store_true",
                           help="fit every arm again even when its out-of-fold logits for this pool are saved")
        if name == "sources":
            p.add_argument("--top", type=int, default=15, help="sources shown")
        if name == "resnet":
            p.add_argument("-n", type=int, default=300, help="images scored (half real, half generated)")
        if name in ("fit", "bands", "experts"):
            p.add_argument("--target-fpr", type=float, default=0.05)
        if name == "experts":
            p.add_argument("--edge", type=float, default=320.0, help="short side (px) under which the expert scores")
            p.add_argument("--train-views", default="stored+arrival+closeup", choices=sorted(TRAIN_VIEWS))
        if name == "fit":
            p.add_argument("--out", default="weights/clip_probe_vitb16.safetensors")
            p.add_argument("--size-edges", nargs="*", type=float, default=None,
                           help="short sides (px) that bound the bands of the size offsets (default: those `bands` "
                                "chose; given with no value: no offsets)")
            p.add_argument("--dry-run", action="store_true", help="print the operating point; write nothing")
            p.add_argument("--min-side", type=int, default=0,
                           help="images whose short side is under this get no verdict (stored with the weights); "
                                "campaign 10 tried 64 px, the data engine's floor, and did not ship it")
            p.add_argument("--tensors", default=None,
                           help="keep this probe checkpoint's network and refit only the operating point")
    args = parser.parse_args(argv)
    {"split": cmd_split, "cv": cmd_cv, "fit": cmd_fit, "resnet": cmd_resnet, "bands": cmd_bands,
     "experts": cmd_experts, "sources": cmd_sources}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
