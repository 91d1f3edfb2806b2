"""The :class:`Detector`: a loaded model on a device, at a precision, turning pixels into logits.

Preprocessing comes from the model's :class:`~detector.models.ModelConfig` (mean/std, output
stride), never from a copy. Crops of the same shape, from one image or many, are scored in one
batch (:meth:`Detector.crop_maps`); :meth:`Detector.predict` is the one-image API.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoints import CheckpointInfo, load_model
from .fusion import combine_crops
from .images import DEFAULT_MAX_PIXELS, DecodedImage, decode_image
from .metrics import sigmoid
from .models import ModelConfig
from .patches import PatchSettings
from .runtimes import Runtime, TorchRuntime

__all__ = ["PRECISIONS", "Detector", "Prediction", "keep_freed_memory", "resolve_device", "resolve_precision",
           "tune_process"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps requested but Apple's MPS is not available")
    return torch.device(name)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), so autocast pays off."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), which
    run an int8 model about twice as fast as bf16 (benchmarks/scan_speed.py)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware has it (recent CPUs, Ampere+ GPUs), fp16 on older GPUs
    and Apple's MPS, fp32 otherwise. Explicit choices are kept."""
    if precision == "int8":
        raise ValueError("int8 runs an exported model: `detector export --format onnx --int8 --calibration DATA "
                         "WEIGHTS -o DIR` writes one, then pass --weights DIR")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``bf16``/``fp16``) on ``device``; a no-op for ``fp32``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def input_scale(config, device: torch.device) -> tuple[Tensor, Tensor]:
    """The model's mean and std on the 0-255 scale, shaped ``(1, 3, 1, 1)``, on ``device``."""
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def normalise(batch: Tensor, mean: Tensor, std: Tensor, *, channels_last: bool = True) -> Tensor:
    """uint8 ``(N, 3, H, W)`` to the normalised float input on ``mean``'s device (see :func:`input_scale`)."""
    x = (batch.to(mean.device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed activation buffers to the OS after every layer.

    The no-downsample network allocates activations of tens of MB; glibc serves those with mmap
    and unmaps them on free, so every layer page-faults its buffers in again, which costs about
    half of a CPU forward pass here (see benchmarks/). Serving them from the heap and never
    trimming it keeps the pages mapped. No effect off Linux/glibc. Returns whether it applied.
    Set ``DETECTOR_KEEP_FREED_MEMORY=0`` to opt out.
    """
    global _MEMORY_KEPT
    if _MEMORY_KEPT:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DETECTOR_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _MEMORY_KEPT = ok
    return ok


def tune_process(device: torch.device) -> None:
    """Opt this process into the tunings a long scan wants: :func:`keep_freed_memory` on the CPU,
    ``cudnn.benchmark`` on CUDA.

    Both are process-wide, so the library never applies them by itself (a host application's other
    code, or training under ``use_deterministic_algorithms``, would inherit them); the command line
    calls this once, before scoring.
    """
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# Input pixels per forward pass. The nodown ResNet-50 keeps ~1 KB of fp32 activations per input
# pixel alive at its widest point, so this bounds memory for large crops (full-mode tiles). On the
# CPU, small batches are also faster: on 2 cores at 256 px in bf16, 0.22 s per image in batches of
# 2-8 against 0.32 s in batches of 16, whose activations page-fault the heap (benchmarks/batch_size.py).
MAX_BATCH_PIXELS = {"cpu": 1 << 18, "default": 1 << 22}


def batch_limit(shape: tuple[int, int], batch_size: int, max_pixels: int = MAX_BATCH_PIXELS["cpu"]) -> int:
    """Crops of ``shape`` per batch: at most ``batch_size`` and about ``max_pixels`` pixels."""
    return max(1, min(batch_size, max_pixels // max(1, shape[0] * shape[1])))


@dataclass
class Prediction:
    """One image's result."""

    logit: float
    probability: float
    label: str
    logit_map: np.ndarray
    n_patches: int
    width: int
    height: int


class CalibratedVerdicts:
    """Probabilities and labels from the calibration stored with the weights (``self.info``)."""

    info: CheckpointInfo | None

    @property
    def temperature(self) -> float:
        return self.info.temperature if self.info else 1.0

    @property
    def threshold(self) -> float:
        return self.info.threshold if self.info else 0.0

    def probability(self, logit: float) -> float:
        """Calibrated probability that the image is generated (see :meth:`CheckpointInfo.probability`)."""
        return self.info.probability(logit) if self.info else float(sigmoid(logit))

    def label(self, logit: float) -> str:
        """``fake`` exactly when the calibrated probability is at least 0.5."""
        return "fake" if self.probability(logit) >= 0.5 else "real"


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
    ) -> Prediction:
        """Score one image (a path, a decoded image or RGB uint8 pixels ``(H, W, 3)``)."""
        if isinstance(image, (str, os.PathLike, Path)):
            image = decode_image(image, max_pixels=max_pixels)
        pixels = image.pixels if isinstance(image, DecodedImage) else np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
        logit, canvas, n = self.score_pixels(pixels, settings, fusion=fusion)
        return Prediction(
            logit=logit,
            probability=self.probability(logit),
            label=self.label(logit),
            logit_map=canvas,
            n_patches=n,
            width=pixels.shape[1],
            height=pixels.shape[0],
        )

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


def load_detector(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                  architecture: str | None = None, threads: int | None = None, backend: str = "auto"):
    """A :class:`Detector` or, for a CLIP-probe checkpoint, a :class:`~detector.probe.ProbeDetector`.

    ``path`` is a checkpoint (run by PyTorch) or a folder written by ``detector export`` (run by
    onnxruntime or OpenVINO, see :func:`detector.export.load_exported`). ``backend`` ``auto`` is
    torch for a checkpoint and the export's runtime for a folder; a probe runs its own encoder
    whatever the backend. ``precision`` and ``backend`` both ``auto`` on a CPU with int8 dot
    products run the int8 model that ships beside the checkpoint, if any (:func:`int8_companion`).
    """
    from .checkpoints import read_metadata
    from .export import load_exported
    from .probe import PROBE_PREFIX, ProbeDetector
    from .runtimes import BACKENDS, BackendError

    path = Path(path)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if path.is_dir():
        if architecture:
            raise ValueError(f"{path}: --arch is for published checkpoints, not for exported models")
        if backend == "torch":
            raise BackendError(f"{path} is an exported model; --backend torch runs checkpoints: use --backend "
                               f"onnxruntime or openvino (or leave --backend out)")
        return load_exported(path, backend=backend, precision=precision, device=device, threads=threads)
    if str(read_metadata(path).get("architecture", "")).startswith(PROBE_PREFIX):
        if architecture:
            raise ValueError(f"{path}: is a CLIP probe checkpoint; --arch does not apply to it")
        return ProbeDetector.from_checkpoint(path, device=device, precision=precision, threads=threads)
    if precision == "auto" and backend == "auto" and not architecture and resolve_device(device).type == "cpu":
        companion = int8_companion(path)
        if companion is not None:
            return load_exported(companion, precision="int8", threads=threads)
    if backend not in ("auto", "torch"):
        raise BackendError(f"--backend {backend} runs an exported model; {path} is a checkpoint: "
                           f"`detector export --format {'onnx' if backend == 'onnxruntime' else backend} {path} -o DIR` "
                           f"writes one, then pass --weights DIR")
    return Detector.from_checkpoint(path, device=device, precision=precision, architecture=architecture)


def int8_companion(checkpoint: str | os.PathLike) -> Path | None:
    """The int8 model that ships beside ``checkpoint``, for ``precision auto`` on this CPU, or None.

    It is the export folder ``<stem>.export/`` (``detector export --int8 --int8-only``) when it holds
    an int8 model of exactly these weights (same sha256), the CPU has int8 dot products
    (:func:`cpu_has_int8_dot`) and the model's runtime is installed. Its accuracy against fp32 is
    checked by tests/test_export.py and benchmarks/int8_accuracy.py. Set ``DETECTOR_INT8=0`` to
    keep precision auto on PyTorch.
    """
    import importlib.util

    from .checkpoints import file_sha256
    from .export import BACKEND_FORMAT, ExportError, read_export

    folder = Path(checkpoint).with_suffix(".export")
    if os.environ.get("DETECTOR_INT8", "1") == "0" or not folder.is_dir() or not cpu_has_int8_dot():
        return None
    try:
        export = read_export(folder)
    except ExportError:
        return None
    runnable = [fmt for backend, fmt in BACKEND_FORMAT.items()
                if (fmt, "int8") in export.available() and importlib.util.find_spec(backend) is not None]
    if not runnable or export.metadata.get("source", {}).get("sha256") != file_sha256(checkpoint):
        return None
    return folder


class Ensemble:
    """Several detectors that score every image and decide together (:func:`detector.fusion.fuse_margins`).

    At most one member is a convolutional :class:`Detector` (scanned patch by patch); the others
    are probes that score their own views. Each member's logit is turned into its calibrated
    margin, the margins are fused by ``rule``, and the fused margin's sigmoid is the probability.
    """

    def __init__(self, members: list, names: list[str], rule: str = "mean", weights: list[float] | None = None) -> None:
        from .fusion import MODEL_FUSION_RULES

        if not members or len(members) != len(names):
            raise ValueError("an ensemble needs one name per member and at least one member")
        if weights is not None and (len(weights) != len(members) or min(weights) < 0 or not any(weights)):
            raise ValueError(f"an ensemble needs one weight >= 0 per member, not all 0; got {weights}")
        self.weights = None if weights is None else [float(w) for w in weights]
        if sum(isinstance(m, Detector) for m in members) > 1:
            raise ValueError("an ensemble holds at most one convolutional detector")
        if rule not in MODEL_FUSION_RULES:
            raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {rule!r}")
        self.members, self.names, self.rule = list(members), list(names), rule

    @property
    def conv(self) -> "Detector | None":
        return next((m for m in self.members if isinstance(m, Detector)), None)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def fused_margin(self, logits: list[float]) -> float:
        """The fused calibrated logit of one image from its members' raw logits."""
        from .fusion import fuse_margins

        margins = [m.info.margin(z) if m.info else z for m, z in zip(self.members, logits)]
        return float(fuse_margins(np.array([margins]), self.rule, weights=self.weights)[0])

    def describe(self) -> dict:
        return {"fusion": self.rule, "weights": self.weights,
                "members": {n: m.describe() for n, m in zip(self.names, self.members)}}


def load_ensemble(spec: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                  threads: int | None = None, warn=None, backend: str = "auto") -> Ensemble:
    """The models a JSON spec names, fused by its rule (the bundled default is ``weights/detector.json``).

    The spec: ``{"models": [{"name": ..., "weights": FILE, "weight": 1.0}, ...], "fusion": "mean"}``
    with files (checkpoints or export folders, run by ``backend``, see :func:`load_detector`) relative
    to the spec's folder; ``weight`` (default 1) is the model's say in the fused
    verdict, 0 for a model that is scored and shown but does not decide (see
    :func:`detector.fusion.fuse_margins`). A probe whose encoder file is missing is left out with
    one message through ``warn`` (the rest still runs); any other problem is an error.
    """
    import json

    from .backbones import BackboneError

    spec = Path(spec)
    try:
        config = json.loads(spec.read_text(encoding="utf-8"))
        entries = [(str(m["name"]), spec.parent / str(m["weights"]), float(m.get("weight", 1.0)))
                   for m in config["models"]]
        rule = str(config.get("fusion", "mean"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{spec}: not a model-set file ({err})") from None
    members, names, weights, missing = [], [], [], []
    for name, path, weight in entries:
        try:
            members.append(load_detector(path, device=device, precision=precision, threads=threads, backend=backend))
            names.append(name)
            weights.append(weight)
        except BackboneError as err:
            if warn is None or len(entries) == 1:
                missing.append(str(err))
                continue
            warn(f"{err} Scoring without the {name} model.")
    if not members:
        raise ValueError(f"{spec}: none of its models could be loaded" + (f": {missing[0]}" if missing else "")
                         + (" Or put the encoder in that folder (README, Installing)." if missing else ""))
    if not any(weights):  # the deciding models are missing: let the rest decide, with equal say
        if warn is not None and len(members) < len(entries):
            warn(f"the models left of {spec.name} had no say in its verdict; they decide alone now")
        weights = [1.0] * len(members)
    return Ensemble(members, names, rule, weights)
