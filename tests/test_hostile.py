"""Hostile inputs (issue 4): a corpus of bad files and names, made here, and what a scan promises on it.

Every kind of input is built by a generator below, none is committed as a binary. The scan of the
whole corpus must give exactly one row per input (a clear ``error`` where the file cannot be
scored), finish, refuse decompression bombs by the pixel limit, write nothing outside its output
folder, keep its CSV parseable by pandas and by the csv module, and leave every input unchanged.
The fuzz tests at the end feed arbitrary bytes to the decoder and arbitrary sizes to the patch plans.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detector.images import ImageError, decode_image
from detector.inference import Detector
from detector.patches import PatchSettings, full_plan, patch_plan
from detector.results import display_path
from detector.scanning import ScanOptions, scan
from tests.conftest import noise_image

# Pillow warns about the corrupt metadata this corpus is made of; the rows are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# A limit far below the default, so that real bombs stay small enough to build in a test.
MAX_PIXELS = 1 << 24
# One 32 px patch per image: the properties here do not depend on the patch size, the run time does.
FAST = ScanOptions(patches=PatchSettings(mode="patches", patch_size=32, num_patches=1), batch_size=16, workers=0,
                   max_pixels=MAX_PIXELS, progress=False)


# --------------------------------------------------------------------------- file builders


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise_image(h, w, seed))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, colour: int, rows: bytes = b"", *, chunks=(), idat: bytes | None = None) -> bytes:
    """A PNG written by hand, for sizes, depths and chunks that Pillow does not write."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = b"".join(_chunk(kind, data) for kind, data in chunks)
    idat = zlib.compress(rows, 9) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + body + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_rows(array: np.ndarray) -> bytes:
    """Filter type 0 before every row of a ``(H, bytes-per-row)`` array."""
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(array.shape[0], -1)
    return b"".join(b"\0" + row.tobytes() for row in raw)


def _tiff(width: int, height: int, data: bytes, *, bits: int, samples: int = 1, sample_format: int = 1,
          photometric: int = 1) -> bytes:
    """An uncompressed little-endian TIFF with one strip, for sample layouts Pillow does not write."""
    tags = {256: (4, [width]), 257: (4, [height]), 258: (3, [bits] * samples), 259: (3, [1]),
            262: (3, [photometric]), 273: (4, [0]), 277: (3, [samples]), 278: (4, [height]),
            279: (4, [len(data)]), 339: (3, [sample_format] * samples)}
    extra_at = 8 + 2 + 12 * len(tags) + 4
    extra, inline = b"", {}
    for tag, (kind, values) in tags.items():
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(packed) > 4:
            inline[tag] = struct.pack("<I", extra_at + len(extra))
            extra += packed
        else:
            inline[tag] = packed.ljust(4, b"\0")
    inline[273] = struct.pack("<I", extra_at + len(extra))
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, len(values)) + inline[tag] for tag, (kind, values) in sorted(tags.items())
    ) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + extra + data


def _jpeg_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Insert a marker segment right after SOI."""
    return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + jpeg[2:]


def _jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    i = jpeg.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]


def _ycck(cmyk_jpeg: bytes) -> bytes:
    """Mark a CMYK JPEG's Adobe segment as YCCK (transform 2): libjpeg then decodes it as YCCK."""
    i = cmyk_jpeg.index(b"\xff\xee\x00\x0eAdobe")  # marker, length, "Adobe", version, flags0, flags1, transform
    return cmyk_jpeg[: i + 15] + b"\x02" + cmyk_jpeg[i + 16 :]


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _icc(space: str) -> bytes | None:
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()
    except (ImportError, OSError, ValueError):
        return None


def _animated(fmt: str, **params) -> bytes:
    frames = [_rgb(48, 40, s) for s in range(3)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **params)


# --------------------------------------------------------------------------- the corpus


@dataclass
class Entry:
    """One input of the corpus and the row it must get."""

    kind: str
    path: Path  # as the scan sees it (undecodable bytes are surrogate-escaped)
    expect: str  # "score", "error" or "any" (decoders differ on marginal files; either is a fine outcome)
    error: str = ""  # a regex the error must match when expect == "error"

    @property
    def shown(self) -> str:
        return display_path(self.path)


