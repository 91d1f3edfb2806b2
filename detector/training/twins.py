"""Aligned fakes: each real photo paired with a twin that differs from it only by a generator's traces.

Rajan et al. (ICLR 2025, "Aligned Datasets Improve Detection of Latent Diffusion-Generated Images")
pass real photos through a latent diffusion model's autoencoder, encoder then decoder: the
reconstruction keeps the photo's content, framing and size, and carries the decoder's up-sampling
traces, which every image generated in that latent space carries too. A detector trained on such
pairs cannot lean on content; only the traces tell the two apart.

Two methods:

* ``tae``: TAEF2, the tiny autoencoder (Ollin Boer Bohan, MIT license) for FLUX.2's latent space
  (32 channels, 8x smaller), read from ``taef2_encoder.pth`` and ``taef2_decoder.pth``;
* ``autogan``: the fake simulator of :mod:`.simulator` (``detector simulate`` trains it).

Every twin has exactly its real's size and pixel grid: sides are reflect-padded to the model's
multiple and cropped back, and large images are processed in overlapping tiles so memory stays
bounded whatever the photo's size.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor, nn

from ..checkpoints import CheckpointError, _check_fit, atomic_write, read_state_dict
from ..images import DEFAULT_MAX_PIXELS, ImageError, InputError, decode_image
from .simulator import Simulator, load_simulator

__all__ = ["TAEF2", "TwinMaker", "FakesSummary", "MANIFEST_COLUMNS", "METHODS", "load_tae", "make_fakes", "twin_name",
           "twin_maker", "DEFAULT_TAE_DIR"]

METHODS = ("tae", "autogan")
DEFAULT_TAE_DIR = Path("..") / "shared" / "models" / "taef2"
MANIFEST_COLUMNS = ["path", "label", "generator", "source", "pair"]
AUTOGAN_MAX_PIXELS = 1 << 22
_TAE_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class _Block(nn.Module):
    """conv3x3-ReLU-conv3x3-ReLU-conv3x3 plus identity, then ReLU.

    With ``pooled``, a branch first adds to the input its own transform: 1x1 conv c->4c, GroupNorm
    (4 groups), ReLU, 1x1 conv 4c->c. The pooling is GroupNorm's: each group is normalised by its
    mean and variance over the whole image, which lets every position see the image's global
    statistics. (Measured on 8 photos at 512 px: this reading reconstructs at 33.2 dB; feeding the
    branch the image's global average instead gives 26.4 dB, a 3x3 or 2x2 average 32.3-32.6 dB.)
    """

    def __init__(self, channels: int, pooled: bool = False) -> None:
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                   nn.Conv2d(4 * c, c, 1, bias=False)) if pooled else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: latents squashed smoothly into (-3, 3) before decoding."""

    def forward(self, x: Tensor) -> Tensor:
        return 3.0 * torch.tanh(x / 3.0)


class TAEF2(nn.Module):
    """The tiny autoencoder for FLUX.2 latents; module names are those of the published state dicts.

    ``encoder``: pixels in [0, 1], (N, 3, H, W) with H, W multiples of 8 -> latents (N, 32, H/8, W/8).
    ``decoder``: latents -> pixels in [0, 1] (not clamped).
    """

    scale = 8
    latent_channels = 32

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w, z = width, self.latent_channels
        enc: list[nn.Module] = [_conv(3, w), _Block(w)]
        for stage in range(3):
            enc += [_conv(w, w, stride=2, bias=False)] + [_Block(w, pooled=stage == 2) for _ in range(3)]
        enc += [_conv(w, z)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [_SoftClamp(), _conv(z, w), nn.ReLU()] + [_Block(w, pooled=True) for _ in range(3)]
        for n_blocks in (3, 3, 1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, w, bias=False)]
            dec += [_Block(w) for _ in range(n_blocks)]
        dec += [_conv(w, 3)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (pixels in [0, 1], sides multiples of 8)."""
        return self.decoder(self.encoder(x))


def load_tae(folder: str | os.PathLike) -> TAEF2:
    """TAEF2 from ``folder``/taef2_encoder.pth and taef2_decoder.pth, read safely and fitted exactly.

    Raises :class:`CheckpointError` if a file is missing, holds anything but tensors, or does not fit
    the architecture (a missing, unexpected or mis-shaped key).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (the taef2 weights: {' and '.join(_TAE_FILES)}); "
                              f"point --tae-dir at the folder that holds them")
    model = TAEF2()
    for name, part in zip(_TAE_FILES, (model.encoder, model.decoder)):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a taef2 folder holds {' and '.join(_TAE_FILES)})")
        state, _ = read_state_dict(path)
        _check_fit(part, state, path, f"TAEF2 {name.split('_')[1].split('.')[0]}")
        part.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@dataclass(frozen=True)
class _Stage:
    """One network applied in tiles (unless ``whole``): its input has ``px_in`` image pixels per unit,
    its output ``px_out``."""

    net: nn.Module
    px_in: int
    px_out: int
    whole: bool = False


