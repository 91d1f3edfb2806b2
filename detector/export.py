"""Export a convolutional detector for deployment: ONNX or OpenVINO, fp32 or int8.

An export is a folder::

    DIR/export.json        what inference needs (below) and which model files the folder holds
    DIR/model.onnx         fp32, fully convolutional: input (N, 3, H, W), any N, H, W
    DIR/model.int8.onnx    int8 after post-training static quantization (--int8)
    DIR/model.xml, .bin    the same for OpenVINO (model.int8.xml, .bin)

Every model takes the *normalised* input of :meth:`detector.inference.Detector.normalise`
(``(pixels - 255 * mean) / (255 * std)``, RGB, float32) and gives the logit map ``(N, 1, h, w)``
before spatial pooling, as :meth:`detector.models.ResNet.logit_map` does: patches, tiles, fusion,
calibration and heatmaps are the Detector's, whichever backend computes the map
(:mod:`detector.runtimes`).

``export.json`` is the checkpoint's own metadata (architecture, ``model_config`` with mean, std and
output stride, ``calibration``: temperature and threshold), plus ``receptive_field`` and
``tile_margin``, the source weights' ``sha256``, and for each format and precision its files with
their sha256 (checked when loaded, so a folder whose files were swapped is refused), and for int8
how it was calibrated.

int8 is ONNX Runtime's static quantization (QDQ, per-channel int8 weights, int8 activations whose
ranges are the min and max seen on calibration patches). The patches are cut and normalised as
``scan`` cuts them: grid patches of ``patch_size`` px aligned to 8 px, from real images (labelled
or not; a few hundred patches are enough). The OpenVINO int8 model is that QDQ model converted, so
both backends run the same quantization.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoints import CheckpointError, CheckpointInfo, atomic_write, file_sha256, load_model, validate_metadata
from .models import ModelConfig, ResNet

__all__ = ["EXPORT_FILE", "FORMATS", "ExportError", "ExportOptions", "ExportedInfo", "calibration_patches",
           "export_model", "is_export_dir", "load_exported", "read_export"]

EXPORT_FILE = "export.json"
FORMATS = ("onnx", "openvino")
EXPORT_VERSION = 1
# The files of each (format, precision), main file first.
_FILES = {
    ("onnx", "fp32"): ("model.onnx",),
    ("onnx", "int8"): ("model.int8.onnx",),
    ("openvino", "fp32"): ("model.xml", "model.bin"),
    ("openvino", "int8"): ("model.int8.xml", "model.int8.bin"),
}
# The format each backend runs; an OpenVINO model runs bf16 from its fp32 files.
BACKEND_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}  # in order of preference
_STORED_PRECISION = {"fp32": "fp32", "bf16": "fp32", "int8": "int8"}
INPUT_NAME, OUTPUT_NAME = "input", "logit_map"


class ExportError(CheckpointError):
    """An export that cannot be written or read; the message names the problem."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export: formats, and int8 with its calibration data."""

    formats: tuple[str, ...] = ("onnx",)
    int8: bool = False
    int8_only: bool = False  # keep only the int8 models (what ships beside a checkpoint for precision auto)
    calibration: tuple[str, ...] = ()  # images, folders, globs or CSV lists (see detector.images.find_images)
    calibration_patches: int = 300
    patch_size: int = 256
    seed: int = 0
    opset: int = 17

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if not self.formats or unknown:
            raise ValueError(f"format must be one or more of {FORMATS}, got {list(self.formats)}")
        if self.int8 and not self.calibration:
            raise ValueError("int8 needs calibration images (--calibration DATA): real photos, a few hundred patches")
        if self.calibration and not self.int8:
            raise ValueError("--calibration is for --int8")
        if self.int8_only and not self.int8:
            raise ValueError("--int8-only needs --int8")
        if self.calibration_patches < 1 or self.patch_size < 8:
            raise ValueError(f"calibration_patches must be >= 1 and patch_size >= 8, got {self.calibration_patches}, "
                             f"{self.patch_size}")


