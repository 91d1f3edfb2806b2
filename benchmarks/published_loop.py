"""The baseline of `make bench`: the one-image-at-a-time loop of GRIP's published `main.py`.

Run as a process of its own and timed from start to exit by benchmarks/scan_speed.py, as issue
#12 specifies it: build the model, load the weights, then for each file open it with PIL,
convert to RGB, ToTensor + ImageNet Normalize, unsqueeze, forward in fp32 NCHW at batch 1 with
torch's default threads and allocator, append the logit. No batching, no workers, no tuning.

    .venv/bin/python benchmarks/published_loop.py WEIGHTS FOLDER OUT.json

Writes ``{"logits": {path: logit}}``; the model is this project's builder of the same
architecture, loaded from the same weights file the scan uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(weights: str, folder: str, out: str) -> None:
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from detector.checkpoints import load_model

    model, _ = load_model(weights)  # fp32, eval, NCHW: as the published script builds it
    transform = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    logits = {}
    with torch.no_grad():
        for path in sorted(Path(folder).iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            logits[str(path.resolve())] = float(model(x).squeeze())
    Path(out).write_text(json.dumps({"logits": logits}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
