"""Training: the augmentation recipe, the loop, calibration, simulated and aligned fakes."""

from .calibration import Calibration, fit_calibration
from .loop import TrainConfig, train
from .recipe import Recipe, augment
from .simulator import load_simulator, simulate, train_simulator
from .twins import TAEF2, TwinMaker, load_tae, make_fakes, twin_maker

__all__ = ["TAEF2", "Calibration", "Recipe", "TrainConfig", "TwinMaker", "augment", "fit_calibration", "load_simulator",
           "load_tae", "make_fakes", "simulate", "train", "train_simulator", "twin_maker"]