class _LogitMap(nn.Module):
    """The graph that is exported: normalised input to the logit map (no pooling)."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logit_map(x)


def _export_onnx(model: ResNet, path: Path, opset: int) -> None:
    """fp32 ONNX with dynamic batch, height and width.

    The TorchScript-based exporter (``dynamo=False``): deprecated in torch 2.9 but it needs no
    onnxscript, and ``dynamic_axes`` give a fully convolutional graph in one call; the tests check
    that the graph scores like the module.
    """
    wrapper = _LogitMap(model).eval()  # a wrapper left in training mode would export BatchNorm's batch statistics
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUT_NAME: {0: "batch", 2: "map_height", 3: "map_width"}})


def calibration_patches(inputs: Sequence[str | os.PathLike], *, n: int, patch_size: int, seed: int = 0,
                        max_pixels: int | None = None) -> tuple[list[np.ndarray], dict]:
    """Up to ``n`` uint8 crops ``(h, w, 3)`` cut from the images of ``inputs`` as ``scan`` cuts them.

    Images are visited in a seeded random order, each giving its share of the patches still wanted
    (the scan's grid of up to 8 patches), so that they come from as many images as the budget allows.
    Unreadable files are skipped and counted. Returns the crops and a record of where they came from.
    """
    from .images import DEFAULT_MAX_PIXELS, ImageError, find_images
    from .images import decode_image
    from .patches import PatchSettings

    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"no calibration images found in {list(map(str, inputs))}")
    order = np.random.default_rng(seed).permutation(len(paths))
    crops: list[np.ndarray] = []
    used = unreadable = 0
    for visited, i in enumerate(order):
        if len(crops) >= n:
            break
        try:
            pixels = decode_image(paths[i], max_pixels=max_pixels or DEFAULT_MAX_PIXELS).pixels
        except ImageError:
            unreadable += 1
            continue
        used += 1
        # the budget left, spread over the images left (small images give fewer patches than asked)
        per_image = max(1, min(8, math.ceil((n - len(crops)) / (len(paths) - visited))))
        settings = PatchSettings(mode="patches", patch_size=patch_size, num_patches=per_image)
        for crop in settings.plan(*pixels.shape[:2], align=8)[: n - len(crops)]:
            crops.append(np.array(crop.cut(pixels), order="C"))
    if not crops:
        raise ValueError(f"none of the {len(paths)} calibration images could be read")
    return crops, {"inputs": [str(i) for i in inputs], "images": used, "unreadable": unreadable,
                   "patches": len(crops), "patch_size": patch_size, "seed": seed}


def _normalised(crops: Sequence[np.ndarray], config: ModelConfig) -> Iterator[np.ndarray]:
    """Each crop as the network's input ``(1, 3, h, w)`` float32, normalised as the scan does."""
    from .hardware import input_scale, normalise

    mean, std = input_scale(config, torch.device("cpu"))
    for crop in crops:
        batch = torch.from_numpy(crop).permute(2, 0, 1)[None]
        yield normalise(batch, mean, std, channels_last=False).numpy()


def quantize_onnx(fp32: Path, int8: Path, inputs: Iterator[np.ndarray], *, work_dir: Path) -> dict:
    """Post-training static quantization of ``fp32`` into ``int8``, calibrated on ``inputs``.

    QDQ format, per-channel symmetric int8 weights, int8 activations with min/max ranges (the
    defaults ONNX Runtime recommends for CPUs); every convolution is quantized. Returns its record.
    """
    from .resources import require

    quant = require("onnxruntime.quantization", "export", "int8 export")
    require("onnx", "export", "int8 export")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(quant.CalibrationDataReader):
        def get_next(self) -> dict | None:
            x = next(inputs, None)
            return None if x is None else {INPUT_NAME: x}

    prepared = work_dir / "model.prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quant.quantize_static(str(prepared), str(int8), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                          activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
                          calibrate_method=quant.CalibrationMethod.MinMax)
    prepared.unlink()
    import onnxruntime

    return {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static", "format": "QDQ", "method": "MinMax",
            "weights": "int8, per channel", "activations": "int8, per tensor", "excluded_nodes": []}


def _to_openvino(onnx_path: Path, xml_path: Path) -> str:
    """Convert an ONNX model (fp32 or QDQ int8) to OpenVINO IR, weights kept in fp32; returns the version."""
    from .resources import require

    ov = require("openvino", "openvino", "--format openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return ov.get_version()


def _model_entry(files: Sequence[Path]) -> dict:
    return {"files": {f.name: file_sha256(f) for f in files}}


def _start_record(out: Path, model: ResNet, info: CheckpointInfo) -> dict:
    """The export record of ``model``: the one already in ``out`` if it exports the same weights."""
    from . import __version__

    existing = out / EXPORT_FILE
    if existing.is_file():
        record = read_export(out).metadata
        if record.get("source", {}).get("sha256") != info.sha256:
            raise ExportError(f"{out} holds an export of other weights ({record.get('source', {}).get('weights')}); "
                              f"choose another -o")
        return record
    rf = model.receptive_field
    return {
        **info.metadata,
        "architecture": model.config.architecture,
        "model_config": model.config.to_dict(),
        "receptive_field": rf,
        "tile_margin": int(math.ceil(rf / 2 / 8) * 8),
        "export_version": EXPORT_VERSION,
        "source": {"weights": info.path, "sha256": info.sha256},
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, "height", "width"], "dtype": "float32",
                  "normalisation": "(rgb - 255 * model_config.mean) / (255 * model_config.std)"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 1, "map_height", "map_width"],
                   "meaning": "logit map before spatial pooling; the image logit is its mean"},
        "models": {},
        "exported_by": f"detector {__version__}, torch {torch.__version__}",
    }


