"""Training data, streamed: a table of paths in memory, one sample decoded and augmented per job.

Only :class:`TrainingTable` (paths, labels, sampling groups, header sizes, whether each file
was a JPEG, the JPEG qualities of the set, aligned-twin partners) lives in memory; its arrays
are plain numpy buffers, so DataLoader workers share them without copying. The pixels of a
sample are decoded, cut and augmented inside a worker (:class:`TrainingSamples`) and dropped,
except that each worker keeps the pixels of its most recently decoded *large* photos in a cache
of fixed size (:class:`DecodedCache`): a 10 MP JPEG takes about 0.4 s to decode for one 64 px
crop, so without it training steps wait on the decoder. The cache's bound does not depend on the
training set's size, and a cached image gives the same pixels as a fresh decode.

**Determinism.** :class:`BatchPlan` turns ``(seed, step[, rank])`` into the batch's jobs: the
images drawn and, for each slot, the seed of its augmentation draws ``(seed, step, slot[,
rank])``. A sample is a pure function of its job, whatever worker computes it, so a resumed
run sees exactly the batches of an uninterrupted one and DDP ranks draw different batches.

**Aligned twins.** A generated image whose manifest ``pair`` names a real photo of the training
table (``detector make-fakes``) is drawn together with that photo: both go into the same batch
with the same augmentation seed, cut at the same position from their common top-left region, so
the pair differs only by what the generator changed.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoints import atomic_write
from ..images import DECODED_FORMATS, ImageError, decode_image, jpeg_quality
from .recipe import Recipe, augment, validation_crops

__all__ = ["BatchPlan", "DecodedCache", "Job", "TrainingSamples", "TrainingTable", "read_header", "simulated_fakes",
           "training_batches", "validation_set"]

_HEADER_THREADS = 8  # header reads wait on the disk (or the network file system), not on the CPU
_SHOWN_SKIPS = 20  # skipped files named in the log; the rest are counted


def read_header(path: str | os.PathLike) -> tuple[int, int, str, int | None]:
    """``(width, height, format, jpeg_quality)`` from a file's header, without decoding pixels.

    Raises :class:`ImageError` for anything :func:`~detector.images.decode_image` would refuse
    to open.
    """
    try:
        with Image.open(path, formats=DECODED_FORMATS) as img:
            fmt = img.format or ""
            return img.width, img.height, fmt, jpeg_quality(img) if fmt in ("JPEG", "MPO") else None
    except FileNotFoundError:
        raise ImageError("file not found (or a dangling symlink)") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"unreadable header: {getattr(err, 'strerror', None) or err}") from None


def _header_or_error(path: str) -> tuple[int, int, str, int | None] | str:
    try:
        return read_header(path)
    except ImageError as err:
        return str(err)


class _Paths:
    """Many paths in two numpy buffers (bytes and offsets): no Python object per path, so forked
    workers never copy them by touching reference counts."""

    def __init__(self, paths: list[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.data[self.offsets[i] : self.offsets[i + 1]].tobytes())


@dataclass
class TrainingTable:
    """What training keeps in memory about its images: one array entry per image."""

    paths: _Paths
    labels: np.ndarray  # int8, 0 real, 1 generated
    groups: np.ndarray  # int32 codes of "label:generator" (fakes) or "label:source" (reals)
    was_jpeg: np.ndarray  # bool
    heights: np.ndarray  # int32, from the header
    widths: np.ndarray  # int32
    partner: np.ndarray  # int64: for an aligned twin, the row of its real photo; else -1
    jpeg_qualities: np.ndarray  # uint8, one per JPEG file: the qualities never-compressed crops are given

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_pairs(self) -> int:
        return int((self.partner >= 0).sum())

    @classmethod
    def build(cls, table: pd.DataFrame, min_size: int, max_pixels: int, log: Callable[[str], None]) -> TrainingTable:
        """Read every file's header (in threads) and keep the images at least ``min_size`` a side.

        Files that cannot be opened, that are smaller than the crop or larger than ``max_pixels``
        are skipped with a log line. Raises ``ValueError`` when a class is left empty.
        """
        paths = [str(p) for p in table["path"]]
        with ThreadPool(_HEADER_THREADS) as pool:
            headers = list(pool.imap(_header_or_error, paths, chunksize=64))
        keep, skipped = [], []
        for i, (path, header) in enumerate(zip(paths, headers)):
            if isinstance(header, str):
                skipped.append(f"{path}: {header}")
            elif min(header[0], header[1]) < min_size:
                skipped.append(f"{path}: {header[0]}x{header[1]} is smaller than the {min_size} px crop")
            elif header[0] * header[1] > max_pixels:
                skipped.append(f"{path}: {header[0]}x{header[1]} exceeds the limit of {max_pixels} pixels")
            else:
                keep.append(i)
        for line in skipped[:_SHOWN_SKIPS]:
            log(f"skipped {line}")
        if len(skipped) > _SHOWN_SKIPS:
            log(f"skipped {len(skipped) - _SHOWN_SKIPS} more files")
        rows = table.iloc[keep]
        labels = rows["label"].to_numpy(dtype=np.int8)
        names = [f"{lab}:{g if lab == 1 else s}" for lab, g, s in zip(labels, rows["generator"], rows["source"])]
        groups, _ = pd.factorize(pd.Series(names))
        kept_headers = [headers[i] for i in keep]
        formats = np.array([h[2] in ("JPEG", "MPO") for h in kept_headers], dtype=bool)
        qualities = np.array([h[3] for h in kept_headers if h[3] is not None], dtype=np.uint8)
        kept_paths = [paths[i] for i in keep]
        out = cls(
            paths=_Paths(kept_paths), labels=labels, groups=groups.astype(np.int32), was_jpeg=formats,
            heights=np.array([h[1] for h in kept_headers], dtype=np.int32),
            widths=np.array([h[0] for h in kept_headers], dtype=np.int32),
            partner=_partners(kept_paths, labels, rows["pair"] if "pair" in rows else None), jpeg_qualities=qualities,
        )
        for c in (0, 1):
            if not (labels == c).any():
                raise ValueError(f"the training data has no usable {'real' if c == 0 else 'generated'} images")
        return out

    def sampling_weights(self, paired: bool) -> np.ndarray:
        """Probability of drawing each image; half the draws land on each class.

        Within a class, groups (generators, photo sources) are weighted by the square root of
        their size, so the large groups (64 DCGAN faces) do not drown the small ones (one BigGAN
        image) and no single image is repeated hundreds of times per epoch. With ``paired``,
        every drawn twin brings its real along, so reals are drawn less often by themselves
        that the batch stays balanced: with a share ``t`` of the fake mass on twins, reals get
        ``(1 - t) / (2 - t)`` of the draws.
        """
        counts = np.bincount(self.groups)
        w = 1.0 / np.sqrt(counts[self.groups])
        class_w = []
        for c in (0, 1):
            m = self.labels == c
            w[m] /= w[m].sum()
            class_w.append(m)
        twin_share = float(w[self.partner >= 0].sum()) if paired else 0.0
        real_mass = (1.0 - twin_share) / (2.0 - twin_share)
        w[class_w[0]] *= real_mass
        w[class_w[1]] *= 1.0 - real_mass
        return w


def _partners(paths: list[str], labels: np.ndarray, pairs: pd.Series | None) -> np.ndarray:
    """For each generated image whose ``pair`` is a real photo of the table, that photo's row."""
    partner = np.full(len(paths), -1, dtype=np.int64)
    if pairs is None:
        return partner
    key = lambda p: os.path.normcase(os.path.abspath(p))  # noqa: E731
    reals = {key(p): i for i, (p, lab) in enumerate(zip(paths, labels)) if lab == 0}
    for i, (pair, lab) in enumerate(zip(pairs, labels)):
        if lab == 1 and isinstance(pair, str) and pair:
            partner[i] = reals.get(key(pair), -1)
    return partner


