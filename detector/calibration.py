"""Reading a logit: the calibrated margin, probability and label, and the :class:`Verdict` that
carries them out of every detector.

The calibration itself (temperature, threshold, operating points) is stored with the weights and
read by :class:`~detector.checkpoints.CheckpointInfo`; fitting it is :mod:`detector.training.calibration`.
Every detector mixes in :class:`CalibratedVerdicts`, so ``label`` is ``fake`` exactly when
``probability >= 0.5``, whatever the model. A detector with a minimum image size (a probe's
``min_side``) gives an image under it the third label, :data:`TOO_SMALL`, and no probability: too
little to judge, neither called generated nor cleared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .checkpoints import CheckpointInfo
from .metrics import sigmoid

__all__ = ["LABELS", "TOO_SMALL", "CalibratedVerdicts", "Verdict"]

# the label of an image under the detector's minimum size: no verdict, no probability
TOO_SMALL = "too small"
LABELS = ("real", "fake", TOO_SMALL)


@dataclass
class Verdict:
    """One image's result, from any detector (see :func:`detector.load`).

    ``logit`` is the model's raw logit, or for a model set the fused calibrated logit (0 is the
    decision point); ``probability`` is the calibrated probability that the image is generated and
    ``label`` is ``fake`` exactly when it is at least 0.5; for an image under the detector's minimum
    size, ``label`` is :data:`TOO_SMALL` and ``probability`` NaN (the logit is kept). ``members`` holds each computed member's
    own verdict (empty for a single model). ``logit_map`` is the map of the model named by
    ``map_model`` (a convolutional one), or None.
    """

    logit: float
    probability: float
    label: str
    members: dict[str, "Verdict"] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    n_patches: int = 0
    logit_map: np.ndarray | None = None
    map_model: str | None = None

    @property
    def is_fake(self) -> bool:
        return self.label == "fake"

    @property
    def judged(self) -> bool:
        """False for an image too small to judge (no probability)."""
        return self.label != TOO_SMALL


class CalibratedVerdicts:
    """Probabilities and labels from the calibration stored with the weights (``self.info``)."""

    info: CheckpointInfo | None
    # the shortest side, in px, of an image given a verdict (0: any size the scan accepts)
    min_side: int = 0

    def judges(self, width: int | None, height: int | None) -> bool:
        """Whether an image of this size gets a verdict (an unknown size does)."""
        return width is None or height is None or min(width, height) >= self.min_side

    @property
    def temperature(self) -> float:
        return self.info.temperature if self.info else 1.0

    @property
    def threshold(self) -> float:
        return self.info.threshold if self.info else 0.0

    def margin(self, logit: float) -> float:
        """The calibrated logit: positive exactly where the model says generated."""
        return self.info.margin(logit) if self.info else float(logit)

    def probability(self, logit: float) -> float:
        """Calibrated probability that the image is generated (see :meth:`CheckpointInfo.probability`)."""
        return self.info.probability(logit) if self.info else float(sigmoid(logit))

    def label(self, logit: float) -> str:
        """``fake`` exactly when the calibrated probability is at least 0.5."""
        return "fake" if self.probability(logit) >= 0.5 else "real"

    def verdict(self, logit: float, **extra) -> Verdict:
        """The verdict of a raw ``logit`` (``extra``: size, map and the like): :data:`TOO_SMALL` with no
        probability when ``extra``'s width and height are under :attr:`min_side`. A non-finite logit is
        an error: it would otherwise read as a verdict."""
        if not math.isfinite(logit):
            raise FloatingPointError(f"the model gave a non-finite score ({logit})")
        if not self.judges(extra.get("width"), extra.get("height")):
            return Verdict(logit=float(logit), probability=math.nan, label=TOO_SMALL, **extra)
        return Verdict(logit=float(logit), probability=self.probability(logit), label=self.label(logit), **extra)
