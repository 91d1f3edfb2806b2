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
is refused, listing the keys: the tool must never run on random weights. Training alone may start
from a checkpoint whose classifier head does not fit (:func:`load_backbone`: an ImageNet
classifier's 1000 outputs); it re-initialises that head and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save
from torch import Tensor, nn

from .models import create_model

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "atomic_write",
    "file_sha256",
    "head_keys",
    "load_backbone",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
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

    @property
    def temperature(self) -> float:
        """Divides logits before the sigmoid; fitted on validation data by training (default 1)."""
        return float(self.metadata.get("calibration", {}).get("temperature", 1.0))

    @property
    def threshold(self) -> float:
        """Logit at or above which an image is called generated (default 0)."""
        return float(self.metadata.get("calibration", {}).get("threshold", 0.0))

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
        try:
            metadata = json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: corrupt metadata: {err}") from None
        return _unwrap(state, path), metadata
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
    """The architecture a checkpoint is loaded into, and its state with timm's prefix added if needed."""
    arch = architecture or metadata.get("architecture") or "resnet50nodown"
    if metadata.get("architecture") and architecture and architecture != metadata["architecture"]:
        raise CheckpointError(
            f"{path}: was trained as {metadata['architecture']!r}, not {architecture!r}; drop --arch"
        )
    model = create_model(arch)
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
    kept = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in reinit}
    model.load_state_dict(kept, strict=not reinit)
    info = CheckpointInfo(path=str(path), sha256=file_sha256(path), architecture=arch, metadata=metadata)
    return model.train(), info, reinit


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a kill leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
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