class Job(NamedTuple):
    """One sample of a batch: the image's row, the seed of its draws, and the region it is cut from
    (``height, width`` from the top-left corner; 0 means the whole image)."""

    row: int
    key: tuple[int, ...]
    height: int = 0
    width: int = 0


class BatchPlan(Sampler):
    """The jobs of every batch from ``start`` to ``stop``: a pure function of (seed, step[, rank])."""

    def __init__(self, table: TrainingTable, batch_size: int, seed: int, start: int, stop: int,
                 rank: int | None = None, paired: bool = True) -> None:
        self.table, self.batch_size, self.seed, self.start, self.stop = table, batch_size, seed, start, stop
        self.rank, self.paired = rank, paired and table.n_pairs > 0
        self.cdf = np.cumsum(table.sampling_weights(self.paired))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[Job]]:
        for step in range(self.start, self.stop):
            yield self.jobs(step)

    def _key(self, *parts: int) -> tuple[int, ...]:
        return (self.seed, *parts) if self.rank is None else (self.seed, *parts, self.rank)

    def jobs(self, step: int) -> list[Job]:
        """The batch of ``step``. Tags 0 (batch draws) and 1 (a slot's draws) keep the seeds apart."""
        rng = np.random.default_rng(self._key(step, 0))
        draws = np.searchsorted(self.cdf, rng.random(self.batch_size) * self.cdf[-1], side="right")
        draws = np.minimum(draws, len(self.cdf) - 1)  # rounding at the top end
        t = self.table
        jobs: list[Job] = []
        for row in draws:
            key = self._key(step, 1, len(jobs))
            real = int(t.partner[row]) if self.paired else -1
            if real >= 0 and len(jobs) + 2 <= self.batch_size:
                h, w = int(min(t.heights[row], t.heights[real])), int(min(t.widths[row], t.widths[real]))
                jobs += [Job(real, key, h, w), Job(int(row), key, h, w)]
            else:
                jobs.append(Job(int(row), key))
            if len(jobs) == self.batch_size:
                break
        return jobs


