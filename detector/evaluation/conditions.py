"""Conditions of an evaluation: the settings, the preprocessing every image gets, and the perturbations.

Preprocessing, identical for both classes: decode (no resizing) -> ``center_crop`` -> ``align_jpeg``
(an in-memory JPEG round trip) -> the condition's perturbation -> patches. The condition ``none`` is
the images after the first three steps; each perturbation of the robustness sweep is another
condition, seeded per file content, so that a real and a fake get the same treatment.

Perturbations chain with ``+``: ``center:256+jpeg:90`` is a central 256 px crop then a JPEG
round trip at quality 90, the way a crop shared on the web arrives. The conditions of the in-the-wild
figures (issue #18) are :data:`WILD_CONDITIONS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from PIL import Image

from ..fusion import FUSION_RULES, MODEL_FUSION_RULES
from ..images import DEFAULT_MAX_PIXELS, gaussian_blur, reencode, reencode_jpeg
from ..patches import PatchSettings, relevant_settings

__all__ = ["CLEAN", "MODEL_FUSION_RULES", "PERTURBATION_KINDS", "WILD_CONDITIONS", "Chain", "EvalOptions",
           "Perturbation", "condition_rng",
           "parse_perturbations", "preprocess"]

CLEAN = "none"
PERTURBATION_KINDS = ("jpeg", "webp", "resize", "blur", "crop", "center", "png", "screenshot")
# How images arrive where people scan them: each a condition of `detector evaluate --wild`
WILD_CONDITIONS = ("center:256+jpeg:90", "resize:0.5", "jpeg:75", "screenshot:1080")


@dataclass(frozen=True)
class Perturbation:
    """One step of a condition of the robustness sweep.

    ``jpeg:Q`` and ``webp:Q`` (a round trip at quality Q), ``resize:F`` (bicubic, factor F),
    ``blur:SIGMA``, ``crop:S`` (an S px crop at a seeded random place), ``center:S`` (the central S px,
    on the 8 px JPEG grid), ``png`` (a lossless PNG re-save: the pixels are unchanged, only the
    container is), ``screenshot:H`` (what a screenshot of the image shown on a 16:9 screen H px high
    keeps: fitted into (16/9 H) x H with bilinear smoothing if larger, saved as PNG).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATION_KINDS)}, got {self.kind!r}")
        v = self.value
        if self.kind == "jpeg" and not (float(v).is_integer() and 1 <= v <= 100):
            raise ValueError(f"jpeg quality must be an integer in [1, 100], got {v:g}")
        if self.kind == "resize" and not 0 < v <= 4:
            raise ValueError(f"resize factor must be in (0, 4], got {v:g}")
        if self.kind == "blur" and not 0 < v <= 20:
            raise ValueError(f"blur sigma must be in (0, 20], got {v:g}")
        if self.kind == "webp" and not (float(v).is_integer() and 1 <= v <= 100):
            raise ValueError(f"webp quality must be an integer in [1, 100], got {v:g}")
        if self.kind in ("crop", "center") and not (float(v).is_integer() and v >= 8):
            raise ValueError(f"{self.kind} size must be an integer >= 8, got {v:g}")
        if self.kind == "screenshot" and not (float(v).is_integer() and v >= 64):
            raise ValueError(f"screenshot height must be an integer >= 64, got {v:g}")

    @property
    def name(self) -> str:
        return "png" if self.kind == "png" else f"{self.kind}:{self.value:g}"

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of what :meth:`apply` makes of an image of this size (the size a
        detector's minimum is checked against, known without decoding)."""
        if self.kind in ("crop", "center"):
            return min(int(self.value), width), min(int(self.value), height)
        if self.kind == "resize":
            return max(1, round(width * self.value)), max(1, round(height * self.value))
        if self.kind == "screenshot":
            factor = min(1.0, self.value / height, round(self.value * 16 / 9) / width)
            if factor < 1:
                return max(1, round(width * factor)), max(1, round(height * factor))
        return width, height

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The perturbed RGB uint8 pixels; ``rng`` places the crop (the other kinds ignore it)."""
        if self.kind == "jpeg":
            return reencode_jpeg(pixels, int(self.value))
        if self.kind == "blur":
            return np.ascontiguousarray(gaussian_blur(pixels, float(self.value)))
        if self.kind in ("webp", "png"):
            return reencode(pixels, self.kind.upper(), int(self.value) if self.kind == "webp" else None)
        if self.kind == "center":
            return preprocess(pixels, center_crop=int(self.value))
        h, w = pixels.shape[:2]
        if self.kind == "screenshot":
            box_h, box_w = int(self.value), round(self.value * 16 / 9)
            factor = min(1.0, box_h / h, box_w / w)
            if factor < 1:
                size = (max(1, round(w * factor)), max(1, round(h * factor)))
                pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.BILINEAR))
            return reencode(pixels, "PNG", None)
        if self.kind == "resize":
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.BICUBIC))
        ch, cw = min(int(self.value), h), min(int(self.value), w)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return np.ascontiguousarray(pixels[top : top + ch, left : left + cw])


@dataclass(frozen=True)
class Chain:
    """Perturbations applied one after the other (``center:256+jpeg:90``); one condition."""

    steps: tuple[Perturbation, ...]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.steps)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        for step in self.steps:
            width, height = step.output_size(width, height)
        return width, height

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in self.steps:
            pixels = step.apply(pixels, rng)
        return pixels


def parse_perturbations(specs: Iterable[str]) -> tuple[Perturbation | Chain, ...]:
    """``["jpeg:95,75", "blur:1", "center:256+jpeg:90"]`` -> one condition per value (a chain for
    ``+``), in order, without repeats. ``png`` takes no value."""
    out: list[Perturbation | Chain] = []
    for spec in specs:
        if "+" in spec:
            steps = []
            for part in spec.split("+"):
                parsed = parse_perturbations([part.strip()])
                if len(parsed) != 1 or isinstance(parsed[0], Chain):
                    raise ValueError(f"{spec!r}: each step of a chain takes exactly one value")
                steps.append(parsed[0])
            chain = Chain(tuple(steps))
            if chain not in out:
                out.append(chain)
            continue
        if spec.strip().lower() == "png":
            if Perturbation("png", 0) not in out:
                out.append(Perturbation("png", 0))
            continue
        kind, sep, values = spec.partition(":")
        if not sep or not values:
            raise ValueError(f"a perturbation is KIND:VALUE[,VALUE...] with KIND in {', '.join(PERTURBATION_KINDS)}, "
                             f"got {spec!r}")
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{spec!r}: {text!r} is not a number") from None
            p = Perturbation(kind.strip().lower(), value)
            if p not in out:
                out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class EvalOptions:
    """Every evaluation setting except inputs, weights and output folder.

    ``patches``, ``fusion`` (of patch logits), ``batch_size``, ``workers`` and ``max_pixels`` mean
    what they mean for ``scan``. ``model_fusion`` fuses several models' logits. ``seed`` seeds the
    perturbations and the bootstrap (patch positions have ``patches.seed``).
    """

    patches: PatchSettings = field(default_factory=PatchSettings)
    fusion: str = "mean"
    model_fusion: str = "mean"
    model_weights: tuple[float, ...] | None = None  # each model's say in the fused column (None: equal)
    align_jpeg: int | None = None
    center_crop: int | None = None
    perturbations: tuple[Perturbation | Chain, ...] = ()
    batch_size: int = 16
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    n_boot: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if self.model_fusion not in MODEL_FUSION_RULES:
            raise ValueError(f"model fusion must be one of {MODEL_FUSION_RULES}, got {self.model_fusion!r}")
        if self.align_jpeg is not None and not 1 <= self.align_jpeg <= 100:
            raise ValueError(f"align_jpeg must be a JPEG quality in [1, 100], got {self.align_jpeg}")
        if self.center_crop is not None and self.center_crop < 8:
            raise ValueError(f"center_crop must be at least 8 px, got {self.center_crop}")
        if self.batch_size < 1 or self.workers < 0 or self.n_boot < 0:
            raise ValueError("batch_size must be >= 1, workers >= 0 and n_boot >= 0")

    @property
    def conditions(self) -> tuple[Perturbation | Chain | None, ...]:
        """``None`` (the clean condition) then each perturbation."""
        return (None, *self.perturbations)

    def scored_size(self, width: int, height: int, condition: Perturbation | Chain | None) -> tuple[int, int]:
        """``(width, height)`` of a stored image of this size as the models see it under ``condition``
        (after the central crop and the perturbation; a JPEG round trip keeps the size)."""
        if self.center_crop:
            width, height = min(self.center_crop, width), min(self.center_crop, height)
        return condition.output_size(width, height) if condition is not None else (width, height)

    def scoring_settings(self) -> dict:
        """Everything besides the model and the condition that can change a logit."""
        patches = relevant_settings(asdict(self.patches))  # options without effect in the mode do not count
        return {"patches": patches, "fusion": self.fusion if self.patches.mode == "patches" else None,
                "max_pixels": self.max_pixels,
                "align_jpeg": self.align_jpeg, "center_crop": self.center_crop, "seed": self.seed}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perturbations"] = [p.name for p in self.perturbations]
        return out



def preprocess(pixels: np.ndarray, *, center_crop: int | None = None, align_jpeg: int | None = None) -> np.ndarray:
    """What the evaluation does to every image of both classes: a central crop, then a JPEG round trip.

    The crop's origin is rounded down to a multiple of 8, which keeps a JPEG's 8x8 block grid in
    phase; an image smaller than ``center_crop`` keeps its size in that dimension.
    """
    if center_crop:
        h, w = pixels.shape[:2]
        ch, cw = min(center_crop, h), min(center_crop, w)
        top, left = (h - ch) // 2 // 8 * 8, (w - cw) // 2 // 8 * 8
        pixels = pixels[top : top + ch, left : left + cw]
    if align_jpeg:
        pixels = reencode_jpeg(pixels, align_jpeg)
    return np.ascontiguousarray(pixels)


def condition_rng(seed: int, sha256: str, condition: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{sha256}:{condition}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


