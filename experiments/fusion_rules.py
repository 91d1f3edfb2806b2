"""Each model alone and each fusion rule, from the raw scores a `detector evaluate` run wrote.

Reads ``EVAL_DIR/scores.csv`` (one raw ``logit_<name>`` column per model, computed once) and the
calibrations stored in the checkpoints given now, and writes the metrics of every fusion rule to
``EVAL_DIR/rules/<rule>/`` with :func:`detector.evaluation.evaluate_scores`, printing the summary
rows. The checkpoints must hold the tensors that produced the scores (a recalibrated copy does:
``detector calibrate`` changes only the metadata); this is checked through the evaluation's
``run.json`` (or, for a model scored by its int8 export, the export's recorded source)::

    .venv/bin/python experiments/fusion_rules.py runs/eval/val \
        weights/resnet50nodown_dev.safetensors weights/clip_probe_vitb16.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from detector.checkpoints import CheckpointInfo, file_sha256, read_metadata, tensors_sha256
from detector.evaluation import EvalOptions, ModelSpec, evaluate_scores

RULES = ("mean", "soft-or", "max")


def main(folder: str, checkpoints: list[str]) -> None:
    run = json.loads((Path(folder) / "run.json").read_text())
    scores = pd.read_csv(Path(folder) / "scores.csv")
    recorded = {m["name"]: m for m in run["models"] if m["name"] != "fused"}
    models = []
    for path in checkpoints:
        name = Path(path).stem
        digest = tensors_sha256(path)
        exported_from = recorded[name].get("source_sha256")  # scored by its int8 export (precision auto)
        if recorded[name].get("tensors_sha256", digest) != digest and exported_from != file_sha256(path):
            sys.exit(f"{path}: its tensors are not the ones that scored {folder}")
        info = CheckpointInfo(path=path, sha256="", metadata=read_metadata(path))
        models.append(ModelSpec(name, threshold=info.threshold, temperature=info.temperature))
    base = run["settings"]
    for rule in RULES:
        options = EvalOptions(model_fusion=rule, n_boot=base.get("n_boot", 1000), seed=base.get("seed", 0),
                              align_jpeg=base.get("align_jpeg"), center_crop=base.get("center_crop"))
        result = evaluate_scores(scores, models, Path(folder) / "rules" / rule, options,
                                 record={"from": folder, "checkpoints": checkpoints})
        m = result.metrics
        rows = m[(m["group"].isin(["all", "average"])) & m["metric"].isin(["auc", "auc_low", "auc_high",
                                                                                 "balanced_acc", "acc_real", "acc_fake"])]
        table = rows.pivot_table(index=["group", "model"], columns="metric", values="value")
        print(f"--- rule {rule} ({folder})")
        print(table.round(3).to_string())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
