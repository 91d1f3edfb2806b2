"""Read every published checkpoint format safely; write the project's own format.

Published formats read here:

* ``{'model': state_dict}``: GRIP (GANimageDetection, DMimageDetection) and Wang et al.'s
  CNNDetection releases, sometimes with the ``module.`` prefix that DataParallel adds;
* ``{'state_dict': ...}`` and ``{'net': ...}``;
* a bare state dict;
* safetensors (the project's own format: fp16/fp32 tensors plus a JSON metadata entry).

Pickle-based files are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers only and refuses any other object, so loading a checkpoint never executes its code.
A state dict that does not fit the architecture exactly (missing, unexpected or mis-shaped keys)
is refused, listing the keys: the tool must never run on random weights. The project's metadata is
checked against :func:`validate_metadata` before anything uses it, so a malformed file gives one
:class:`CheckpointError` naming the field. Training alone may start from a checkpoint whose
classifier head does not fit (:func:`load_backbone`: an ImageNet classifier's 1000 outputs); it
re-initialises that head and says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save
from torch import Tensor, nn

from .models import create_model, is_known_architecture

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "atomic_write",
    "file_sha256",
    "head_keys",
    "load_backbone",
    "load_model",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "tensors_sha256",
    "validate_metadata",
    "with_metadata",
]

METADATA_KEY = "detector"
FORMAT_VERSION = 1
_WRAPPER_KEYS = ("model", "state_dict", "net", "model_state_dict")


class CheckpointError(ValueError):
    """A file that cannot be used as weights; the message names the problem."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself (empty for published checkpoints, which say nothing)."""

    path: str
    sha256: str
    architecture: str = "resnet50nodown"
    metadata: dict = field(default_factory=dict)

    @cached_property
    def tensors_sha256(self) -> str:
        """sha256 of the weights alone (see :func:`tensors_sha256`): what a raw score depends on.
        Read once per loaded checkpoint (47 MB for the ResNet-50), on first use."""
        return tensors_sha256(self.path)

    @property
    def temperature(self) -> float:
        """Divides the logit's distance to the threshold before the sigmoid (default 1)."""
        return float(self.metadata.get("calibration", {}).get("temperature", 1.0))

    @property
    def threshold(self) -> float:
        """Logit at or above which an image is called generated, where the probability is 0.5 (default 0)."""
        return float(self.metadata.get("calibration", {}).get("threshold", 0.0))

    def at_fpr(self, rate: float) -> "CheckpointInfo":
        """This checkpoint with its threshold moved to the operating point of false-positive rate
        ``rate``, read from the calibration's ``operating_points`` (interpolated in log rate between
        the stored ones). Raises :class:`CheckpointError` when it has none or ``rate`` is outside them."""
        import math

        calibration = self.metadata.get("calibration") or {}
        try:
            points = sorted((float(k), float(v)) for k, v in (calibration.get("operating_points") or {}).items()
                            if float(k) > 0)
        except (TypeError, ValueError):
            points = []
        if not points:
            raise CheckpointError(f"{self.path}: its calibration has no operating points, so it cannot be set to a "
                                  f"false-positive rate (calibrate it with `detector calibrate --target-far`)")
        if not points[0][0] <= rate <= points[-1][0]:
            raise CheckpointError(f"{self.path}: a false-positive rate of {rate:g} is outside the calibrated ones "
                                  f"({points[0][0]:g} to {points[-1][0]:g})")
        logs = [math.log(r) for r, _ in points]
        x = math.log(rate)
        i = max(j for j in range(len(points)) if logs[j] <= x)
        if i == len(points) - 1:
            threshold = points[i][1]
        else:
            f = (x - logs[i]) / (logs[i + 1] - logs[i])
            threshold = points[i][1] + f * (points[i + 1][1] - points[i][1])
        moved = {**calibration, "threshold": threshold, "target_fpr": rate, "rule": f"fpr<={rate:g}"}
        return replace(self, metadata={**self.metadata, "calibration": moved})

    def margin(self, logit: float) -> float:
        """The calibrated logit ``(logit - threshold) / temperature``: Platt scaling ``a * logit + b``
        with ``a = 1 / temperature`` and ``b = -threshold / temperature``. Positive means generated."""
        return (float(logit) - self.threshold) / self.temperature

    def probability(self, logit: float) -> float:
        """Calibrated probability of "generated": ``sigmoid(margin)``, so it is at least 0.5 exactly
        when the logit reaches the threshold."""
        from .metrics import sigmoid

        return float(sigmoid(self.margin(logit)))

    @property
    def is_placeholder(self) -> bool:
        return bool(self.metadata.get("placeholder", False))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, recorded in every output that used it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a checkpoint's tensors without its metadata: for safetensors, the bytes after the
    header; else the whole file. Recalibrating (:func:`with_metadata`) leaves it unchanged, so
    scores cached for the old file stay valid for the new one."""
    path = Path(path)
    if not _is_safetensors(path):
        return file_sha256(path, chunk)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < 100_000_000 and head[8:9] == b"{"


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the state dict inside the published wrappers and drop DataParallel prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            continue  # epoch counters, optimizer settings and the like in training checkpoints
        for prefix in ("module.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        state[name] = value
    if not state:
        raise CheckpointError(f"{path}: no tensors found (looked under {', '.join(_WRAPPER_KEYS)} and at the top level)")
    return state


def _parse_metadata(path: Path, raw: str | None) -> dict:
    """The project's metadata from its raw JSON text: an object, or a one-line CheckpointError."""
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt metadata: {err}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt metadata: a JSON {type(metadata).__name__}, not an object")
    return metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The project metadata of a checkpoint without reading its tensors (``{}`` for published files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file: {err}") from None
    return _parse_metadata(path, raw)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Read tensors and the project's metadata (``{}`` for published files) without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if _is_safetensors(path):
        try:
            state = _st_load(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file: {err}") from None
        return _unwrap(state, path), _parse_metadata(path, raw)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        # torch.save writes a zip archive; legacy files are pickles, which start with PROTO (0x80)
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint (unrecognised file header)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: loading it would need to run code or rebuild arbitrary Python objects "
            f"({str(err).splitlines()[0]}). Only tensors and plain containers are accepted; re-save a "
            f"trusted file as a plain state dict or as safetensors."
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types on garbage; all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return _unwrap(obj, path), {}


def _number(value: object) -> bool:
    """A JSON number (bools are not), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _triple(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_number(v) for v in value)


# Fields this package reads, and what each must be: (test, what it must be). Other fields are kept as
# they are (any JSON), so that newer writers can add their own.
_FIELDS: dict[str, tuple[Any, str]] = {
    "architecture": (is_known_architecture, "a known architecture (see `detector models`)"),
    "format_version": (lambda v: _integer(v) and 1 <= v <= FORMAT_VERSION, f"an integer from 1 to {FORMAT_VERSION}"),
    "placeholder": (lambda v: isinstance(v, bool), "true or false"),
    "calibration": (lambda v: isinstance(v, dict), "an object"),
    "calibration.temperature": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "calibration.threshold": (_number, "a finite number"),
    "calibration.a": (_number, "a finite number"),
    "calibration.b": (_number, "a finite number"),
    "calibration.rule": (lambda v: isinstance(v, str), "a string"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "model_config.architecture": (is_known_architecture, "a known architecture (see `detector models`)"),
    "model_config.mean": (_triple, "a list of three finite numbers"),
    "model_config.std": (lambda v: _triple(v) and all(x > 0 for x in v), "a list of three finite numbers > 0"),
    "model_config.output_stride": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "model_config.extra": (lambda v: isinstance(v, dict), "an object"),
    "val_auc": (_number, "a finite number"),
    "step": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "git_commit": (lambda v: v is None or isinstance(v, str), "a string"),
}


def validate_metadata(metadata: object, where: str | os.PathLike = "checkpoint") -> dict:
    """``metadata`` if it fits the schema of :data:`_FIELDS`, else :class:`CheckpointError` naming the field.

    Absent fields take their defaults later (no calibration: temperature 1, threshold 0); fields
    this package does not read may hold anything. ``model_config.architecture`` must equal
    ``architecture`` when both are given.
    """
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: metadata must be a JSON object, got {type(metadata).__name__}")
    for name, (test, wanted) in _FIELDS.items():
        parent, _, key = name.rpartition(".")
        holder = metadata.get(parent) if parent else metadata
        if not isinstance(holder, dict) or key not in holder:
            continue
        value = holder[key]
        if not test(value):
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CheckpointError(f"{where}: metadata field {name!r} must be {wanted}, got {shown}")
    config = metadata.get("model_config")
    if isinstance(config, dict) and "architecture" in config and "architecture" in metadata \
            and config["architecture"] != metadata["architecture"]:
        raise CheckpointError(f"{where}: metadata field 'model_config.architecture' ({config['architecture']!r}) "
                              f"contradicts 'architecture' ({metadata['architecture']!r})")
    return metadata


def _check_config(model: nn.Module, metadata: dict, path: Path) -> None:
    """The preprocessing the checkpoint records must be the one its architecture builds (else the
    weights would run on differently normalised input)."""
    stored = metadata.get("model_config") or {}
    built = model.config.to_dict()
    for key in ("mean", "std", "output_stride"):
        if key in stored and not _same(stored[key], built[key]):
            raise CheckpointError(f"{path}: metadata field 'model_config.{key}' is {stored[key]}, but architecture "
                                  f"{model.config.architecture!r} uses {built[key]}")


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
    return a == b


def _check_fit(
    model: nn.Module, state: Mapping[str, Tensor], path: Path, architecture: str, ignore: frozenset[str] = frozenset()
) -> None:
    """Raise :class:`CheckpointError` listing every key that does not fit, except those in ``ignore``."""
    expected = {k: v for k, v in model.state_dict().items() if k not in ignore}
    state = {k: v for k, v in state.items() if k not in ignore}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" ... ({len(items)} in all)" if len(items) > 12 else "")

        parts = [f"{path}: does not fit architecture {architecture!r}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {show(wrong)}")
        raise CheckpointError("; ".join(parts))


def _build_for(path: Path, state: dict[str, Tensor], metadata: dict, architecture: str | None):
    """The architecture a checkpoint is loaded into (its metadata validated first), and its state
    with timm's prefix added if needed."""
    validate_metadata(metadata, path)
    if architecture is not None and not is_known_architecture(architecture):
        raise CheckpointError(f"unknown architecture {architecture!r} (see `detector models`)")
    arch = architecture or metadata.get("architecture") or "resnet50nodown"
    if metadata.get("architecture") and architecture and architecture != metadata["architecture"]:
        raise CheckpointError(
            f"{path}: was trained as {metadata['architecture']!r}, not {architecture!r}; drop --arch"
        )
    try:
        model = create_model(arch)
    except ValueError as err:  # e.g. a probe checkpoint, which detector.load loads
        raise CheckpointError(f"{path}: {err}") from None
    if arch.startswith("timm:"):
        # timm models live under .net in TimmClassifier; accept checkpoints saved from the bare timm model
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}
    return arch, model, state


def load_model(path: str | os.PathLike, architecture: str | None = None) -> tuple[nn.Module, CheckpointInfo]:
    """Build the checkpoint's architecture and load its weights exactly; eval mode, fp32, CPU.

    ``architecture`` overrides what the checkpoint says (published files say nothing, and
    default to ``resnet50nodown``; Wang et al.'s CNNDetection weights need ``resnet50``).
    """
    path = Path(path)
    state, metadata = read_state_dict(path)
    arch, model, state = _build_for(path, state, metadata, architecture)
    _check_fit(model, state, path, arch)
    _check_config(model, metadata, path)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    info = CheckpointInfo(path=str(path), sha256=file_sha256(path), architecture=arch, metadata=metadata)
    return model, info


def head_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's classifier head (``fc.*`` for ResNets, timm's classifier)."""
    net = getattr(model, "net", None)
    head = net.get_classifier() if net is not None and hasattr(net, "get_classifier") else getattr(model, "fc", None)
    if not isinstance(head, nn.Module):
        return frozenset()
    name = next(n for n, m in model.named_modules() if m is head)
    return frozenset(f"{name}.{k}" for k in head.state_dict())


def load_backbone(
    path: str | os.PathLike, architecture: str | None = None
) -> tuple[nn.Module, CheckpointInfo, dict[str, str]]:
    """Load a checkpoint to fine-tune from: the backbone exactly, the head only if it fits.

    An ImageNet classifier (torchvision's ``resnet50``, 1000 outputs) or any checkpoint whose head
    is not this detector's single logit keeps every other weight; its head is left at the fresh
    initialisation of the architecture. Any other key that is missing, unexpected or mis-shaped
    is still an error. Returns the model (train mode, fp32, CPU), the file's info, and the
    re-initialised head keys with the reason for each (empty when everything fitted). Training
    only: ``scan`` and ``evaluate`` use :func:`load_model`, which never runs on partly random weights.
    """
    path = Path(path)
    state, metadata = read_state_dict(path)
    arch, model, state = _build_for(path, state, metadata, architecture)
    head = head_keys(model)
    expected = model.state_dict()
    misfits = {}
    for key in sorted(head):
        if key not in state:
            misfits[key] = "absent from the checkpoint"
        elif state[key].shape != expected[key].shape:
            misfits[key] = f"checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
    reinit = {key: misfits.get(key, "re-initialised with the rest of the head") for key in sorted(head)} if misfits else {}
    _check_fit(model, state, path, arch, ignore=frozenset(reinit))  # one head: loaded whole or not at all
    _check_config(model, metadata, path)
    kept = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in reinit}
    model.load_state_dict(kept, strict=not reinit)
    info = CheckpointInfo(path=str(path), sha256=file_sha256(path), architecture=arch, metadata=metadata)
    return model.train(), info, reinit


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a kill leaves the old file intact.

    The temporary file is created with mode 0666 minus the process's umask (as ``open`` would), so
    the result has the usual permissions without touching the process-wide umask.
    """
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    metadata: dict | None = None,
    dtype: torch.dtype | None = torch.float16,
) -> str:
    """Write ``model`` as safetensors with JSON metadata, atomically; returns the file's sha256.

    ``dtype`` casts floating-point parameters (fp16 halves the file; BatchNorm statistics survive it
    with a relative error of about 1e-3). ``None`` keeps them as they are.
    """
    config = getattr(model, "config", None)
    meta = dict(metadata or {})
    if config is not None:
        meta.setdefault("architecture", config.architecture)
        meta.setdefault("model_config", config.to_dict())
    meta.setdefault("format_version", FORMAT_VERSION)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    atomic_write(path, lambda tmp: _st_save(state, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    return file_sha256(path)


def with_metadata(src: str | os.PathLike, dst: str | os.PathLike, updates: dict) -> str:
    """Write ``src``'s tensors, unchanged, as a project checkpoint ``dst`` whose metadata is ``src``'s
    with ``updates`` merged in (e.g. a new calibration); returns the new file's sha256."""
    state, metadata = read_state_dict(src)
    meta = {**metadata, **updates}
    meta.setdefault("format_version", FORMAT_VERSION)
    tensors = {k: v.contiguous() for k, v in state.items()}
    atomic_write(dst, lambda tmp: _st_save(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    return file_sha256(dst)
