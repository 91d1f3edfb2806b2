"""detector: tell AI-generated images from real photographs.

The public API; the command line (:mod:`detector.cli`) is a thin layer over it::

    import detector
    model = detector.load()                 # the bundled default; or load("weights.safetensors" / "set.json")
    verdict = model.predict("photo.jpg")
    print(verdict.probability, verdict.label, verdict.members)

The names below are imported on first use (PEP 562), not with the package: ``detector --help``
and the report commands then start without loading torch, pandas or scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "checkpoints",
    "load_model": "checkpoints",
    "save_checkpoint": "checkpoints",
    "read_labelled": "datasets",
    "EvalOptions": "evaluation",
    "evaluate": "evaluation",
    "ExportOptions": "export",
    "export_model": "export",
    "load_exported": "export",
    "ImageError": "images",
    "decode_image": "images",
    "find_images": "images",
    "Detector": "inference",
    "Ensemble": "ensemble",
    "Verdict": "calibration",
    "load": "hub",
    "Prediction": "inference",
    "create_model": "models",
    "list_models": "models",
    "PatchSettings": "patches",
    "Finding": "provenance",
    "read_provenance": "provenance",
    "default_weights_path": "resources",
    "ScanOptions": "scanning",
    "scan": "scanning",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .checkpoints import CheckpointError, load_model, save_checkpoint
    from .datasets import read_labelled
    from .evaluation import EvalOptions, evaluate
    from .export import ExportOptions, export_model, load_exported
    from .images import ImageError, decode_image, find_images
    from .calibration import Verdict
    from .ensemble import Ensemble
    from .hub import load
    from .inference import Detector, Prediction
    from .models import create_model, list_models
    from .patches import PatchSettings
    from .provenance import Finding, read_provenance
    from .resources import default_weights_path
    from .scanning import ScanOptions, scan
