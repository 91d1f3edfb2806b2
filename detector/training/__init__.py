"""Training: the augmentation recipe, the loop, calibration."""

from .calibration import Calibration, fit_calibration
from .loop import TrainConfig, train
from .recipe import Recipe, augment
from .simulator import load_simulator, simulate, train_simulator

__all__ = ["Calibration", "Recipe", "TrainConfig", "augment", "fit_calibration", "load_simulator", "simulate", "train",
           "train_simulator"]