class Corpus:
    """Builds the hostile folder; ``entries`` are the rows a scan of ``inputs`` must give."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "corpus"
        self.folder.mkdir(parents=True)
        self.entries: list[Entry] = []
        self.skipped: list[str] = []
        self.listed: list[str] = []  # lines of list.csv, an input beside the folder
        self.rowless: set[str] = set()  # kinds that must add no row of their own (duplicates, folder links)

    @property
    def kinds(self) -> list[str]:
        return sorted({e.kind for e in self.entries} | self.rowless)

    @property
    def inputs(self) -> list[str]:
        return [str(self.folder), str(self.folder / "list.csv")]

    def file(self, kind: str, name: str | bytes, data: bytes, expect: str, error: str = "") -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(self.folder), os.fsencode(name))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if expect == "score" and _shorter_side(data) < 32:  # decodable, but refused by the scoring stage
            expect, error = "error", "too small"
        self.entries.append(Entry(kind, path, expect, error))
        return path

    def special(self, kind: str, name: str, make, expect: str, error: str = "") -> None:
        path = self.folder / name
        try:
            make(path)
        except (OSError, NotImplementedError) as err:  # e.g. no unix sockets; reported, not counted
            self.skipped.append(f"{kind}: {err}")
            return
        self.entries.append(Entry(kind, path, expect, error))

    def listing(self, kind: str, line: str, expect: str | None, error: str = "") -> None:
        """A line of list.csv; ``expect`` None for a line that names a file already in the scan."""
        self.listed.append(line)
        if expect is None:
            self.rowless.add(kind)
        else:
            self.entries.append(Entry(kind, self.folder / line, expect, error))

    def finish(self) -> None:
        with open(self.folder / "list.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path"])
            writer.writerows([line] for line in self.listed)


NOT_IMAGE = r"not an image|cannot decode|unsupported"
TOO_LARGE = r"too large: .* exceeds the limit"


def build_corpus(root: Path) -> Corpus:
    c = Corpus(root)
    good_png = _encode(_rgb(80, 96, 1), "PNG")
    good_jpg = _encode(_rgb(80, 96, 2), "JPEG", quality=90)
    rng = np.random.default_rng(4)

    # empty, truncated, random and mislabelled bytes
    c.file("empty file (.jpg)", "empty.jpg", b"", "error", NOT_IMAGE)
    c.file("empty file (.png)", "empty.png", b"", "error", NOT_IMAGE)
    for cut in (2, 100, len(good_jpg) // 2):
        c.file(f"JPEG truncated at byte {cut}", f"trunc_jpeg_{cut}.jpg", good_jpg[:cut], "error", NOT_IMAGE)
    c.file("JPEG without its end marker", "trunc_jpeg_eoi.jpg", good_jpg[:-2], "any")
    for cut in (8, 33, len(good_png) // 2):
        c.file(f"PNG truncated at byte {cut}", f"trunc_png_{cut}.png", good_png[:cut], "error", NOT_IMAGE)
    c.file("PNG without IEND", "trunc_png_iend.png", good_png[:-12], "any")
    for ext in ("jpg", "png", "tif", "webp", "heic"):
        c.file(f"random bytes (.{ext})", f"random.{ext}", rng.bytes(4096), "error", NOT_IMAGE)
    for fmt, magic in [("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff\xe0"), ("GIF", b"GIF89a"),
                       ("WebP", b"RIFF\x00\x10\x00\x00WEBPVP8 "), ("TIFF", b"II*\x00"), ("BMP", b"BM")]:
        c.file(f"{fmt} magic then garbage", f"magic_{fmt.lower()}.{fmt.lower()}", magic + rng.bytes(2000), "error", NOT_IMAGE)
    c.file("text file named .jpg", "text.jpg", b"this is not an image\n" * 10, "error", NOT_IMAGE)
    c.file("HTML page named .png", "page.png", b"<!doctype html><html><body>404</body></html>", "error", NOT_IMAGE)
    c.file("PNG named .jpg", "png_inside.jpg", good_png, "score")
    c.file("upper-case extension", "UPPER.JPG", good_jpg, "score")
    c.file("double extension", "photo.png.jpg", good_jpg, "score")
    # Pillow opens EPS by running Ghostscript; an image named .jpg must not get that far
    c.file("EPS named .jpg", "eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n",
           "error", NOT_IMAGE)
    c.file("TGA named .png (a format outside the list)", "tga.png", _encode(_rgb(16, 16), "TGA"), "any")

    # folders and the listing
    (c.folder / "folder.png").mkdir()
    c.file("image inside a folder named .png", "folder.png/inside.png", good_png, "score")
    c.listing("folder named .png, listed explicitly", "folder.png", "error", r"is a directory")
    c.listing("same file listed twice", "UPPER.JPG", None)
    c.listing("same file listed twice", "UPPER.JPG", None)
    c.listing("same file through 'sub/../'", "folder.png/../UPPER.JPG", None)
    (root / "outside.png").write_bytes(good_png)
    c.listing("'../' to a file outside the folder", "../outside.png", "score")
    c.listing("listed file that does not exist", "missing.jpg", "error", r"not found")

    # decompression bombs: declared sizes, then real ones that inflate past the limit
    c.file("PNG declaring 100000x100000", "bomb_header.png", _png(100_000, 100_000, 8, 2, idat=zlib.compress(b"\0" * 64)),
           "error", TOO_LARGE)
    c.file("JPEG declaring 65500x65500", "bomb_header.jpg", _jpeg_declaring(good_jpg, 65500, 65500), "error", TOO_LARGE)
    c.file("GIF declaring 65535x65535", "bomb_header.gif",
           b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 65535, 65535)
           + b"\x00\x02\x02\x44\x01\x00\x3b", "error", TOO_LARGE)
    c.file("TIFF declaring 100000x100000", "bomb_header.tif", _tiff(100_000, 100_000, b"\0" * 64, bits=8), "error", TOO_LARGE)
    c.file("BMP declaring 100000x100000", "bomb_header.bmp",
           b"BM" + struct.pack("<IHHI", 100, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0),
           "error", r"too large|cannot decode")
    side = 6000  # 36 MP of zeros > MAX_PIXELS, a few kB on disk
    c.file("PNG bomb (36 MP of zeros in 40 kB)", "bomb_real.png", _png(side, side, 8, 0, _png_rows(np.zeros((side, side), np.uint8))),
           "error", TOO_LARGE)
    c.file("TIFF deflate bomb (36 MP)", "bomb_real.tif", _encode(Image.new("L", (side, side)), "TIFF", compression="tiff_adobe_deflate"),
           "error", TOO_LARGE)
    c.file("PNG with a 50 MB compressed text chunk", "bomb_text.png",
           _png(8, 8, 8, 0, _png_rows(np.zeros((8, 8), np.uint8)), chunks=[(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * 50_000_000, 9))]),
           "any")
    c.file("PNG with a 50 MB compressed ICC chunk", "bomb_icc.png",
           _png(8, 8, 8, 0, _png_rows(np.zeros((8, 8), np.uint8)), chunks=[(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 50_000_000, 9))]),
           "any")

    # tiny, thin, odd and extreme sizes
    c.file("1x1 PNG", "one.png", _encode(_rgb(1, 1), "PNG"), "error", "too small")
    c.file("1x1 JPEG", "one.jpg", _encode(_rgb(1, 1), "JPEG"), "error", "too small")
    c.file("1x1 GIF", "one.gif", _encode(_rgb(1, 1).convert("P"), "GIF"), "error", "too small")
    c.file("1xN PNG (1x5000)", "row.png", _encode(_rgb(1, 5000), "PNG"), "error", "too small")
    c.file("Nx1 PNG (5000x1)", "column.png", _encode(_rgb(5000, 1), "PNG"), "error", "too small")
    c.file("extreme aspect JPEG (2x20000)", "strip.jpg", _encode(_rgb(2, 20000), "JPEG"), "error", "too small")
    c.file("extreme aspect WebP (16000x3)", "pole.webp", _encode(_rgb(16000, 3), "WEBP"), "error", "too small")
    c.file("smaller than a patch (17x23)", "small.png", _encode(_rgb(17, 23), "PNG"), "error", "too small")
    c.file("8x8 JPEG", "block.jpg", _encode(_rgb(8, 8), "JPEG"), "error", "too small")
    c.file("odd size (65x71)", "odd.png", _encode(_rgb(65, 71), "PNG"), "score")
    c.file("just large enough (32x300)", "thin.png", _encode(_rgb(32, 300), "PNG"), "score")

    # bit depths, sample formats and colour models
    grey16 = rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)
    c.file("16-bit grey PNG", "grey16.png", _png(48, 40, 16, 0, _png_rows(grey16.astype(">u2"))), "score")
    c.file("16-bit RGB PNG", "rgb16.png", _png(48, 40, 16, 2, _png_rows(rng.integers(0, 65536, (40, 48 * 3)).astype(">u2"))), "score")
    c.file("16-bit RGBA PNG", "rgba16.png", _png(48, 40, 16, 6, _png_rows(rng.integers(0, 65536, (40, 48 * 4)).astype(">u2"))), "score")
    c.file("16-bit grey+alpha PNG", "la16.png", _png(48, 40, 16, 4, _png_rows(rng.integers(0, 65536, (40, 48 * 2)).astype(">u2"))), "score")
    c.file("1-bit grey PNG", "bilevel.png", _png(64, 8, 1, 0, _png_rows(rng.integers(0, 256, (8, 8), dtype=np.uint8))), "error",
           "too small")
    c.file("2-bit palette PNG", "pal2.png", _png(16, 8, 2, 3, _png_rows(rng.integers(0, 256, (8, 4), dtype=np.uint8)),
                                               chunks=[(b"PLTE", bytes(range(12)))]), "score")
    c.file("palette index beyond PLTE", "pal_short.png", _png(8, 8, 8, 3, _png_rows(np.full((8, 8), 200, np.uint8)),
                                                            chunks=[(b"PLTE", bytes(6))]), "any")
    c.file("16-bit grey TIFF", "grey16.tif", _encode(Image.fromarray(grey16), "TIFF"), "score")
    c.file("16-bit RGB TIFF", "rgb16.tif",
           _tiff(48, 40, rng.integers(0, 65536, (40, 48, 3)).astype("<u2").tobytes(), bits=16, samples=3, photometric=2), "any")
    floats = rng.normal(0.5, 0.3, size=(40, 48)).astype(np.float32)
    c.file("float32 grey TIFF", "float.tif", _encode(Image.fromarray(floats), "TIFF"), "score")
    floats[::7, ::5] = np.nan
    floats[1::9, ::3] = np.inf
    floats[2::11, ::4] = -np.inf
    c.file("float TIFF with NaN and inf", "float_nan.tif", _encode(Image.fromarray(floats), "TIFF"), "score")
    c.file("float32 RGB TIFF", "float_rgb.tif",
           _tiff(48, 40, rng.random((40, 48, 3), dtype=np.float32).tobytes(), bits=32, samples=3, sample_format=3, photometric=2), "any")
    c.file("float64 grey TIFF", "double.tif", _tiff(48, 40, rng.random((40, 48)).tobytes(), bits=64, sample_format=3), "any")
    c.file("int32 TIFF with negative values", "int32.tif",
           _encode(Image.fromarray(rng.integers(-2**31, 2**31 - 1, size=(40, 48), dtype=np.int32)), "TIFF"), "score")
    c.file("1-bit TIFF", "bilevel.tif", _encode(_rgb(40, 48).convert("1"), "TIFF"), "score")
    c.file("CMYK TIFF", "cmyk.tif", _encode(_rgb(40, 48).convert("CMYK"), "TIFF"), "score")
    cmyk_jpeg = _encode(_rgb(64, 64, 3).convert("CMYK"), "JPEG", quality=90)
    c.file("CMYK JPEG", "cmyk.jpg", cmyk_jpeg, "score")
    c.file("YCCK JPEG (CMYK with Adobe transform 2)", "ycck.jpg", _ycck(cmyk_jpeg), "score")
    c.file("greyscale JPEG", "grey.jpg", _encode(_rgb(64, 64).convert("L"), "JPEG"), "score")
    c.file("progressive JPEG", "progressive.jpg", _encode(_rgb(64, 64), "JPEG", progressive=True), "score")
    c.file("4:4:4 JPEG at quality 100", "q100.jpg", _encode(_rgb(64, 64), "JPEG", quality=100, subsampling=0), "score")
    c.file("palette PNG with transparency", "pal_alpha.png", _encode(_rgb(40, 48).convert("P"), "PNG", transparency=3), "score")
    c.file("GIF with a transparent colour", "alpha.gif", _encode(_rgb(40, 48).convert("P"), "GIF", transparency=0), "score")
    c.file("LA PNG", "la.png", _encode(_rgb(40, 48).convert("LA"), "PNG"), "score")
    c.file("RGBA PNG", "rgba.png", _encode(_rgb(40, 48).convert("RGBA"), "PNG"), "score")
    c.file("RGBA WebP", "rgba.webp", _encode(_rgb(40, 48).convert("RGBA"), "WEBP", lossless=True), "score")
    c.file("32-bit BMP", "argb.bmp", _encode(_rgb(40, 48).convert("RGBA"), "BMP"), "score")
    c.file("animated GIF", "animated.gif", _animated("GIF"), "score")
    c.file("animated WebP", "animated.webp", _animated("WEBP"), "score")
    c.file("animated PNG", "animated.png", _animated("PNG"), "score")
    try:
        c.file("HEIC", "photo.heic", _encode(_rgb(64, 64), "HEIF"), "score")
    except (KeyError, OSError, ValueError) as err:  # pillow-heif built without an encoder
        c.skipped.append(f"HEIC: {err}")

    # metadata: EXIF orientations, broken EXIF, odd ICC profiles
    for orientation in range(1, 9):
        c.file(f"EXIF orientation {orientation}", f"exif_{orientation}.jpg",
               _encode(_rgb(48, 64, orientation), "JPEG", exif=_exif(orientation)), "score")
    c.file("corrupt EXIF (garbage APP1)", "exif_garbage.jpg", _jpeg_segment(good_jpg, 0xE1, b"Exif\0\0" + rng.bytes(300)), "score")
    looping_ifd = b"Exif\0\0II*\0" + struct.pack("<IHHHII", 8, 1, 0x8769, 4, 1, 8) + struct.pack("<I", 8)
    c.file("EXIF IFD pointing at itself", "exif_loop.jpg", _jpeg_segment(good_jpg, 0xE1, looping_ifd), "score")
    c.file("garbage ICC profile (PNG)", "icc_garbage.png", _encode(_rgb(40, 48), "PNG", icc_profile=rng.bytes(500)), "score")
    c.file("300 kB ICC profile in many JPEG segments", "icc_huge.jpg", _encode(_rgb(40, 48), "JPEG", icc_profile=rng.bytes(300_000)), "score")
    c.file("truncated ICC segment (JPEG)", "icc_cut.jpg", _jpeg_segment(good_jpg, 0xE2, b"ICC_PROFILE\0\x01\x02" + rng.bytes(50)), "score")
    lab = _icc("LAB")
    if lab:
        c.file("LAB ICC profile on an RGB JPEG", "icc_lab.jpg", _encode(_rgb(40, 48), "JPEG", icc_profile=lab), "score")
    else:
        c.skipped.append("LAB ICC profile: ImageCms unavailable")

    # links, pipes, devices, permissions
    c.special("dangling symlink", "dangling.jpg", lambda p: p.symlink_to(c.folder / "nowhere.jpg"), "error", r"not found|dangling")
    c.special("symlink loop (a -> b -> a)", "loop_a.jpg", lambda p: p.symlink_to(c.folder / "loop_b.jpg"), "error", r"symbolic links")
    c.special("symlink loop (a -> b -> a)", "loop_b.jpg", lambda p: p.symlink_to(c.folder / "loop_a.jpg"), "error", r"symbolic links")
    c.special("symlink to itself", "self.png", lambda p: p.symlink_to(p), "error", r"symbolic links")
    c.special("symlink to a good image", "link_good.png", lambda p: p.symlink_to(c.folder / "UPPER.JPG"), "score")
    c.special("symlink to a device (/dev/zero)", "zero.jpg", lambda p: p.symlink_to("/dev/zero"), "error", r"not a regular file")
    c.special("named pipe (FIFO) named .png", "fifo.png", lambda p: os.mkfifo(p), "error", r"not a regular file")
    c.special("unix socket named .jpg", "socket.jpg", _make_socket, "error", r"not a regular file")
    (c.folder / "dirlink.png").symlink_to(c.folder / "folder.png")  # not followed, so no second row for inside.png
    c.rowless.add("symlink to a folder named .png")
    (c.folder / "folder.png" / "up").symlink_to(c.folder)  # a folder loop: os.walk must not go round it
    c.rowless.add("symlink loop of folders")
    unreadable = c.file("unreadable file (chmod 000)", "unreadable.png", good_png, "any" if IS_ROOT else "error", r"permission")
    unreadable.chmod(0)

    # names
    names: list[tuple[str, str | bytes]] = [
        ("name with a comma", "a, b.png"), ("name with double quotes", 'say "cheese".png'),
        ("name with a single quote", "it's.png"), ("name with a newline", "line\nbreak.png"),
        ("name with a carriage return", "carriage\rreturn.png"), ("name with CRLF", "crlf\r\n.png"),
        ("name with a tab", "tab\there.png"), ("name with CSV formula '='", "=cmd|' /C calc'!A0.png"),
        ("name starting with '-'", "-rf.png"), ("name that looks like an option", "--output=x.png"),
        ("name starting with '+' or '@'", "+@SUM(1).png"), ("name with Unicode line separators", "sep\u2028\u2029\x85.png"),
        ("name with vertical tab and form feed", "vt\x0bff\x0c.png"),
        ("name with a right-to-left override", "gpj.\u202eevil.png"), ("name with emoji", "\U0001f600.png"),
        ("name with leading and trailing spaces", "  spaces  .png"), ("hidden file", ".hidden.png"),
        ("name '..png'", "..png"), ("name '.png' (no stem)", ".png"), ("name with backslash traversal", "..\\..\\evil.png"),
        ("name with URL-encoded traversal", "%2e%2e%2fevil.png"),
        ("non-UTF-8 name (0xff 0xfe)", b"\xff\xfe.png"), ("Latin-1 name", b"caf\xe9.png"),
        ("name with a lone surrogate's UTF-8 bytes", b"\xed\xa0\x80.png"),
        ("non-UTF-8 name that displays like another", b"twin\xff.png"),
        ("name written like an escaped byte", b"twin\\xff.png"),
        ("255-byte name", "n" * 251 + ".png"),
    ]
    for kind, name in names:
        c.file(kind, name, good_png, "score")
    c.file("same name in NFC and NFD", unicodedata.normalize("NFC", "caf\u00e9_nf.png"), good_png, "score")
    c.file("same name in NFC and NFD", unicodedata.normalize("NFD", "caf\u00e9_nf.png"), good_png, "score")
    deep = "/".join(["d" * 200] * 19)  # ~3.9 kB: just inside PATH_MAX with the tmp prefix
    c.file("very long path (~4 kB)", deep[: 3900 - len(str(c.folder))] + "/long.png", good_png, "score")
    _beyond_path_max(c)
    c.finish()
    return c


def _make_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    finally:
        sock.close()


def _beyond_path_max(c: Corpus) -> None:
    """An image whose path is longer than PATH_MAX: no call can open it by name, so the folder that
    cannot be listed gets the row (a file hidden this deep must not silently drop out of a scan)."""
    fd = os.open(c.folder, os.O_RDONLY)
    length, name = len(str(c.folder)), "e" * 250
    try:
        while length < 4200:
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, length = child, length + 1 + len(name)
        with open(os.open("hidden.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(_encode(_rgb(64, 64), "PNG"))
    finally:
        os.close(fd)
    # the first folder whose path passes PATH_MAX (4096) is the one os.walk cannot list
    depth = (4095 - len(str(c.folder))) // 251 + 1
    c.entries.append(Entry("path longer than PATH_MAX", c.folder.joinpath(*[name] * depth), "error", r"too long"))


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every file and link under ``root`` except ``skip``: its type, mode, size, mtime and content hash."""
    seen = {}
    for folder, dirs, files in os.walk(root, onerror=lambda err: None):
        dirs[:] = [d for d in dirs if Path(folder, d) != skip]
        for name in files + dirs:
            path = os.path.join(folder, name)
            try:
                st_ = os.lstat(path)
            except OSError:  # beyond PATH_MAX
                continue
            digest = ""
            if stat.S_ISREG(st_.st_mode) and os.access(path, os.R_OK):
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st_.st_mode):
                digest = os.readlink(path)
            seen[os.fsencode(path)] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_size, st_.st_mtime_ns, digest)
    return seen


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    corpus = build_corpus(tmp_path_factory.mktemp("hostile"))
    yield corpus
    (corpus.folder / "unreadable.png").chmod(0o644)