class DecodedCache:
    """Least-recently-used decoded pixels of images of at least ``min_pixels``, at most ``max_bytes`` in all.

    Only large images are kept: they are the ones whose decoding costs more than the network's
    step, and keeping small ones would make the cache's content grow with the number of images.
    Cached arrays are read-only, so a caller cannot change what the next sample sees.
    """

    def __init__(self, max_bytes: int, min_pixels: int = 1_000_000) -> None:
        self.max_bytes, self.min_pixels, self.nbytes = max_bytes, min_pixels, 0
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()

    def get(self, key: int) -> np.ndarray | None:
        pixels = self._items.get(key)
        if pixels is not None:
            self._items.move_to_end(key)
        return pixels

    def put(self, key: int, pixels: np.ndarray) -> None:
        if pixels.shape[0] * pixels.shape[1] < self.min_pixels or pixels.nbytes > self.max_bytes:
            return
        pixels.setflags(write=False)
        self._items[key] = pixels
        self.nbytes += pixels.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes


class TrainingSamples(Dataset):
    """Decodes, cuts and augments the sample of one :class:`Job` (in a DataLoader worker).

    A file that fails to decode now (it changed since its header was read) is replaced by the
    next image of the same class, and the failure travels with the sample to be logged.
    ``cache_bytes`` bounds each worker's :class:`DecodedCache` of large photos (0: none).
    """

    def __init__(self, table: TrainingTable, recipe: Recipe, max_pixels: int, cache_bytes: int = 0) -> None:
        self.table, self.recipe, self.max_pixels = table, recipe, max_pixels
        self.cache = DecodedCache(cache_bytes)

    def _decode(self, row: int) -> np.ndarray:
        pixels = self.cache.get(row)
        if pixels is None:
            pixels = decode_image(self.table.paths[row], max_pixels=self.max_pixels).pixels
            self.cache.put(row, pixels)
        return pixels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, job: Job) -> tuple[torch.Tensor, int, str]:
        t = self.table
        row, error = job.row, ""
        for _ in range(10):
            try:
                pixels = self._decode(row)
                if min(pixels.shape[:2]) < self.recipe.crop_size:
                    raise ImageError(f"{pixels.shape[1]}x{pixels.shape[0]} is smaller than the crop")
                break
            except ImageError as err:
                error = error or f"{t.paths[row]}: {err}"
                same = np.flatnonzero(t.labels == t.labels[row])
                row = int(same[(np.searchsorted(same, row) + 1) % len(same)])
        else:
            raise ImageError(f"{error} (and the next 9 images of its class failed too)")
        if job.height and row == job.row:
            pixels = pixels[: job.height, : job.width]
        rng = np.random.default_rng(job.key)
        crop = augment(pixels, self.recipe, rng, was_jpeg=bool(t.was_jpeg[row]), prior_qualities=t.jpeg_qualities)
        return torch.from_numpy(np.require(crop, requirements="W")), int(t.labels[row]), error


