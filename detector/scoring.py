"""The one scoring path of every command: what a model set needs cut from an image, and the stream
that turns prepared images into verdicts.

Two halves, so that the costly cutting runs where the decoding does (in worker processes):

* :class:`Preparation` (picklable) turns RGB pixels into the crops the convolutional member scores
  and the views each probe encodes. A model set hands out its own (``Ensemble.transforms``), as
  torchvision's weights hand out ``transforms()``.
* :func:`score_stream` takes prepared images in order, batches the crops of consecutive images
  that share a shape through the convolutional member, encodes each probe's views, and yields
  every image's :class:`~detector.calibration.Verdict` (or its error) in input order, as soon as
  its last crop is scored.

``detector scan``, ``detector evaluate``, ``detector calibrate`` and the Python API
(``Ensemble.predict_many``) all score through :func:`score_stream`; a fix to scoring lands
everywhere at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .fusion import combine_crops
from .images import ImageError
from .patches import PatchSettings, encoder_views

__all__ = ["MIN_SIDE", "ModelSet", "Preparation", "Scored", "score_stream"]

_THUMBNAIL = 1024
# The smallest side scored. Below it an image carries too little for either model: fewer than two
# 16 px CLIP patches and four 8 px cells of the ResNet's map across, upscaled (the probe) or padded
# nowhere (a 256 px patch plan shrinks to the image). A 1x1 image scored 0.77 "fake" before this
# bound; smaller inputs are error rows (`detector scan`) or an ImageError (the Python API).
MIN_SIDE = 32


@dataclass(frozen=True)
class Preparation:
    """What to cut from an image for one model set: the convolutional member's crops (``settings``,
    None when no such member is computed) and one ``(size, n, mode)`` view spec per probe (see
    :func:`detector.patches.encoder_views`). ``thumbnail`` keeps a small copy for heatmaps."""

    settings: PatchSettings | None
    view_specs: tuple[tuple[int, int, str], ...] = ()
    align: int = 8
    thumbnail: bool = False

    def __call__(self, pixels: np.ndarray) -> dict:
        """The prepared image: ``plan``, ``crops`` (tensors: a worker hands them over in shared memory),
        ``views`` (one tensor per probe), ``width``, ``height`` and ``thumbnail``."""
        h, w = pixels.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise ImageError(f"too small to carry a trace: {w}x{h} px (the shorter side must be at least {MIN_SIDE} px)")
        plan = self.settings.plan(h, w, align=self.align) if self.settings else []
        # np.array copies: decoded pixels may be read-only, and torch wants memory it may write
        crops = [torch.from_numpy(np.array(c.cut(pixels), order="C")) for c in plan]
        views = [torch.from_numpy(encoder_views(pixels, size=size, n=n, mode=mode)) for size, n, mode in self.view_specs]
        thumbnail = None
        if self.thumbnail:
            step = max(1, int(np.ceil(max(h, w) / _THUMBNAIL)))
            thumbnail = np.ascontiguousarray(pixels[::step, ::step])
        return {"plan": plan, "crops": crops, "views": views, "width": w, "height": h, "thumbnail": thumbnail}


class ModelSet(Protocol):
    """What :func:`score_stream` needs of a model set (:class:`detector.ensemble.Ensemble` is one):
    its members, the convolutional one among them (or None), and how member logits become a verdict."""

    members: list
    conv: object

    def combine(self, logits: Sequence[float], **extra): ...


@dataclass
class Scored:
    """One image out of :func:`score_stream`: the input item (its ``error`` set if it was not scored),
    its verdict (None on error), and the seconds spent on it (decoding share included)."""

    item: dict
    verdict: "object | None"
    error: str
    seconds: float


@dataclass
class _Pending:
    item: dict
    maps: list
    remaining: int
    seconds: float


def score_stream(model_set: "ModelSet", items: Iterable[dict], *, batch_size: int = 16, mode: str = "patches",
                 fusion: str = "mean", max_pending: int | None = None) -> Iterator[Scored]:
    """Verdicts of prepared images, in input order.

    ``items`` are dicts from ``model_set.transforms(...)`` (see :class:`Preparation`) plus whatever
    the caller carries along (a path, an index); an item whose ``error`` is set is passed through.
    ``mode`` and ``fusion`` are the patch settings' mode and the patch fusion rule. A member that
    fails on one image, or gives a non-finite score, makes that image an error, never a verdict.
    """
    conv = model_set.conv
    pending: dict[int, _Pending] = {}
    queues: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    max_pending = max_pending or max(8, 4 * batch_size)
    counter = 0
    next_out = 0

    def run_batch(entries: list[tuple[int, int, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        maps = conv.crop_maps(torch.stack([e[2] for e in entries]).permute(0, 3, 1, 2))
        share = (time.perf_counter() - t0) / len(entries)
        for (index, k, _), m in zip(entries, maps):
            p = pending[index]
            p.maps[k] = m
            p.remaining -= 1
            p.seconds += share

    def flush(all_shapes: bool, stale: frozenset = frozenset()) -> None:
        """Run every full batch; also the partial ones of ``stale`` shapes (or of all shapes)."""
        for shape in list(queues):
            q = queues[shape]
            size = conv.batch_limit(shape, batch_size)
            while len(q) >= size or ((all_shapes or shape in stale) and q):
                chunk, queues[shape] = q[:size], q[size:]
                q = queues[shape]
                run_batch(chunk)
            if not q:
                del queues[shape]

    def finished() -> Iterator[Scored]:
        nonlocal next_out
        while next_out in pending and pending[next_out].remaining == 0:
            yield _finish(pending.pop(next_out), model_set, mode, fusion)
            next_out += 1

    for item in items:
        index = counter
        counter += 1
        crops = [] if item.get("error") else list(item.get("crops") or [])
        pending[index] = _Pending(item, [None] * len(crops), len(crops), float(item.get("seconds", 0.0)))
        shapes = frozenset(tuple(c.shape[:2]) for c in crops)
        for k, crop in enumerate(crops):
            queues.setdefault(tuple(crop.shape[:2]), []).append((index, k, crop))
        item["crops"] = None  # the queues hold them now
        # A shape that this image does not continue will not fill its batch soon: score it now, so
        # that verdicts (yielded in input order) advance as images finish instead of waiting for the
        # end of the stream behind a lone small image.
        if conv is not None and queues:
            flush(all_shapes=len(pending) >= max_pending, stale=frozenset(queues) - shapes if shapes else frozenset())
        yield from finished()
    if conv is not None:
        flush(all_shapes=True)
    yield from finished()


def _finish(p: _Pending, model_set: "ModelSet", mode: str, fusion: str) -> Scored:
    item = p.item
    if item.get("error"):
        return Scored(item, None, str(item["error"]), p.seconds)
    t0 = time.perf_counter()
    try:
        conv = model_set.conv
        views = iter(item["views"])
        logits, canvas = [], None
        for member in model_set.members:
            if member is conv:
                logit, canvas = combine_crops(item["plan"], p.maps, mode=mode, rule=fusion, stride=conv.stride,
                                              height=item["height"], width=item["width"])
            else:
                logit = member.score_views(next(views).numpy(), size=(item["height"], item["width"]))
            logits.append(logit)
        n = len(item["plan"]) if conv is not None else sum(len(v) for v in item["views"])
        verdict = model_set.combine(logits, logit_map=canvas, n_patches=n, width=item["width"], height=item["height"])
    except Exception as err:  # noqa: BLE001 - one image's failure must not stop the stream
        message = str(err) if isinstance(err, FloatingPointError) else f"unexpected {type(err).__name__}: {err}"
        return Scored(item, None, message, p.seconds + time.perf_counter() - t0)
    return Scored(item, verdict, "", p.seconds + time.perf_counter() - t0)