def export_model(weights: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions = ExportOptions(), *,
                 architecture: str | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Export the checkpoint ``weights`` into the folder ``out_dir``; returns the export record.

    A folder already holding an export of the same weights gains the new formats and precisions
    (an existing one is replaced); one of other weights is refused.
    """
    from .resources import require

    require("onnx", "export", "detector export")
    model, info = load_model(weights, architecture)
    if not isinstance(model, ResNet):
        raise ExportError(f"{weights}: export supports the ResNet family (architecture {info.architecture!r} is not)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    record = _start_record(out, model, info)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp_name:
        tmp = Path(tmp_name)
        built: dict[tuple[str, str], dict] = {}
        log("exporting to ONNX")
        _export_onnx(model, tmp / "model.onnx", options.opset)
        built["onnx", "fp32"] = {"opset": options.opset, "exporter": f"torch.onnx (TorchScript) {torch.__version__}"}
        if options.int8:
            crops, source = calibration_patches(options.calibration, n=options.calibration_patches,
                                                patch_size=options.patch_size, seed=options.seed)
            log(f"calibrating int8 on {source['patches']} patches of {source['images']} images")
            quantization = quantize_onnx(tmp / "model.onnx", tmp / "model.int8.onnx",
                                         _normalised(crops, model.config), work_dir=tmp)
            built["onnx", "int8"] = {"quantization": {**quantization, "calibration": source}}
        if "openvino" in options.formats:
            log("converting to OpenVINO")
            wanted = ("int8",) if options.int8_only else ("fp32", "int8") if options.int8 else ("fp32",)
            for precision in wanted:
                onnx_file, xml = (tmp / name for name in (_FILES["onnx", precision][0], _FILES["openvino", precision][0]))
                version = _to_openvino(onnx_file, xml)
                built["openvino", precision] = {**built["onnx", precision], "converted_by": f"openvino {version}"}
        for (fmt, precision), entry in built.items():
            if fmt not in options.formats or (options.int8_only and precision != "int8"):
                continue
            files = [tmp / name for name in _FILES[fmt, precision]]
            for f in files:
                os.replace(f, out / f.name)
            record["models"].setdefault(fmt, {})[precision] = {**_model_entry([out / f.name for f in files]), **entry}
    record["exported"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write(out / EXPORT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True),
                                                                     encoding="utf-8"))
    return record


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_model`."""
    return (Path(path) / EXPORT_FILE).is_file()


@dataclass
class ExportedInfo(CheckpointInfo):
    """A :class:`CheckpointInfo` for one model file of an export: its calibration is the source
    checkpoint's, and the digest a score depends on is the model file's (``model_sha256``)."""

    model_sha256: str = ""
    source_sha256: str = ""
    backend: str = ""
    files: dict = field(default_factory=dict)

    @property
    def tensors_sha256(self) -> str:  # type: ignore[override]
        return self.model_sha256


@dataclass(frozen=True)
class Export:
    """A read export folder: its record and what it holds."""

    path: Path
    metadata: dict

    @property
    def config(self) -> ModelConfig:
        c = self.metadata["model_config"]
        return ModelConfig(architecture=c["architecture"], mean=tuple(c["mean"]), std=tuple(c["std"]),
                           output_stride=int(c["output_stride"]), extra=dict(c.get("extra") or {}))

    def available(self) -> list[tuple[str, str]]:
        """``(format, precision)`` of every model the folder holds."""
        return [(fmt, p) for fmt, by_precision in self.metadata["models"].items() for p in by_precision]

    def model_files(self, fmt: str, precision: str) -> list[Path]:
        """The files of one model, checked against their recorded sha256."""
        entry = self.metadata["models"].get(fmt, {}).get(precision)
        if entry is None:
            held = ", ".join(f"{f} {p}" for f, p in self.available()) or "no model"
            hint = (f"; `detector export --format {fmt}{' --int8 --calibration DATA' if precision == 'int8' else ''}` "
                    f"writes it")
            raise ExportError(f"{self.path}: holds no {fmt} {precision} model (it holds {held}){hint}")
        files = []
        for name in _FILES[fmt, precision]:  # the main file first
            f, digest = self.path / name, entry["files"].get(name)
            if not f.is_file():
                raise ExportError(f"{self.path}: {name} is missing; export again")
            if file_sha256(f) != digest:
                raise ExportError(f"{self.path}: {name} is not the file this export wrote (sha256 differs); export again")
            files.append(f)
        return files


def read_export(path: str | os.PathLike) -> Export:
    """Read and validate an export folder's ``export.json``."""
    path = Path(path)
    record_path = path / EXPORT_FILE
    if not path.is_dir():
        raise ExportError(f"{path}: no such export folder")
    if not record_path.is_file():
        raise ExportError(f"{path}: not an export folder (no {EXPORT_FILE}; `detector export` writes one)")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{record_path}: unreadable ({err})") from None
    validate_metadata(record, record_path)
    version = record.get("export_version") if isinstance(record, dict) else None
    if not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise ExportError(f"{record_path}: export_version must be an integer from 1 to {EXPORT_VERSION}, got {version!r}")
    for key, test in (("model_config", dict), ("models", dict), ("source", dict), ("receptive_field", int)):
        if not isinstance(record.get(key), test):
            raise ExportError(f"{record_path}: field {key!r} missing or malformed")
    models = record["models"]
    for fmt, by_precision in models.items():
        if fmt not in FORMATS or not isinstance(by_precision, dict) or any(
                (fmt, p) not in _FILES or not isinstance(e, dict) or not isinstance(e.get("files"), dict)
                for p, e in by_precision.items()):
            raise ExportError(f"{record_path}: field 'models' malformed at {fmt!r}")
    return Export(path, record)


def load_exported(path: str | os.PathLike, *, backend: str = "auto", precision: str = "auto", device: str = "auto",
                  threads: int | None = None):
    """A :class:`~detector.inference.Detector` running the export in ``path`` with ``backend``.

    ``backend`` ``auto`` picks OpenVINO when the folder holds an OpenVINO model of the precision
    (its int8 ran three times faster than onnxruntime's here, benchmarks/), else onnxruntime.
    ``precision`` ``auto`` is int8 when the folder holds an int8 model and the CPU has int8 dot
    products (:func:`~detector.hardware.cpu_has_int8_dot`), else fp32.
    """
    from .hardware import cpu_has_int8_dot
    from .inference import Detector
    from .runtimes import BackendError, open_exported_runtime

    export = read_export(path)
    if precision == "auto":
        has_int8 = any(p == "int8" for _, p in export.available())
        precision = "int8" if has_int8 and cpu_has_int8_dot() else "fp32"
    stored = _STORED_PRECISION.get(precision)
    if stored is None:
        raise BackendError(f"an exported model runs fp32, bf16 (OpenVINO) or int8, not {precision}; "
                           f"--backend torch runs the checkpoint at {precision}")
    if backend == "auto":
        held = export.available()
        usable = [b for b, fmt in BACKEND_FORMAT.items() if (fmt, stored) in held
                  and not (precision == "bf16" and b == "onnxruntime")]
        installed = [b for b in usable if importlib.util.find_spec(b) is not None]
        backend = (installed or usable or ["onnxruntime"])[0]  # a missing runtime then names its extra
    if backend not in BACKEND_FORMAT:
        raise BackendError(f"{path} is an exported model: run it with --backend onnxruntime or openvino, not {backend}")
    fmt = BACKEND_FORMAT[backend]
    files = export.model_files(fmt, stored)
    runtime = open_exported_runtime(files[0], backend, precision, device=device, threads=threads)
    entry = export.metadata["models"][fmt][stored]
    digest = entry["files"][files[0].name] if len(files) == 1 else _digest(entry["files"])
    info = ExportedInfo(path=str(files[0]), sha256=digest, architecture=export.metadata["architecture"],
                        metadata=export.metadata, model_sha256=digest,
                        source_sha256=export.metadata["source"].get("sha256", ""), backend=backend,
                        files=entry["files"])
    return Detector(runtime, info, config=export.config, receptive_field=export.metadata["receptive_field"])


def _digest(files: dict) -> str:
    """One sha256 for a model of several files (OpenVINO's .xml and .bin): of their sorted digests."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
