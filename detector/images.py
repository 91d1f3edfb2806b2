"""Find input images and decode them to RGB without resampling, safely.

Pixels are scored as they are stored: no resizing, no colour management and no EXIF rotation,
because the traces a generator leaves live on the stored pixel grid (and JPEG's 8x8 grid).
Every decoding failure becomes an :class:`ImageError` with a message fit for the ``error`` column.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import glob
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
from PIL import Image

try:  # HEIC/HEIF (phone photos): the optional extra detector[heif]
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - depends on the environment
    HEIF_SUPPORTED = False

__all__ = [
    "as_pixels",
    "decode_bytes",
    "DECODED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageError",
    "InputError",
    "decode_image",
    "find_images",
    "jpeg_quality",
    "gaussian_blur",
    "open_image",
    "read_image_bytes",
    "read_jpeg_quality",
    "reencode_jpeg",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif"}
)
_SUFFIXES = tuple(IMAGE_EXTENSIONS)
# 2**28 pixels (268 MP, about 0.8 GB as RGB bytes): above every camera, below decompression bombs.
DEFAULT_MAX_PIXELS = 1 << 28
# Pillow identifies a file by its content, whatever its name, and some of its readers are unsafe on
# untrusted files (EPS runs Ghostscript): only the formats that IMAGE_EXTENSIONS name are opened.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "DIB", "GIF") + (("HEIF",) if HEIF_SUPPORTED else ())



def open_image(fp: IO[bytes], name: str = "") -> Image.Image:
    """Open an image from a binary file object, reading its header only, or raise ``UnidentifiedImageError``.

    Like ``Image.open(fp, formats=DECODED_FORMATS)``, but without Pillow's size guard, which
    reads the process-wide ``Image.MAX_IMAGE_PIXELS``: this package checks its own per-call
    ``max_pixels`` from the header instead (:func:`decode_image`), and leaves Pillow's setting,
    which protects the host's other code, as it was. The caller closes ``fp``.
    """
    Image.preinit()
    prefix = fp.read(16)
    for fmt in DECODED_FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):  # a string is Pillow's reason for refusing
                continue
            fp.seek(0)
            return factory(fp, name)
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
    raise Image.UnidentifiedImageError(f"cannot identify image file {name!r}")


class ImageError(Exception):
    """An input that cannot be scored; the message goes into the ``error`` column."""


class InputError(ValueError):
    """Arguments that name no usable input (a missing path, a CSV without a ``path`` column)."""


@dataclass
class DecodedImage:
    """An image as RGB uint8 pixels ``(H, W, 3)`` plus what the file said about itself."""

    pixels: np.ndarray
    format: str
    mode: str
    jpeg_quality: int | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _read_listing(listing: Path) -> list[Path]:
    """The ``path`` column of a CSV or Parquet listing; relative paths are relative to its folder."""
    if listing.suffix.lower() == ".parquet":
        from .resources import require

        require("pyarrow", "parquet", "reading a Parquet listing")
        import pyarrow.parquet as pq

        names = pq.read_schema(listing).names
        if "path" not in names:
            raise InputError(f"{listing}: a Parquet listing needs a 'path' column (found {names})")
        entries = [p for p in pq.read_table(listing, columns=["path"]).column("path").to_pylist() if p]
    else:
        with open(listing, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise InputError(f"{listing}: a CSV input needs a 'path' column (found {reader.fieldnames})")
            entries = [p for p in (row["path"] for row in reader) if p]
    base = listing.parent
    return [Path(p) if os.path.isabs(p) else base / p for p in map(str, entries)]


def _walk(folder: Path) -> Iterable[Path]:
    # os.walk does not follow directory symlinks, so a symlink loop cannot trap the scan.
    # A folder that cannot be listed (no permission, a path beyond PATH_MAX) is yielded itself, so
    # that it gets an error row instead of silently hiding the files inside it.
    unlisted: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=lambda err: unlisted.append(Path(err.filename))):
        dirs.sort()
        for name in sorted(files):
            # not os.path.splitext, which gives ".png" and "..png" no extension
            if name.lower().endswith(_SUFFIXES):
                yield Path(root) / name
    yield from unlisted


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursive), glob patterns and listings (CSV or Parquet files with a
    ``path`` column) into image paths.

    ``~`` is expanded. Files named explicitly are kept whatever their extension (so that a bad one
    gets its error row); folders contribute files with an image extension. Order is deterministic (sorted within
    each folder, arguments in the order given) and each path appears once.
    """
    found: list[Path] = []
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_dir():
            found.extend(_walk(path))
        elif path.suffix.lower() in (".csv", ".parquet") and path.is_file():
            found.extend(_read_listing(path))
        elif path.exists() or path.is_symlink():
            found.append(path)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"no file matches {text!r}")
            for match in matches:
                found.extend(_walk(Path(match)) if os.path.isdir(match) else [Path(match)])
        else:
            raise InputError(f"{text}: no such file or folder")
    seen: set[str] = set()
    unique = []
    for p in found:
        key = os.path.normpath(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB uint8 without resampling."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / 65535.0 if hi > 255 else 1.0)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Keep the stored colour values and drop alpha: compositing on a background would
        # invent pixels that were never in the file.
        img = img.convert("RGBA").convert("RGB") if mode != "RGBA" else img.convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def jpeg_quality(img: Image.Image) -> int | None:
    """Estimate the JPEG quality from the luminance quantisation table (IJG scaling)."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    # IJG base luminance table, zig-zag order irrelevant for the mean ratio used here.
    base = np.array(
        [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
    table = np.asarray(tables[0], dtype=np.float64)
    if table.size != 64:
        return None
    scale = float(np.sum(table) / np.sum(base)) * 100.0
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


def read_jpeg_quality(path: str | os.PathLike) -> int | None:
    """Estimated quality of a JPEG file from its header, or None (not JPEG, unreadable)."""
    try:
        with open(path, "rb") as fp, open_image(fp, str(path)) as img:
            return jpeg_quality(img) if img.format in ("JPEG", "MPO") else None
    except (OSError, SyntaxError, ValueError):
        return None


def as_pixels(image: "str | os.PathLike | np.ndarray | DecodedImage", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 pixels ``(H, W, 3)`` of a path (``~`` expanded; decoded by :func:`decode_image`), a
    decoded image or an array, checked: what every detector's ``predict`` accepts."""
    if isinstance(image, (str, os.PathLike)):
        image = decode_image(Path(image).expanduser(), max_pixels=max_pixels)
    pixels = image.pixels if isinstance(image, DecodedImage) else np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
    return pixels


def decode_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the first frame of an image file to RGB uint8, or raise :class:`ImageError`.

    ``max_pixels`` bounds memory: larger images (and decompression bombs, which declare a huge
    size in a few bytes) are refused before their pixels are decoded.
    """
    with _image_file(path) as fp:
        return _decode_stream(fp, Path(path).name, max_pixels)


def read_image_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes | None:
    """The bytes of an image file, read once (to decode them and read their metadata), or None when the
    file is larger than ``max_bytes``; the checks and errors of :func:`decode_image`."""
    with _image_file(path) as fp:
        if max_bytes is not None and os.fstat(fp.fileno()).st_size > max_bytes:
            return None
        return fp.read()


@contextlib.contextmanager
def _image_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """The file at ``path`` open for reading, if it is a regular file; every failure an :class:`ImageError`."""
    path = Path(path)
    try:
        kind = os.stat(path).st_mode
        if stat.S_ISDIR(kind):  # a folder that could not be listed, or one named as a file
            raise ImageError("permission denied: the folder cannot be listed" if not os.access(path, os.R_OK | os.X_OK)
                             else "is a directory")
        if not stat.S_ISREG(kind):  # reading a FIFO would block forever, a device never end
            raise ImageError("not a regular file (a pipe, socket or device)")
        with open(path, "rb") as fp:
            yield fp
    except FileNotFoundError:
        raise ImageError("file not found (or a dangling symlink)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as err:  # a symlink loop, a name too long, an I/O error
        raise ImageError(f"cannot decode: {err.strerror or type(err).__name__}") from None


def decode_bytes(data: bytes, name: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """:func:`decode_image` of an image held in memory (an upload); ``name`` only words errors."""
    return _decode_stream(io.BytesIO(data), name, max_pixels)


def _decode_stream(fp: IO[bytes], name: str, max_pixels: int) -> DecodedImage:
    """Decode an open binary stream (see :func:`decode_image`); every failure is an :class:`ImageError`."""
    try:
        with open_image(fp, name) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"empty image ({w}x{h})")
            if w * h > max_pixels:
                raise ImageError(f"too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            fmt = img.format or Path(name).suffix.lstrip(".").upper()
            mode = img.mode
            quality = jpeg_quality(img) if fmt in ("JPEG", "MPO") else None
            img.seek(0)
            img.load()
            pixels = _to_rgb(img)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        if not HEIF_SUPPORTED and Path(name).suffix.lower() in (".heic", ".heif"):
            raise ImageError("HEIC/HEIF needs the optional package pillow-heif: pip install 'detector[heif]'") from None
        raise ImageError("not an image file (unrecognised or unsupported format)") from None
    except Image.DecompressionBombError as err:  # a GIF frame or crop beyond Pillow's own process-wide limit
        raise ImageError(f"too large for Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS): {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError, KeyError) as err:
        # strerror leaves out the file name, which can be kilobytes long and is in the row already
        lines = [line for line in str(err).splitlines() if line.strip()]
        text = getattr(err, "strerror", None) or (lines[0] if lines else type(err).__name__)
        raise ImageError(f"cannot decode: {text}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise ImageError(f"unexpected pixel array of shape {pixels.shape}")
    return DecodedImage(pixels=pixels, format=fmt, mode=mode, jpeg_quality=quality)


def reencode_jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    """RGB uint8 pixels after a JPEG round trip at ``quality`` (Pillow/libjpeg, 4:2:0), in memory.

    Used to give both classes the same compression history (training's ``--jpeg-align``,
    evaluation's ``--align-jpeg``), so that a score cannot come from the container alone.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def reencode(pixels: np.ndarray, fmt: str, quality: int | None = None) -> np.ndarray:
    """RGB uint8 pixels after an in-memory round trip through ``fmt`` (``JPEG``, ``WEBP``, ``PNG``)
    at ``quality`` (lossy formats; None: the encoder's default). How a re-shared file arrives."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=fmt, **({"quality": int(quality)} if quality else {}))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """RGB uint8 pixels blurred with a Gaussian of ``sigma`` px (kernel 2*ceil(3 sigma)+1); 0 is a no-op.

    torchvision's implementation, so that training augmentation and evaluation perturbations
    blur alike.
    """
    if sigma <= 0.0:
        return pixels
    import torch
    from torchvision.transforms.v2 import functional as TF

    kernel = 2 * math.ceil(3 * sigma) + 1
    t = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)
    return TF.gaussian_blur(t, [kernel, kernel], [sigma, sigma]).permute(1, 2, 0).numpy()
