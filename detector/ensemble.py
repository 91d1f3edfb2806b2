"""The detector you hold: one or more models with their say in the verdict (:class:`Ensemble`).

Whatever :func:`detector.load` reads (a checkpoint, a probe, an export folder or a model-set
JSON) comes back as an :class:`Ensemble`, so every detector has one interface in the spirit of
scikit-learn's estimators: :meth:`~Ensemble.predict` (one image to a
:class:`~detector.calibration.Verdict`), :meth:`~Ensemble.predict_many`,
:meth:`~Ensemble.decision_function` (calibrated margins, positive means generated),
:meth:`~Ensemble.describe` and :meth:`~Ensemble.transforms` (the preprocessing that travels with
the models). A single model is a set of one, whose verdict is its own.

Members are fused on their calibrated margins (:func:`detector.fusion.fuse_margins`) with their
weights; a member of weight 0 is computed and reported only when asked for at load time. An image
under a voting member's minimum size gets the set's verdict ``too small``, with no probability.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterable, Sequence

import numpy as np

from .calibration import TOO_SMALL, Verdict
from .fusion import MODEL_FUSION_RULES, fuse_margins
from .images import DEFAULT_MAX_PIXELS, as_pixels
from .inference import Detector
from .metrics import sigmoid
from .patches import PatchSettings
from .scoring import Preparation, score_stream

__all__ = ["Ensemble"]

# what predict accepts: a path (str or os.PathLike), a detector.images.DecodedImage or RGB uint8 pixels
ImageLike = object


class Ensemble:
    """Several detectors that decide together, or one alone.

    At most one member is a convolutional :class:`~detector.inference.Detector` (scanned patch by
    patch); the others are probes that score their own views. ``weights`` (one per member, >= 0,
    not all 0; default equal) are the members' say; a member of weight 0 is reported beside the
    verdict but does not decide.
    """

    def __init__(self, members: list, names: list[str], rule: str = "mean", weights: list[float] | None = None,
                 *, source: str | None = None) -> None:
        if not members or len(members) != len(names) or len(set(names)) != len(names):
            raise ValueError("an ensemble needs one distinct name per member and at least one member")
        if weights is not None and (len(weights) != len(members) or min(weights) < 0 or not any(weights)):
            raise ValueError(f"an ensemble needs one weight >= 0 per member, not all 0; got {weights}")
        if sum(isinstance(m, Detector) for m in members) > 1:
            raise ValueError("an ensemble holds at most one convolutional detector")
        if rule not in MODEL_FUSION_RULES:
            raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {rule!r}")
        self.members, self.names, self.rule = list(members), list(names), rule
        self.weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        self.source = source  # the model-set file or checkpoint it was loaded from, for the record

    # --- what it holds ---
    @property
    def conv(self) -> Detector | None:
        """The convolutional member, if any."""
        return next((m for m in self.members if isinstance(m, Detector)), None)

    @property
    def device(self):
        return self.members[0].device

    @property
    def voting(self) -> list[str]:
        """Names of the members that decide (weight > 0)."""
        return [n for n, w in zip(self.names, self.weights) if w > 0]

    @property
    def min_side(self) -> int:
        """The shortest side, in px, of an image this set gives a verdict: the largest of its voting
        members' (smaller images are labelled ``too small``)."""
        return max((m.min_side for m, w in zip(self.members, self.weights) if w > 0), default=0)

    def at_fpr(self, rate: float) -> "Ensemble":
        """This set with every voting member's threshold moved to false-positive rate ``rate`` (see
        :meth:`detector.checkpoints.CheckpointInfo.at_fpr`); raises ``CheckpointError`` when a member
        has no operating points, ``ValueError`` when it has no calibration at all."""
        for member, weight in zip(self.members, self.weights):
            if weight > 0:
                if member.info is None:
                    raise ValueError("a target false-positive rate needs weights with a calibration")
                member.info = member.info.at_fpr(rate)
        return self

    # --- preprocessing ---
    def transforms(self, patches: PatchSettings = PatchSettings(), *, thumbnail: bool = False) -> Preparation:
        """The preprocessing of this set: pixels to the crops and views its members score (picklable,
        so decode workers can run it)."""
        conv = self.conv
        specs = tuple((m.backbone.config.input_size, m.config.views, m.config.view_mode)
                      for m in self.members if m is not conv)
        return Preparation(conv.resolve_settings(patches) if conv else None, specs, thumbnail=thumbnail and conv is not None)

    # --- verdicts ---
    def combine(self, logits: Sequence[float], **extra) -> Verdict:
        """The verdict of one image from its members' raw logits (in member order). ``extra``: size,
        number of crops and the convolutional member's logit map (kept only if that member votes).
        Raises ``FloatingPointError`` naming the member whose score is not finite."""
        logit_map = extra.pop("logit_map", None)
        size = {k: extra[k] for k in ("width", "height") if k in extra}
        own = {}
        for name, member, z in zip(self.names, self.members, logits):
            try:
                own[name] = member.verdict(z, **size)
            except FloatingPointError as err:
                raise FloatingPointError(f"{name}: {err}") from None
        conv = self.conv
        drawn = next((n for n, m, w in zip(self.names, self.members, self.weights) if m is conv and w > 0), None)
        maps = {"logit_map": logit_map, "map_model": drawn} if drawn and logit_map is not None else {}
        if len(self.members) == 1:
            single = own[self.names[0]]
            return Verdict(single.logit, single.probability, single.label, **maps, **extra)
        margins = np.array([[m.margin(z) for m, z in zip(self.members, logits)]])
        fused = float(fuse_margins(margins, self.rule, weights=self.weights)[0])
        if any(own[n].label == TOO_SMALL for n, w in zip(self.names, self.weights) if w > 0):
            return Verdict(fused, math.nan, TOO_SMALL, members=own, **maps, **extra)
        probability = float(sigmoid(fused))
        return Verdict(fused, probability, "fake" if probability >= 0.5 else "real", members=own, **maps, **extra)

    def predict_many(self, images: Iterable[ImageLike], patches: PatchSettings = PatchSettings(), *,
                     fusion: str = "mean", batch_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Verdict]:
        """Verdicts of several images (paths, decoded images or RGB uint8 arrays), scored in batches.
        An unreadable image raises :class:`~detector.images.ImageError`; use ``detector.scan`` to
        get error rows instead."""
        prepare = self.transforms(patches)
        items = ({**prepare(as_pixels(image, max_pixels)), "index": i} for i, image in enumerate(images))
        verdicts = []
        for scored in score_stream(self, items, batch_size=batch_size, mode=patches.mode, fusion=fusion):
            if scored.verdict is None:
                raise FloatingPointError(f"image {scored.item['index']}: {scored.error}")
            verdicts.append(scored.verdict)
        return verdicts

    def predict(self, image: ImageLike, patches: PatchSettings = PatchSettings(), *, fusion: str = "mean",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Verdict:
        """The verdict of one image (a path, ``~`` expanded; a decoded image; or RGB uint8 pixels)."""
        return self.predict_many([image], patches, fusion=fusion, max_pixels=max_pixels)[0]

    def decision_function(self, images: Iterable[ImageLike], patches: PatchSettings = PatchSettings(), *,
                          fusion: str = "mean") -> np.ndarray:
        """Calibrated margins ``(n,)``: positive exactly where the verdict is "fake" (rank by them)."""
        verdicts = self.predict_many(images, patches, fusion=fusion)
        if len(self.members) == 1:
            return np.array([self.members[0].margin(v.logit) for v in verdicts])
        return np.array([v.logit for v in verdicts])

    # --- the record ---
    def describe(self) -> dict:
        """What produces the verdicts: recorded next to every output, and the key a resumed scan
        must match. A single model describes itself; a set lists every member with its weight and
        calibration, and ``weights_sha256`` digests them all with the rule."""
        if len(self.members) == 1:
            return {**self.members[0].describe(), "weight": self.weights[0]}
        members = {n: {**m.describe(), "weight": w} for n, m, w in zip(self.names, self.members, self.weights)}
        key = [[d.get("weights_sha256"), d["weight"], d.get("threshold"), d.get("temperature")] for d in members.values()]
        digest = hashlib.sha256(json.dumps([key, self.rule]).encode()).hexdigest()
        return {"architecture": "model-set", "weights": self.source or "model set", "weights_sha256": digest,
                "fusion": self.rule, "voting": self.voting, "members": members,
                "precision": "+".join(str(m.precision) for m in self.members), "threshold": 0.0, "temperature": 1.0,
                "min_side": self.min_side,
                "device": str(self.device)}
