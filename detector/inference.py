"""The :class:`Detector`: a loaded model on a device, at a precision, turning pixels into logits.

Preprocessing comes from the model's :class:`~detector.models.ModelConfig` (mean/std, output
stride), never from a copy. Crops of the same shape, from one image or many, are scored in one
batch (:meth:`Detector.crop_maps`); :meth:`Detector.predict` is the one-image API.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
from torch import Tensor, nn

from .calibration import CalibratedVerdicts, Verdict
from .checkpoints import CheckpointInfo, load_model
from .fusion import combine_crops
from .hardware import input_scale, normalise, resolve_device, resolve_precision
from .images import DEFAULT_MAX_PIXELS, DecodedImage, as_pixels
from .models import ModelConfig
from .patches import PatchSettings
from .runtimes import Runtime, TorchRuntime

__all__ = ["Detector", "Prediction", "batch_limit"]

Prediction = Verdict  # the name of earlier releases

# Input pixels per forward pass. The nodown ResNet-50 keeps ~1 KB of fp32 activations per input
# pixel alive at its widest point, so this bounds memory for large crops (full-mode tiles). On the
# CPU, small batches are also faster: on 2 cores at 256 px in bf16, 0.22 s per image in batches of
# 2-8 against 0.32 s in batches of 16, whose activations page-fault the heap (benchmarks/batch_size.py).
MAX_BATCH_PIXELS = {"cpu": 1 << 18, "default": 1 << 22}


def batch_limit(shape: tuple[int, int], batch_size: int, max_pixels: int = MAX_BATCH_PIXELS["cpu"]) -> int:
    """Crops of ``shape`` per batch: at most ``batch_size`` and about ``max_pixels`` pixels."""
    return max(1, min(batch_size, max_pixels // max(1, shape[0] * shape[1])))


class Detector(CalibratedVerdicts):
    """A model ready to score images.

    Build it with :meth:`from_checkpoint` (PyTorch) or :func:`detector.export.load_exported` (an
    exported model). The forward pass is a :class:`~detector.runtimes.Runtime`'s; cutting, batching,
    fusion and calibration are the same for every backend. With the torch backend, ``precision``
    ``bf16``/``fp16`` runs under autocast (logits come back as fp32); ``fp32`` is exact; ``auto``
    picks what the hardware runs fastest (:func:`resolve_precision`).
    """

    def __init__(
        self,
        model: "nn.Module | Runtime",
        info: CheckpointInfo | None = None,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        channels_last: bool = True,
        config: ModelConfig | None = None,
        receptive_field: int | None = None,
    ) -> None:
        """``model`` is a PyTorch module (run by :class:`~detector.runtimes.TorchRuntime` on
        ``device`` at ``precision``) or a runtime already set up, with the ``config`` and
        ``receptive_field`` of the model it runs."""
        if isinstance(model, nn.Module):
            device = device if isinstance(device, torch.device) else resolve_device(device)
            runtime = TorchRuntime(model, device=device, precision=resolve_precision(precision, device),
                                   channels_last=channels_last)
            config = model.config
            self.stride = int(getattr(model, "output_stride", config.output_stride))
            receptive_field = getattr(model, "receptive_field", None)
        else:
            if config is None:
                raise ValueError("a Detector over a runtime needs the model's config")
            runtime = model
            self.stride = config.output_stride
        self.runtime = runtime
        self.model = getattr(runtime, "model", None)  # the PyTorch module, with the torch backend
        self.device, self.precision, self.config = runtime.device, runtime.precision, config
        self.receptive_field = receptive_field
        self.info = info
        self.channels_last = runtime.channels_last
        self._mean, self._std = input_scale(self.config, self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        architecture: str | None = None,
    ) -> "Detector":
        """Load weights (any published format, see :mod:`detector.checkpoints`) and get ready."""
        model, info = load_model(path, architecture)
        return cls(model, info, device=device, precision=precision)

    def batch_limit(self, shape: tuple[int, int], batch_size: int) -> int:
        """Crops of ``shape`` per forward pass on this device (see :data:`MAX_BATCH_PIXELS`)."""
        return batch_limit(shape, batch_size, MAX_BATCH_PIXELS.get(self.device.type, MAX_BATCH_PIXELS["default"]))

    @property
    def tile_margin(self) -> int:
        """Context around full-mode tiles that makes tiling exact: the receptive-field radius, in
        multiples of 8 (64 px for resnet50nodown, 216 for resnet50); 128 when unknown (timm)."""
        rf = self.receptive_field
        return 128 if rf is None else int(math.ceil(rf / 2 / 8) * 8)

    def resolve_settings(self, settings: PatchSettings) -> PatchSettings:
        """``settings`` with an unset tile margin replaced by :attr:`tile_margin`."""
        return settings if settings.margin is not None else dataclasses.replace(settings, margin=self.tile_margin)

    def normalise(self, batch: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` (any device) to the model's normalised float input on its device."""
        return normalise(batch, self._mean, self._std, channels_last=self.channels_last)

    @torch.inference_mode()
    def crop_maps(self, batch: Tensor) -> np.ndarray:
        """Logit maps ``(N, h, w)`` float32 of a batch of same-size uint8 crops ``(N, 3, H, W)``."""
        return self.runtime.logit_maps(self.normalise(batch))

    def score_pixels(
        self, pixels: np.ndarray, settings: PatchSettings = PatchSettings(), *, fusion: str = "mean", batch_size: int = 16
    ) -> tuple[float, np.ndarray, int]:
        """Image logit, logit map and number of crops for RGB uint8 pixels ``(H, W, 3)``."""
        h, w = pixels.shape[:2]
        settings = self.resolve_settings(settings)
        crops = settings.plan(h, w)
        maps: list[np.ndarray | None] = [None] * len(crops)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, crop in enumerate(crops):
            by_shape.setdefault(crop.shape, []).append(i)
        for shape, indices in by_shape.items():
            step = self.batch_limit(shape, batch_size)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                batch = torch.from_numpy(np.stack([crops[i].cut(pixels) for i in chunk])).permute(0, 3, 1, 2)
                for i, m in zip(chunk, self.crop_maps(batch)):
                    maps[i] = m
        logit, canvas = combine_crops(
            crops, maps, mode=settings.mode, rule=fusion, stride=self.stride, height=h, width=w
        )
        return logit, canvas, len(crops)

    def predict(
        self,
        image: str | os.PathLike | np.ndarray | DecodedImage,
        settings: PatchSettings = PatchSettings(),
        *,
        fusion: str = "mean",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Verdict:
        """Score one image (a path, a decoded image or RGB uint8 pixels ``(H, W, 3)``)."""
        pixels = as_pixels(image, max_pixels)
        logit, canvas, n = self.score_pixels(pixels, settings, fusion=fusion)
        return self.verdict(logit, logit_map=canvas, n_patches=n, width=pixels.shape[1], height=pixels.shape[0])

    def describe(self) -> dict:
        """What produced a result: recorded in outputs next to the scores."""
        return {
            "weights": self.info.path if self.info else None,
            "weights_sha256": self.info.sha256 if self.info else None,
            "tensors_sha256": self.info.tensors_sha256 if self.info else None,
            "architecture": self.config.architecture,
            "device": str(self.device),
            "precision": self.precision,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "torch": torch.__version__,
            "backend": self.runtime.backend,
            **self._export_record(),
        }

    def _export_record(self) -> dict:
        """For an exported model: the runtime's version and what was exported (empty with torch)."""
        if self.runtime.backend == "torch":
            return {}
        return {"runtime": getattr(self.runtime, "version", self.runtime.backend),
                "source_sha256": getattr(self.info, "source_sha256", None)}