class TwinMaker:
    """Turns a real photo into its aligned twin with one model, in bounded memory.

    ``stages`` run in turn, each over overlapping tiles of ``tile`` px cores with ``margin`` px of
    context on every side (only the cores are kept, so tiles join on the exact pixel grid); images
    up to ``tile`` px a side, and stages marked ``whole`` (layers whose normalisation statistics span
    the image), go through whole. Pixels enter and leave as values in ``value_range``. A maker
    whose every stage is ``whole`` says how large an image it takes in ``max_pixels``.
    """

    def __init__(self, generator: str, stages: list[_Stage], multiple: int, value_range: tuple[float, float],
                 *, device: str | torch.device = "cpu", tile: int = 512, margin: int = 64,
                 max_pixels: int | None = None) -> None:
        if tile <= 0 or margin < 0 or tile % multiple or margin % multiple:
            raise ValueError(f"tile ({tile}) must be a positive multiple of {multiple} px, margin ({margin}) a multiple")
        self.generator, self.multiple, self.value_range = generator, multiple, value_range
        self.device = torch.device(device)
        self.stages = [_Stage(s.net.to(self.device).eval(), s.px_in, s.px_out, s.whole) for s in stages]
        self.tile, self.margin = tile, margin
        self.max_pixels = max_pixels  # largest image it takes (None: any; tiles bound the memory)

    @torch.no_grad()
    def make_twin(self, pixels: np.ndarray) -> np.ndarray:
        """The twin of an RGB uint8 image (H, W, 3): same size, same pixel grid, RGB uint8."""
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 pixels of shape (H, W, 3), got {pixels.dtype} {pixels.shape}")
        h, w = pixels.shape[:2]
        if self.max_pixels is not None and h * w > self.max_pixels:
            raise ValueError(f"{w}x{h} is more than the {self.max_pixels} pixels that {self.generator} twins are made of")
        m = self.multiple
        padded = np.pad(pixels, ((0, -h % m), (0, -w % m), (0, 0)), mode="reflect")
        lo, hi = self.value_range
        x = torch.from_numpy(np.ascontiguousarray(padded)).to(self.device).permute(2, 0, 1)[None].float()
        x = x * ((hi - lo) / 255.0) + lo
        for stage in self.stages:
            x = self._tiled(stage, x)
        y = ((x[0, :, :h, :w] - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)
        return y.permute(1, 2, 0).cpu().numpy()

    def _tiled(self, stage: _Stage, x: Tensor) -> Tensor:
        height, width = (s * stage.px_in for s in x.shape[2:])
        if stage.whole or (height <= self.tile and width <= self.tile):
            return stage.net(x)
        out = None
        for top in range(0, height, self.tile):
            for left in range(0, width, self.tile):
                bottom, right = min(top + self.tile, height), min(left + self.tile, width)
                t0, l0 = max(0, top - self.margin), max(0, left - self.margin)
                t1, l1 = min(height, bottom + self.margin), min(width, right + self.margin)
                i = stage.px_in
                y = stage.net(x[:, :, t0 // i : t1 // i, l0 // i : l1 // i])
                o = stage.px_out
                if out is None:
                    out = y.new_empty((1, y.shape[1], height // o, width // o))
                out[:, :, top // o : bottom // o, left // o : right // o] = (
                    y[:, :, (top - t0) // o : (bottom - t0) // o, (left - l0) // o : (right - l0) // o])
        return out


def twin_maker(method: str, *, tae_dir: str | os.PathLike | None = None, simulator: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", tile: int = 512) -> TwinMaker:
    """The :class:`TwinMaker` of ``method``: ``tae`` (TAEF2 from ``tae_dir``) or ``autogan`` (``simulator`` file)."""
    if method == "tae":
        tae = load_tae(DEFAULT_TAE_DIR if tae_dir is None else tae_dir)
        s = TAEF2.scale
        # The GroupNorm blocks see the whole image's statistics, so they run untiled; they all work at
        # 1/8 scale (the encoder's last layers, the decoder's first), where a 24 MP photo takes 100 MB
        # a 64-channel tensor. The full-scale layers around them run in tiles.
        enc, dec = tae.encoder, tae.decoder
        cut_enc = next(i for i, m in enumerate(enc) if isinstance(m, _Block) and m.pool is not None)
        cut_dec = 1 + max(i for i, m in enumerate(dec) if isinstance(m, _Block) and m.pool is not None)
        stages = [_Stage(enc[:cut_enc], 1, s), _Stage(enc[cut_enc:], s, s, whole=True),
                  _Stage(dec[:cut_dec], s, s, whole=True), _Stage(dec[cut_dec:], s, 1)]
        return TwinMaker("tae-taef2", stages, s, (0.0, 1.0), device=device, tile=tile, margin=64)
    if method == "autogan":
        if simulator is None:
            raise ValueError("--method autogan needs --simulator FILE (train one with `detector simulate`)")
        sim: Simulator = load_simulator(simulator)
        # InstanceNorm normalises each layer by the whole input's statistics: tiles would each get
        # their own and leave seams (measured with a briefly trained simulator: 512 px tiles 15 grey
        # levels on average apart from a whole pass), so images go through whole, up to 4 Mpixels.
        return TwinMaker("autogan", [_Stage(sim, 1, 1, whole=True)], 4, (-1.0, 1.0), device=device, tile=tile,
                         margin=0, max_pixels=AUTOGAN_MAX_PIXELS)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass
class FakesSummary:
    """What :func:`make_fakes` did."""

    manifest: Path
    reals: int
    written: int
    kept: int
    failed: int
    seconds: float

    def line(self) -> str:
        per = self.seconds / self.written if self.written else 0.0
        return (f"{self.reals} reals: {self.written} twins written ({per:.1f} s each), {self.kept} already there, "
                f"{self.failed} skipped; manifest {self.manifest}")


def twin_name(real: str | os.PathLike, generator: str) -> str:
    """A file name for the twin of ``real``: readable (its folder and stem), unique (a hash of its full
    path), safe (letters, digits, ``._-`` only, bounded length)."""
    full = os.path.abspath(real)
    digest = hashlib.sha1(full.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    path = Path(full)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.parent.name}__{path.stem}").strip("._")[:80]
    return f"{readable}-{digest}.{generator}.png"


def _relative(path: str | os.PathLike, folder: Path) -> str:
    """``path`` relative to ``folder``, both with symlinks resolved (the OS resolves ``..`` after a
    symlinked folder from its target); absolute where no relative path exists (another drive)."""
    try:
        return os.path.relpath(os.path.realpath(path), os.path.realpath(folder))
    except ValueError:
        return os.path.realpath(path)


def _existing_generators(manifest: Path) -> set[str]:
    if not manifest.is_file():
        return set()
    try:
        old = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{manifest}: exists but cannot be read ({err}); move it away or choose another -o") from None
    if not {"label", "generator"} <= set(old.columns):
        raise InputError(f"{manifest}: exists and is not a make-fakes manifest; choose another -o")
    return set(old.loc[old["label"] == "1", "generator"])


def make_fakes(
    table: pd.DataFrame,
    outdir: str | os.PathLike,
    maker: TwinMaker,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FakesSummary:
    """Write the twin of every real image (label 0) of ``table`` into ``outdir``, and ``outdir/manifest.csv``.

    ``table`` is a labelled table (:func:`detector.datasets.read_labelled`). The manifest has columns
    :data:`MANIFEST_COLUMNS`: one row per real (label 0, ``pair`` empty) and one per twin (label 1,
    ``generator`` the maker's, ``source`` the real's, so that splitting by source keeps pairs
    together, ``pair`` the real's path); paths are relative to ``outdir``. Twins already written are
    kept (a rerun resumes); each file is written whole or not at all. Unreadable reals are skipped,
    said, and left out of the manifest.
    """
    from tqdm import tqdm

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    manifest = outdir / "manifest.csv"
    others = _existing_generators(manifest) - {maker.generator}
    if others:
        raise InputError(f"{outdir}: already holds twins made by {', '.join(sorted(others))}; "
                         f"write {maker.generator} twins to another folder")
    reals = table.loc[table["label"] == 0].drop_duplicates("path")
    if reals.empty:
        raise InputError("no real image (label 0) in the data: twins are made from real photos")
    rows: list[dict] = []
    written = kept = failed = 0
    seconds = 0.0
    bar = tqdm(total=len(reals), disable=not progress, file=sys.stderr, unit="img", dynamic_ncols=True)
    for real in reals.itertuples(index=False):
        twin = outdir / twin_name(real.path, maker.generator)
        if twin.is_file():
            kept += 1
        else:
            try:
                pixels = decode_image(real.path, min(max_pixels, maker.max_pixels or max_pixels)).pixels
            except ImageError as err:
                failed += 1
                bar.write(f"skipped {real.path}: {err}")
                bar.update()
                continue
            t0 = time.perf_counter()
            fake = maker.make_twin(pixels)
            atomic_write(twin, lambda tmp, fake=fake: Image.fromarray(fake).save(tmp, format="PNG"))
            seconds += time.perf_counter() - t0
            written += 1
        real_rel = _relative(real.path, outdir)
        rows.append({"path": real_rel, "label": 0, "generator": "real", "source": real.source, "pair": ""})
        rows.append({"path": twin.name, "label": 1, "generator": maker.generator, "source": real.source,
                     "pair": real_rel})
        bar.update()
    bar.close()
    text = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(index=False, lineterminator="\n")
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    summary = FakesSummary(manifest, len(reals), written, kept, failed, seconds)
    log(summary.line())
    return summary
