"""Benchmark evaluation: labelled images in; per-image scores, metric tables, plots and a run record out.

The path of :func:`evaluate`:

1. **inspect** every file in DataLoader workers: content sha256, byte size, format, size and JPEG
   quality, read from the header only;
2. **score** every image under every condition with every model (:meth:`Detector.score_pixels`,
   the same patch settings as ``scan``). Decoding, preprocessing and perturbation happen in the
   workers; a score already in the cache is not computed again, and an image is decoded only if
   some model still needs it;
3. **metrics** per group with :func:`detector.metrics.summary`, at each model's calibrated
   threshold and temperature. Groups follow Corvi et al. 2023: each generator's fakes against
   *all* reals pooled, each family (when the data names families), all fakes against all reals,
   and ``average``, the mean of the generator rows. The bias breakdown restricts *both* classes to
   one file format or one resolution bucket, so a result that the container explains collapses
   there;
4. **files** in the output folder (see :data:`OUTPUT_FILES`), each written atomically.

The package, one module per part: :mod:`.conditions` (settings, preprocessing, perturbations),
:mod:`.cache` (the score cache), :mod:`.scoring` (steps 1 and 2), :mod:`.groups` (model fusion,
groups, metric tables), :mod:`.bias` (bias guards), :mod:`.report` and :mod:`.plots` (step 4),
:mod:`.run` (the entry points).

Preprocessing, identical for both classes: decode (no resizing) -> ``center_crop`` -> ``align_jpeg``
(an in-memory JPEG round trip) -> the condition's perturbation -> patches. The condition ``none`` is
the images after the first three steps; each perturbation of the robustness sweep is another
condition, seeded per file content, so that a real and a fake get the same treatment.

Model fusion (several ``--weights``): each model's logit becomes its calibrated margin
``(logit - threshold) / temperature``, positive exactly where that model says "generated"; the rule
(``mean``, ``max``, or ``soft-or``: the probability that at least one model says "generated",
``1 - prod(1 - p_i)``) combines the margins, and the fused model's threshold is 0 (temperature 1).

The cache (``cache/`` in the output folder) maps (file content sha256, settings key) to a logit.
The settings key covers the package and torch versions, the weights' sha256, architecture, device,
precision, every patch and preprocessing setting, the seed and the condition, so a cached score is reused only where it would come out the
same. Scores go to new part files written whole with :func:`~detector.checkpoints.atomic_write`;
every row carries a CRC, so a damaged part costs only its damaged rows, which are scored again.
"""

from .bias import bias_warnings
from .cache import ScoreCache, settings_key
from .conditions import CLEAN, MODEL_FUSION_RULES, PERTURBATION_KINDS, EvalOptions, Perturbation, parse_perturbations, preprocess
from .groups import Group, ModelSpec, breakdown_groups, fuse_models, group_metrics, metric_groups, size_bucket
from .report import OUTPUT_FILES, EvalResult, summary_table
from .run import evaluate, evaluate_scan_outputs, evaluate_scores
from .scoring import inspect_file

__all__ = [
    "CLEAN",
    "MODEL_FUSION_RULES",
    "OUTPUT_FILES",
    "PERTURBATION_KINDS",
    "EvalOptions",
    "EvalResult",
    "Group",
    "ModelSpec",
    "Perturbation",
    "ScoreCache",
    "bias_warnings",
    "breakdown_groups",
    "evaluate",
    "evaluate_scan_outputs",
    "evaluate_scores",
    "fuse_models",
    "group_metrics",
    "inspect_file",
    "metric_groups",
    "parse_perturbations",
    "preprocess",
    "settings_key",
    "size_bucket",
    "summary_table",
]
