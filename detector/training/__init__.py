"""Training: the augmentation recipe, the loop, calibration."""

from .calibration import Calibration, fit_calibration
from .loop import TrainConfig, train
from .recipe import Recipe, augment

__all__ = ["Calibration", "Recipe", "TrainConfig", "augment", "fit_calibration", "train"]
