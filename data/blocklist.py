"""The held-out rule shared by every data-engine script: what must never be trained on or chosen with.

``../shared/data/blocklist.csv`` lists images kept outside the project to measure the detector
(``sha256,dhash64``) and ``blocklist_repos.txt`` the public repositories whose images are all held
out. A gathered image is dropped when its SHA-256 is listed or its 64-bit difference hash lies within
``max_bits`` (4) of a listed one; nothing is taken from a listed repository.

The difference hash is the one the blocklist was written with: greyscale, Lanczos resize to 9x8, bit
``i = 8r + c`` set where pixel ``(r, c)`` is brighter than ``(r, c + 1)``, written as 16 hex digits.
Which end of the hex string bit 0 sits at is not stated there, so :meth:`Blocklist.held_out` compares
both readings: it may drop a few more images than needed, never fewer.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MAX_BITS = 4


def dhash64(image: Image.Image) -> int:
    """64-bit difference hash of ``image``: bit ``8r + c`` set where ``(r, c)`` > ``(r, c + 1)``."""
    grey = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = grey.tobytes()
    value = 0
    for r in range(8):
        for c in range(8):
            if pixels[9 * r + c] > pixels[9 * r + c + 1]:
                value |= 1 << (8 * r + c)
    return value


def reverse64(value: int) -> int:
    """``value`` with its 64 bits in the opposite order (the other reading of a hex dHash)."""
    return int(f"{value:064b}"[::-1], 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalise_repo(name: str) -> str:
    """``owner/name`` in lower case, without a URL prefix or ``.git`` suffix."""
    name = name.strip().removeprefix("https://github.com/").removeprefix("github:")
    return name.removesuffix(".git").strip("/").lower()


@dataclass
class Blocklist:
    """Held-out hashes and repositories; empty when the files are absent (then :attr:`loaded` is False)."""

    sha256: set[str] = field(default_factory=set)
    dhashes: list[int] = field(default_factory=list)
    repos: set[str] = field(default_factory=set)
    loaded: bool = False
    max_bits: int = MAX_BITS

    @classmethod
    def read(cls, folder: str | Path = DEFAULT_DIR) -> "Blocklist":
        """Read ``blocklist.csv`` and ``blocklist_repos.txt`` from ``folder``.

        Raises FileNotFoundError when either file is missing: an engine run without the rule must be
        asked for explicitly (``Blocklist()``), never happen because a path was wrong.
        """
        folder = Path(folder)
        hashes, repos = folder / "blocklist.csv", folder / "blocklist_repos.txt"
        for path in (hashes, repos):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the held-out list is missing")
        out = cls(loaded=True)
        with open(hashes, newline="") as f:
            for row in csv.DictReader(f):
                out.sha256.add(row["sha256"].strip().lower())
                value = int(row["dhash64"].strip(), 16)
                out.dhashes.extend({value, reverse64(value)})
        for line in repos.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.repos.add(normalise_repo(line))
        return out

    def repo_held_out(self, repo: str) -> bool:
        return normalise_repo(repo) in self.repos

    def public_origin(self, origin: str) -> str:
        """``origin`` without the name of a held-out repository: the shared manifests write origins
        as ``github:OWNER/NAME:PATH``, and one in a repository of ``blocklist_repos.txt`` becomes
        ``shared-dev:PATH``, so that files committed to the project never name those repositories."""
        if origin.startswith("github:"):
            repo, sep, path = origin.removeprefix("github:").partition(":")
            if sep and self.repo_held_out(repo):
                return f"shared-dev:{path}"
        return origin

    def held_out(self, sha256: str, dhash: int) -> str:
        """Why an image is held out (``"sha256"`` or ``"dhash"``), or ``""`` when it may be used."""
        if sha256.lower() in self.sha256:
            return "sha256"
        if any(hamming(dhash, listed) <= self.max_bits for listed in self.dhashes):
            return "dhash"
        return ""
