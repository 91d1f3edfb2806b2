"""Print the Markdown tables of experiments/EXPERIMENTS.md from the experiments' own result files.

Every figure in EXPERIMENTS.md comes from this script's output, which reads only what the
experiment commands wrote (``probe_arms.json``, ``floor_spectrum.json`` and the ``metrics.csv`` of
``detector evaluate`` runs)::

    .venv/bin/python experiments/tables.py [EVAL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
COLUMNS = ("n_real", "n_fake", "auc", "auc_low", "auc_high", "balanced_acc", "acc_real", "acc_fake", "ece")


def _cell(row: dict) -> str:
    return f"{row['auc']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def probe_arms() -> None:
    path = HERE / "probe_arms.json"
    if not path.exists():
        return
    arms = json.loads(path.read_text())
    print("| arm | feature | views | view mode | train JPEG | C | CPU min | val AUC | test AUC stored | "
          "test AUC JPEG-aligned | test AUC PNG-only |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in arms.items():
        a, t = r["arm"], r["test"]
        print(f"| {name} | {a['feature']} | {a['views']} | {a['view_mode']} | {a.get('align_jpeg') or 'as stored'} | "
              f"{r['c']:g} | {r['train_cpu_minutes']:.1f} | {r['val_auc']:.3f} | {_cell(t['stored']['all'])} | "
              f"{_cell(t['aligned']['all'])} | {_cell(t['png_only']['all'])} |")
    print()
    for name, r in arms.items():
        t = r["test"]
        keys = [k for k in t["stored"] if k.startswith(("real:", "gen:"))]
        print(f"**{name}**, test AUC per real-photo source (all test fakes against it) and per generator "
              f"(its fakes against all test reals):\n")
        print("| group | reals | fakes | stored | JPEG-aligned |")
        print("|---|---|---|---|---|")
        for k in keys:
            s, al = t["stored"][k], t["aligned"][k]
            print(f"| {k} | {s['n_real']} | {s['n_fake']} | {_cell(s)} | {_cell(al)} |")
        print()


def resnet_arms() -> None:
    path = HERE / "resnet_arms.json"
    if not path.exists():
        return
    arms = json.loads(path.read_text())
    print("| arm | wall min | steps (best at) | val AUC (best epoch) | test AUC JPEG-aligned | test AUC PNG-only |")
    print("|---|---|---|---|---|---|")
    for name, r in arms.items():
        t = r["test"]
        print(f"| {name} | {r['train_wall_minutes']:.1f} | {r['steps']} ({r['best_step']}) | {r['val_auc']:.3f} | "
              f"{_cell(t['aligned']['all'])} | {_cell(t['png_only']['all'])} |")
    print()
    print("Commands:\n")
    print("```sh")
    for name, r in arms.items():
        print(f"# {name}\n{r['command']}")
    print("```\n")
    keys = sorted({k for r in arms.values() for k in r["test"]["aligned"] if k.startswith(("real:", "gen:"))})
    print("Test AUC per real-photo source (all test fakes against it) and per generator (its fakes against all "
          "test reals), JPEG-aligned / PNG-only (counts are the JPEG-aligned ones; PNG-only keeps the 97 PNG reals and all 157 fakes):\n")
    print("| group | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for k in keys:
        cells = []
        for r in arms.values():
            a, p = r["test"]["aligned"].get(k), r["test"]["png_only"].get(k)
            cells.append(" / ".join(f"{c['auc']:.2f}" if c else "-" for c in (a, p)))
        a0 = next(r["test"]["aligned"][k] for r in arms.values() if k in r["test"]["aligned"])
        print(f"| {k} ({a0['n_real']} r, {a0['n_fake']} f) | " + " | ".join(cells) + " |")
    print()


def floor() -> None:
    path = HERE / "floor_spectrum.json"
    if not path.exists():
        return
    r = json.loads(path.read_text())
    print(f"Floor (h): C={r['c']:g}, val AUC {r['val_auc']:.3f}, test AUC (JPEG-aligned) {r['test_aligned_auc']:.3f} "
          f"[{r['test_lo']:.3f}, {r['test_hi']:.3f}] on {r['n_test_real']} real / {r['n_test_fake']} generated, "
          f"{r['cpu_minutes']:.1f} CPU min")
    print()
    print("| real source | reals | AUC |")
    print("|---|---|---|")
    for source, v in r["test_per_real_source"].items():
        print(f"| {source} | {v['n_real']} | {v['auc']:.3f} |")
    print()


def evaluations(folders: list[str]) -> None:
    for folder in folders:
        metrics = pd.read_csv(Path(folder) / "metrics.csv")
        wide = metrics.pivot_table(index=["group", "model"], columns="metric", values="value", aggfunc="first")
        cols = [c for c in COLUMNS if c in wide]
        print(f"**{folder}**\n")
        print("| group | model | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for (group, model), row in wide[cols].iterrows():
            cells = [f"{int(row[c])}" if c.startswith("n_") else f"{row[c]:.3f}" for c in cols]
            print(f"| {group} | {model} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    probe_arms()
    resnet_arms()
    floor()
    evaluations(sys.argv[1:])