def _collate(samples: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    x = torch.stack([s[0] for s in samples]).permute(0, 3, 1, 2)
    y = torch.tensor([s[1] for s in samples], dtype=torch.float32)
    return x, y, [s[2] for s in samples if s[2]]


def training_batches(plan: BatchPlan, samples: TrainingSamples, workers: int, pin_memory: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(crops uint8 (N, 3, S, S), labels float (N,), decode failures)`` for every step of ``plan``.

    ``workers`` processes decode ahead of the network (0: in this process). The loader is given
    its own generator so that it does not consume the global torch random state.
    """
    from ..workers import die_with_parent

    loader = DataLoader(
        samples, batch_sampler=plan, num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(plan.seed),
        worker_init_fn=partial(die_with_parent, os.getpid()) if workers else None,
    )
    return iter(loader)


def validation_set(table: pd.DataFrame, size: int, n: int, quality: int | None, max_pixels: int,
                   log: Callable[[str], None]) -> list[tuple[int, list[np.ndarray]]]:
    """``(label, crops)`` of every usable validation image; the decoded pixels are not kept."""
    out = []
    for row in table.itertuples():
        try:
            img = decode_image(row.path, max_pixels=max_pixels)
        except ImageError as err:
            log(f"skipped {row.path}: {err}")
            continue
        if min(img.height, img.width) < 8:
            log(f"skipped {row.path}: {img.width}x{img.height} is smaller than 8 px")
            continue
        out.append((int(row.label), validation_crops(img.pixels, size, n, quality)))
    return out


def simulated_fakes(simulator_path: str | os.PathLike, reals: list[str], folder: str | os.PathLike, min_size: int,
                    *, rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                    log: Callable[[str], None] = print) -> pd.DataFrame:
    """The simulator's reconstruction of each real photo, written as a PNG in ``folder``; their table.

    Each file is named after its real's path and written atomically, so a resumed run reuses
    them. Rank ``rank`` of ``world`` writes every ``world``-th one, then ``barrier()`` waits for
    the other ranks. Reconstructions smaller than ``min_size`` are left out.
    """
    from .simulator import load_simulator, simulate

    simulator = load_simulator(simulator_path)
    folder = Path(folder)
    targets = [folder / (hashlib.sha256(os.fsencode(os.path.abspath(r))).hexdigest()[:20] + ".png") for r in reals]
    for real, target in list(zip(reals, targets))[rank::world]:
        if target.exists():
            continue
        try:
            pixels = decode_image(real).pixels
        except ImageError as err:
            log(f"no simulated fake of {real}: {err}")
            continue
        fake = simulate(simulator, pixels)
        if min(fake.shape[:2]) >= min_size:
            atomic_write(target, lambda tmp, f=fake: Image.fromarray(f).save(tmp, format="PNG"))
    barrier()
    paths = [str(t) for t in targets if t.exists()]
    return pd.DataFrame({"path": paths, "label": 1, "generator": "simulated", "family": "simulated",
                         "source": "simulated"})
