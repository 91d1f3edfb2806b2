"""Arms of the no-downsample ResNet training campaign (issue #9, item 6): train each, choose on val, report test.

Each arm is one ``detector train`` command on ``data/splits/train.csv`` (validation:
``data/splits/val.csv``, the training loop's own protocol: 4 crops of 128 px per image, AUC of the
mean logit) under the same wall-clock budget on this CPU, so that the comparison is per CPU minute,
the currency of a CPU-only project. The best checkpoint (highest val AUC) of each arm is then scored
on the sealed test split by ``detector evaluate`` under two conditions, one 256 px centre patch per
image: JPEG-aligned (both classes re-encoded at quality 90 in memory) and PNG-only (only the PNG
files of both classes, pixels as stored). Results go to ``experiments/resnet_arms.json``.

    .venv/bin/python experiments/resnet_arms.py [--arms NAME,...] [--minutes-r18 6 --minutes-r50 10]

Twins (arm f) are made first if missing, from the training reals of at most 4 MP (``detector
make-fakes``); the AutoGAN simulator with ``detector simulate``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

import pandas as pd

from probe_arms import auc_rows  # this folder is on sys.path when the script runs

OUT = Path("runs/arms")
RESULTS = (Path(__file__).resolve().parent / "resnet_arms.json")
DET = ".venv/bin/detector"
COMMON = ["--val", "data/splits/val.csv", "--lr", "5e-4", "--precision", "bf16", "--lr-patience", "4", "--patience", "10", "--threads", "2"]
GRIP_AUG: list[str] = []  # the defaults: blur p=0.5 sigma 0-3, JPEG p=0.5 quality 30-100 (Wang et al. 2020)
MILD_AUG = ["--blur-p", "0.2", "--blur-sigma", "0,1", "--jpeg-p", "0.2", "--jpeg-quality", "75,100"]
R18 = ["--arch", "resnet18nodown"]
R50 = ["--arch", "resnet50nodown"]
ARMS: dict[str, dict] = {
    "b-r18-64": dict(args=R18 + ["--crop-size", "64", "--batch-size", "32"], big=False),
    "a-r50-64": dict(args=R50 + ["--crop-size", "64", "--batch-size", "32"], big=True),
    "g-r50-64-bundled": dict(args=R50 + ["--crop-size", "64", "--batch-size", "32", "--init",
                                         "weights/resnet50nodown_dev.safetensors"], big=True),
    "c-r18-128": dict(args=R18 + ["--crop-size", "128", "--batch-size", "16", "--steps-per-epoch", "25"], big=False),
    "c-r18-256": dict(args=R18 + ["--crop-size", "256", "--batch-size", "8", "--steps-per-epoch", "12"], big=False),
    "d-r18-64-mild": dict(args=R18 + ["--crop-size", "64", "--batch-size", "32"] + MILD_AUG, big=False),
    "e-r18-64-npr": dict(args=["--arch", "resnet18nodown_npr", "--crop-size", "64", "--batch-size", "32"], big=False),
    "f-r18-64-tae": dict(args=R18 + ["--crop-size", "64", "--batch-size", "32"], big=False, twins="tae"),
    "f-r18-64-autogan": dict(args=R18 + ["--crop-size", "64", "--batch-size", "32"], big=False, twins="autogan"),
    # The winner on validation (a), trained as long as validation keeps improving (patience 3
    # epochs; resumable with the same command), with the 75 collected camera photos
    # (data/collect_photos.py) added to its reals.
    "long-a-r50-64-photos": dict(args=R50 + ["--crop-size", "64", "--batch-size", "32", "--lr-patience", "2",
                                             "--patience", "3"], big=True,
                                 extra_train=["../shared-photos/manifest.csv"]),
}


def run(cmd: list[str], log: Path | None = None) -> float:
    """Run a command (output to ``log``), fail loudly, return its wall seconds."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") if log else open("/dev/null", "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.time() - t0


def absolute_table(csv: str, keep=None) -> pd.DataFrame:
    """A split manifest with absolute paths (so that it can be written anywhere)."""
    t = pd.read_csv(csv)
    t["path"] = [str((Path(csv).parent / p).resolve()) for p in t["path"]]
    return t if keep is None else t[keep(t)].reset_index(drop=True)


def twins_manifest(method: str) -> Path:
    """Training manifest = train split + aligned twins of its reals of at most 4 MP (made once)."""
    out = OUT / f"train+{method}.csv"
    if out.exists():
        return out
    reals = absolute_table("data/splits/train.csv", lambda t: (t.label == 0) & (t.width * t.height <= 4_000_000))
    src = OUT / "twin_sources.csv"
    reals.to_csv(src, index=False)
    tw = OUT / f"twins-{method}"
    cmd = [DET, "make-fakes", str(src), "--method", method, "-o", str(tw), "-q"]
    if method == "autogan":
        sim = OUT / "simulator.safetensors"
        if not sim.exists():
            secs = run([DET, "simulate", "--train", str(src), "-o", str(sim)], OUT / "simulate.log")
            (OUT / "simulate.seconds").write_text(f"{secs:.0f}\n")
        cmd += ["--simulator", str(sim)]
    secs = run(cmd, OUT / f"make-fakes-{method}.log")
    (OUT / f"make-fakes-{method}.seconds").write_text(f"{secs:.0f}\n")
    m = pd.read_csv(tw / "manifest.csv")
    m = m[m.label == 1].copy()
    m["path"] = [str((tw / p).resolve()) for p in m["path"]]
    m["pair"] = [str((tw / p).resolve()) for p in m["pair"]]
    train = absolute_table("data/splits/train.csv")
    pd.concat([train, m], ignore_index=True).to_csv(out, index=False)
    return out


def evaluate(weights: Path, name: str) -> dict:
    """Test AUCs of one checkpoint, JPEG-aligned and PNG-only, one centre patch of 256 px per image."""
    tests = {"aligned": (absolute_table("data/splits/test.csv"), ["--align-jpeg", "90"]),
             "png_only": (absolute_table("data/splits/test.csv", lambda t: t.format == "PNG"), [])}
    out = {}
    for cond, (table, extra) in tests.items():
        csv = OUT / f"test_{cond}.csv"
        table.to_csv(csv, index=False)
        d = OUT / name / f"eval_{cond}"
        secs = run([DET, "evaluate", str(csv), "--weights", str(weights), "-o", str(d), "--center-crop", "256",
                    "--num-patches", "1", "-q"] + extra, OUT / name / f"eval_{cond}.log")
        scores = pd.read_csv(d / "scores.csv")
        col = [c for c in scores.columns if c.startswith("logit_")][0]
        scores = scores[scores[col].notna()].reset_index(drop=True)
        out[cond] = auc_rows(scores, scores[col].to_numpy(float))
        out[cond]["eval_seconds"] = secs
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--minutes-r18", type=float, default=6.0)
    parser.add_argument("--minutes-r50", type=float, default=10.0)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.arms.split(","):
        arm = ARMS[name]
        train = twins_manifest(arm["twins"]) if "twins" in arm else Path("data/splits/train.csv")
        minutes = args.minutes_r50 if arm["big"] else args.minutes_r18
        spe = [] if "--steps-per-epoch" in arm["args"] else ["--steps-per-epoch", "50"]
        extra = [a for path in arm.get("extra_train", []) for a in ("--train", path)]
        cmd = [DET, "train", "--train", str(train), *extra, "--output-dir", str(OUT / name), *COMMON, *spe,
               *arm["args"], "--max-minutes", f"{minutes:g}"]
        resume = (OUT / name / "last.safetensors").exists()
        secs = run(cmd + (["--resume"] if resume else []), OUT / f"{name}.train.log")
        hist = pd.read_csv(OUT / name / "history.csv")
        best = hist.loc[hist["val_auc"].idxmax()]
        row = {"command": shlex.join(cmd), "train_wall_minutes": secs / 60, "steps": int(hist["step"].max()),
               "best_step": int(best["step"]), "val_auc": float(best["val_auc"]),
               "val_auc_last": float(hist["val_auc"].iloc[-1]),
               "test": evaluate(OUT / name / "best.safetensors", name)}
        results[name] = row
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
        t = row["test"]
        print(f"{name}: val {row['val_auc']:.3f} (step {row['best_step']}/{row['steps']}) | test aligned "
              f"{t['aligned']['all']['auc']:.3f} png-only {t['png_only']['all']['auc']:.3f} "
              f"({row['train_wall_minutes']:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