def _check_row(entry: Entry, row: dict) -> None:
    what = f"{entry.kind} ({entry.shown!r}): {row}"
    scored = row["error"] == ""
    if scored:
        assert 0.0 <= float(row["probability"]) <= 1.0 and row["label"] in ("fake", "real"), what
        assert int(row["width"]) > 0 and int(row["height"]) > 0 and int(row["n_patches"]) >= 1, what
    else:
        assert row["probability"] == row["logit"] == row["label"] == "", what
        assert "\n" not in row["error"] and "\r" not in row["error"] and len(row["error"]) < 300, what
    if entry.expect == "score":
        assert scored, what
    elif entry.expect == "error":
        assert not scored and re.search(entry.error, row["error"]), what


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(90)
def _shorter_side(data: bytes) -> int:
    """The shorter side an image file declares (a large number when it declares none)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            return min(img.size)
    except Exception:  # noqa: BLE001 - not an image: the corpus entry says what it expects
        return 1 << 30


def test_decode_each_kind(corpus):
    """decode_image itself: a DecodedImage or an ImageError for every file, as the corpus expects."""
    for entry in corpus.entries:
        try:
            img = decode_image(entry.path, max_pixels=MAX_PIXELS)
        except ImageError as err:
            row = {"error": str(err) or "?", "probability": "", "logit": "", "label": ""}
        else:
            assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
            if entry.error == "too small":  # decodable; refused by the scoring stage (detector.scoring.MIN_SIDE)
                assert min(img.width, img.height) < 32, entry.kind
                continue
            row = {"error": "", "probability": "0.5", "label": "real", "width": img.width, "height": img.height, "n_patches": 1}
        _check_row(entry, row)


@pytest.mark.timeout(150)
def test_scan_of_hostile_corpus(corpus, detector, capsys):
    """One row per input, clear errors, parseable CSV, outputs only in the output folder, inputs unchanged."""
    out_dir = corpus.root / "out"
    before = snapshot(corpus.root, skip=out_dir)
    out = out_dir / "results.csv"
    heat = out_dir / "heat"
    options = ScanOptions(**{**FAST.__dict__, "heatmaps": str(heat)})
    summary = scan(corpus.inputs, detector, out, options)

    assert snapshot(corpus.root, skip=out_dir) == before, "an input was modified, or something was written beside them"
    assert sorted(p.name for p in out_dir.iterdir()) == ["heat", "results.csv", "results.csv.json"]

    rows = _read_rows(out)
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    lost = sum((Counter(e.shown for e in corpus.entries) - Counter(r["path"] for r in rows)).values())
    assert len(rows) == len(frame) == len(corpus.entries) == summary.n_files
    assert frame.to_dict("records") == rows
    assert Counter(r["path"] for r in rows) == Counter(e.shown for e in corpus.entries)
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    for entry in corpus.entries:
        for row in by_path[entry.shown]:
            _check_row(entry, row)
    scored = [r for r in rows if r["error"] == ""]
    assert summary.n_errors == len(rows) - len(scored)
    assert len(list(heat.iterdir())) == len(scored) and all(p.suffix == ".png" for p in heat.iterdir())

    # resuming the finished output skips every row, whatever the names (newlines, CR, undecodable bytes)
    again = scan(corpus.inputs, detector, out, ScanOptions(**{**options.__dict__, "resume": True}))
    assert again.n_skipped == len(rows) and _read_rows(out) == rows

    with capsys.disabled():
        print(f"\n[reliability] hostile corpus: {len(corpus.kinds)} kinds of bad input, {len(corpus.entries)} inputs, "
              f"{len(rows)} rows ({len(rows) - len(scored)} with an error), {lost} rows lost"
              + (f"; not built here: {corpus.skipped}" if corpus.skipped else ""))
    assert len(corpus.kinds) >= 50


def test_unreadable_file_gets_error_row(tmp_path):
    if IS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading a file")
    path = tmp_path / "locked.png"
    _rgb(8, 8).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            decode_image(path)
    finally:
        path.chmod(0o644)


def test_eps_named_jpg_runs_no_program(tmp_path, monkeypatch):
    """Pillow renders EPS by running Ghostscript: a hostile .jpg must never reach it."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(eps)
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_bombs_are_refused_before_decoding(tmp_path):
    """A fresh process decodes declared-size and real bombs under the default and a lowered limit;
    its peak memory grows by less than one refused image would take."""
    side = 17000  # 289 MP of zeros (over the default 2**28), about 300 kB as PNG
    compressor, parts = zlib.compressobj(9), []
    row = b"\0" * (side + 1)
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    (tmp_path / "huge.png").write_bytes(_png(side, side, 8, 0, idat=b"".join(parts)))
    (tmp_path / "header.png").write_bytes(_png(100_000, 100_000, 8, 2, idat=zlib.compress(b"\0" * 64)))
    (tmp_path / "mid.png").write_bytes(_png(6000, 6000, 8, 0, _png_rows(np.zeros((6000, 6000), np.uint8))))
    code = f"""
import resource, sys
from detector.images import ImageError, decode_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, limit in [("huge.png", None), ("header.png", None), ("mid.png", {MAX_PIXELS})]:
    try:
        decode_image(r"{tmp_path}/" + name, **({{}} if limit is None else {{"max_pixels": limit}}))
        print("DECODED", name)
    except ImageError as err:
        print("REFUSED", name, err)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=50)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["REFUSED", "huge.png"], ["REFUSED", "header.png"], ["REFUSED", "mid.png"]]
    assert all("exceeds the limit" in line for line in lines[:3])
    growth_mb = int(lines[3].split()[1]) / 1024
    assert growth_mb < 30, f"peak memory grew by {growth_mb:.0f} MB while refusing bombs"


# --------------------------------------------------------------------------- checkpoints from strangers
# (pickles that run code, junk files and other architectures' .pth files: tests/test_checkpoints.py)


def _safetensors(path: Path, tensors: dict, metadata: str | None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=None if metadata is None else {"detector": metadata})
    return path


def test_truncated_safetensors_is_refused(tmp_path, checkpoint):
    from detector.checkpoints import CheckpointError, load_model

    data = checkpoint.read_bytes()
    for cut in (9, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"unreadable safetensors|not a PyTorch or safetensors"):
            load_model(path)


def test_safetensors_with_lying_or_broken_metadata(tmp_path):
    import torch

    from detector.checkpoints import CheckpointError, load_model

    tensors = {"fc.weight": torch.zeros(1, 2048), "fc.bias": torch.zeros(1)}
    lying = _safetensors(tmp_path / "lying.safetensors", tensors, '{"architecture": "resnet50nodown"}')
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'resnet50nodown'; missing keys: .*conv1"):
        load_model(lying)
    unknown = _safetensors(tmp_path / "unknown.safetensors", tensors, '{"architecture": "os.system"}')
    with pytest.raises(ValueError, match=r"architecture.*os\.system"):
        load_model(unknown)
    broken = _safetensors(tmp_path / "broken.safetensors", tensors, '{"architecture": ')
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_model(broken)


# --------------------------------------------------------------------------- fuzzing

_SEEDS = {
    ".png": _encode(_rgb(24, 16, 7), "PNG"),
    ".jpg": _encode(_rgb(24, 16, 8), "JPEG", quality=80),
    ".gif": _encode(_rgb(24, 16, 9).convert("P"), "GIF"),
    ".webp": _encode(_rgb(24, 16, 10), "WEBP"),
    ".tif": _encode(_rgb(24, 16, 11), "TIFF"),
    ".bmp": _encode(_rgb(24, 16, 12), "BMP"),
}


def _decode_or_error(path: Path) -> None:
    try:
        img = decode_image(path, max_pixels=1 << 20)
    except ImageError as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
        assert img.width * img.height <= 1 << 20


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), ext=st.sampled_from(sorted(_SEEDS) + [".heic", ".tiff"]))
def test_fuzz_decode_arbitrary_bytes(tmp_path, data, ext):
    path = tmp_path / f"fuzz{ext}"
    path.write_bytes(data)
    _decode_or_error(path)


@pytest.mark.timeout(60)
@settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from(sorted(_SEEDS)), edits=st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "zero"]), st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1, max_size=6))
def test_fuzz_decode_mutated_images(tmp_path, ext, edits):
    """Valid files with bytes flipped, cut, inserted or zeroed: decoders see headers they almost accept."""
    data = bytearray(_SEEDS[ext])
    for op, where, value in edits:
        i = where % max(1, len(data))
        if op == "flip" and data:
            data[i] ^= 1 << (value % 8)
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = bytes([value]) * (1 + value % 16)
        elif data:
            data[i : i + 1 + value % 32] = bytes(len(data[i : i + 1 + value % 32]))
    path = tmp_path / f"mutant{ext}"
    path.write_bytes(bytes(data))
    _decode_or_error(path)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), size=st.integers(1, 600), n=st.integers(1, 40),
       layout=st.sampled_from(["grid", "random"]), seed=st.integers(0, 2**31), align=st.sampled_from([1, 8, 16]))
def test_fuzz_patch_plan(h, w, size, n, layout, seed, align):
    crops = patch_plan(h, w, patch_size=size, num_patches=n, layout=layout, seed=seed, align=align)
    assert 1 <= len(crops) <= n
    assert len({(c.top, c.left) for c in crops}) == len(crops)
    for c in crops:
        assert 0 <= c.top < c.bottom <= h and 0 <= c.left < c.right <= w
        assert c.shape == (min(size, h), min(size, w))
        assert c.top % align == 0 and c.left % align == 0
        assert (c.core_top, c.core_left, c.core_bottom, c.core_right) == (c.top, c.left, c.bottom, c.right)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), tile=st.integers(48, 1100), margin=st.integers(0, 200),
       align=st.sampled_from([1, 8, 16]))
def test_fuzz_full_plan_cores_partition_the_image(h, w, tile, margin, align):
    crops = full_plan(h, w, tile_size=tile, margin=margin, align=align)
    cover = np.zeros((h, w), dtype=np.int32)
    for c in crops:
        assert 0 <= c.top <= c.core_top < c.core_bottom <= c.bottom <= h
        assert 0 <= c.left <= c.core_left < c.core_right <= c.right <= w
        assert c.core_top % align == 0 and c.core_left % align == 0
        # at least the margin of context where the image has it; never more than one tile's size
        m = -(-margin // align) * align
        assert c.core_top - c.top >= min(m, c.core_top) and c.bottom - c.core_bottom >= min(m, h - c.core_bottom)
        assert c.bottom - c.top <= -(-tile // align) * align + 2 * m + align
        cover[c.core_top : c.core_bottom, c.core_left : c.core_right] += 1
    assert (cover == 1).all(), "tile cores must cover every pixel exactly once"


def _decoded(tmp_path: Path, name: str, data: bytes) -> np.ndarray:
    (tmp_path / name).write_bytes(data)
    return decode_image(tmp_path / name).pixels


def test_decoded_pixels_are_the_stored_ones(tmp_path):
    """Not only "it decodes": the RGB values are what the file holds, for the conversions decode_image makes."""
    rng = np.random.default_rng(3)
    rgb = noise_image(40, 48, 4)
    grey16 = rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)
    expected_grey = np.repeat(np.clip(grey16 / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    # 16-bit grey scaled to 8 bits (not clipped at 255, not truncated to the low byte), in PNG and TIFF
    png16 = _decoded(tmp_path, "g16.png", _png(48, 40, 16, 0, _png_rows(grey16.astype(">u2"))))
    np.testing.assert_array_equal(png16, expected_grey)
    tif16 = _decoded(tmp_path, "g16.tif", _encode(Image.fromarray(grey16), "TIFF"))
    np.testing.assert_array_equal(tif16, expected_grey)
    # CMYK back to the RGB it was made from: exactly when lossless, closely through JPEG
    np.testing.assert_array_equal(_decoded(tmp_path, "c.tif", _encode(Image.fromarray(rgb).convert("CMYK"), "TIFF")), rgb)
    smooth = np.asarray(Image.fromarray(rgb).resize((12, 10)).resize((48, 40), Image.BILINEAR))
    cmyk_jpeg = _encode(Image.fromarray(smooth).convert("CMYK"), "JPEG", quality=95)
    error = np.abs(_decoded(tmp_path, "c.jpg", cmyk_jpeg).astype(int) - smooth.astype(int))
    assert error.mean() < 4, f"mean error {error.mean():.1f}"
    # EXIF orientation is not applied: the stored 40x48 pixels come back, unrotated
    for orientation in (1, 6, 8):
        exif = _decoded(tmp_path, f"o{orientation}.png", _encode(Image.fromarray(rgb), "PNG", exif=_exif(orientation)))
        np.testing.assert_array_equal(exif, rgb)
    # alpha dropped, colour kept (not composited onto a background)
    rgba = np.dstack([rgb, rng.integers(0, 256, (40, 48), dtype=np.uint8)])
    np.testing.assert_array_equal(_decoded(tmp_path, "a.png", _encode(Image.fromarray(rgba), "PNG")), rgb)
