"""detector: tell AI-generated images from real photographs.

The public API; the command line (:mod:`detector.cli`) is a thin layer over it::

    from detector import Detector
    det = Detector.from_checkpoint("weights/resnet50nodown_dev.safetensors")
    pred = det.predict("photo.jpg")
    print(pred.probability, pred.label, pred.logit_map.shape)
"""

from .checkpoints import CheckpointError, load_model, save_checkpoint
from .datasets import read_labelled
from .evaluation import EvalOptions, evaluate
from .images import ImageError, decode_image, find_images
from .inference import Detector, Prediction
from .models import create_model, list_models
from .patches import PatchSettings
from .scanning import ScanOptions, scan

__all__ = [
    "CheckpointError",
    "Detector",
    "EvalOptions",
    "ImageError",
    "PatchSettings",
    "Prediction",
    "ScanOptions",
    "create_model",
    "decode_image",
    "evaluate",
    "find_images",
    "list_models",
    "load_model",
    "read_labelled",
    "save_checkpoint",
    "scan",
]
__version__ = "0.1.0"
