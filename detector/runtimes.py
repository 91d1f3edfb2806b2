"""What runs the network's forward pass for a :class:`~detector.inference.Detector`: a backend.

* ``torch``: the PyTorch module itself (:class:`TorchRuntime`), on any device, in fp32 or under
  bf16/fp16 autocast;
* ``onnxruntime`` and ``openvino``: a model exported by :mod:`detector.export` (fp32, or int8 after
  post-training quantization), on the CPU.

Every backend takes the normalised float input ``(N, 3, H, W)`` and gives the logit maps
``(N, h, w)`` as float32 numpy, so cutting, batching, patch fusion, calibration and heatmaps are
the Detector's and stay one code path whatever computes the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BACKENDS", "OnnxRuntime", "OpenVinoRuntime", "Runtime", "BackendError", "TorchRuntime",
           "compiled_model_cache", "open_exported_runtime"]

BACKENDS = ("torch", "onnxruntime", "openvino")
# Precisions an exported model runs at; ``auto`` is fp32 (int8 only when asked for, for now).
EXPORTED_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}


class BackendError(ValueError):
    """A backend that cannot run here or a model it cannot run; the message says what to do.

    A ``ValueError``, so that commands report it as a bad request in one line.
    """


class Runtime(Protocol):
    """The forward pass of a fully convolutional detector, and what the Detector must know of it."""

    backend: str
    precision: str
    device: torch.device
    channels_last: bool  # whether the input is best handed over in channels-last memory order

    def logit_maps(self, x: Tensor) -> np.ndarray:
        """Logit maps ``(N, h, w)`` float32 of normalised input ``(N, 3, H, W)`` on :attr:`device`."""
        ...


class TorchRuntime:
    """A PyTorch module's :meth:`logit_map`, under autocast at bf16/fp16 (see :mod:`detector.inference`)."""

    backend = "torch"

    def __init__(self, model: nn.Module, *, device: torch.device, precision: str, channels_last: bool = True) -> None:
        self.device, self.precision, self.channels_last = device, precision, channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device, memory_format=memory_format)

    @torch.inference_mode()
    def logit_maps(self, x: Tensor) -> np.ndarray:
        from .hardware import autocast

        with autocast(self.device, self.precision):
            maps = self.model.logit_map(x)
        return maps[:, 0].float().cpu().numpy()


def _cpu_only(backend: str, device: str) -> torch.device:
    if device not in ("auto", "cpu"):
        raise BackendError(f"--backend {backend} runs on the CPU here; drop --device {device} or use --backend torch")
    return torch.device("cpu")


def _float_input(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


class OnnxRuntime:
    """An exported ONNX model run by onnxruntime on the CPU (fp32, or int8 QDQ from :mod:`detector.export`)."""

    backend = "onnxruntime"
    channels_last = False

    def __init__(self, path: str | os.PathLike, *, precision: str, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("--backend onnxruntime needs onnxruntime: pip install onnxruntime") from None
        self.device, self.precision, self.path = torch.device("cpu"), precision, Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.log_severity_level = 3
        # Idle threads sleep instead of spinning: a busy machine, or decode workers beside the
        # network, then keep their cores (spinning threads steal them).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BackendError(f"{path}: not a model onnxruntime can run ({str(err).splitlines()[0]})") from None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        self.version = f"onnxruntime {ort.__version__}"

    def logit_maps(self, x: Tensor) -> np.ndarray:
        (maps,) = self.session.run([self._output], {self._input: _float_input(x)})
        return np.asarray(maps[:, 0], dtype=np.float32)


class OpenVinoRuntime:
    """An exported OpenVINO model (``.xml`` + ``.bin``) on the CPU.

    ``precision`` is OpenVINO's inference precision for the layers that are not quantized: ``fp32``
    (exact; OpenVINO would otherwise pick bf16 on CPUs that have it), ``bf16``; an ``int8`` model
    runs its quantized convolutions in int8 and the rest in fp32.
    """

    backend = "openvino"
    channels_last = False

    def __init__(self, path: str | os.PathLike, *, precision: str, threads: int | None = None) -> None:
        from .resources import require

        ov = require("openvino", "openvino", "--backend openvino")
        self.device, self.precision, self.path = torch.device("cpu"), precision, Path(path)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        cache = compiled_model_cache()
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as err:  # noqa: BLE001 - openvino raises its own types for bad files
            raise BackendError(f"{path}: not a model OpenVINO can run ({str(err).splitlines()[0]})") from None
        self.request = self.compiled.create_infer_request()
        self.version = f"openvino {ov.get_version()}"

    def logit_maps(self, x: Tensor) -> np.ndarray:
        maps = self.request.infer({0: _float_input(x)})[self.compiled.output(0)]
        return np.array(maps[:, 0], dtype=np.float32)  # a copy: the request reuses its output buffer


def compiled_model_cache() -> Path | None:
    """Where OpenVINO keeps compiled models between runs, or None (no caching).

    Compiling the int8 ResNet-50 took 0.28 s on every start here; loading it from this cache
    0.08 s (about 24 MB per model; timed once around ``compile_model`` on the project's machine). The cache is the ``openvino`` folder inside
    ``DETECTOR_CACHE_DIR`` (set it empty for no cache), by default inside ``$XDG_CACHE_HOME/detector``
    or ``~/.cache/detector``.
    A folder that cannot be created means no cache, not an error.
    """
    base = os.environ.get("DETECTOR_CACHE_DIR")
    if base is None:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "detector")
    if not base.strip():
        return None
    folder = Path(base) / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def open_exported_runtime(path: Path, backend: str, precision: str, *, device: str = "auto",
                          threads: int | None = None) -> OnnxRuntime | OpenVinoRuntime:
    """The runtime of ``backend`` for the exported model file ``path``, at ``precision``."""
    if backend not in EXPORTED_PRECISIONS:
        raise BackendError(f"backend must be one of {tuple(EXPORTED_PRECISIONS)} for an exported model, got {backend!r}")
    if precision not in EXPORTED_PRECISIONS[backend]:
        raise BackendError(f"--backend {backend} runs precision {' or '.join(EXPORTED_PRECISIONS[backend])}, "
                            f"not {precision}")
    _cpu_only(backend, device)
    runtime = OnnxRuntime if backend == "onnxruntime" else OpenVinoRuntime
    return runtime(path, precision=precision, threads=threads)
