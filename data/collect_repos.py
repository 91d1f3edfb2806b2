"""Rebuild the image corpus gathered from public GitHub repositories at pinned commits.

The selections are the CSV files of ``data/sources/github/`` (columns in ``data/sources/FORMAT.md``):
a repository, a commit, a path glob, the label, generator, source and licence, and how to cut the
file (whole, a grid of tiles, one box). Files are read from a folder of repository snapshots (what
``git clone`` gives, or bare git directories as ``owner+name/repo``), never from the network, so the
same snapshots give the same bytes.

Every image passes the held-out rule (``data/blocklist.py``): nothing from a repository listed in
``blocklist_repos.txt``, no image whose SHA-256 is listed in ``blocklist.csv`` or whose dHash lies
within 4 bits of a listed one. Exact duplicates (SHA-256 of the written file) and near duplicates
(dHash within ``--near-bits`` of an image already taken, in the order of the selections) are dropped,
and so are near duplicates of the project's sealed test split (``--sealed``), so that no corpus image
is a copy of an image the figures are measured on.

Whole files are copied byte for byte (metadata kept). Tiles and boxes are cut without resampling and
written as PNG (lossless; a tile of a JPEG grid keeps the grid's JPEG traces, which ``note`` says).
``OUT/manifest.csv`` lists every kept image (``path,label,generator,source,width,height,format,license,
origin,sha256,dhash64,cut``; origin = ``owner/repo:path@commit``) and ``OUT/dropped.csv`` every dropped
one with the reason. ``data/sources/github.lock.csv`` pins the SHA-256 of every output file::

    .venv/bin/python data/collect_repos.py --snapshots /work/.mirror --out ../shared-corpus
    .venv/bin/python data/collect_repos.py --dry-run            # counts and problems, writes nothing
    .venv/bin/python data/collect_repos.py --check              # verify OUT against the lock
    .venv/bin/python data/collect_repos.py --table              # the per-source table of data/README.md
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import os
import re
import subprocess
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocklist import Blocklist, DEFAULT_DIR, dhash64, hamming, sha256_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCES_DIR = HERE / "sources" / "github"
LOCK = HERE / "sources" / "github.lock.csv"
SEALED = HERE / "splits" / "test.csv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"}
SELECTION_COLUMNS = ["repo", "commit", "pattern", "label", "generator", "source", "license", "cut", "note"]
MANIFEST_COLUMNS = ["path", "label", "generator", "source", "width", "height", "format", "license",
                    "origin", "sha256", "dhash64", "cut"]
MAX_PIXELS = 64_000_000  # larger files are refused before decoding


class SelectionError(ValueError):
    """A selection row that cannot be used as written."""


@dataclass(frozen=True)
class Selection:
    """One row of a source list: which files of which commit, and what they are."""

    repo: str
    commit: str
    pattern: str
    label: int
    generator: str
    source: str
    license: str
    cut: str
    note: str
    where: str  # file:line, for messages

    @classmethod
    def from_row(cls, row: dict[str, str], where: str) -> "Selection":
        missing = [c for c in SELECTION_COLUMNS if c not in row]
        if missing:
            raise SelectionError(f"{where}: missing columns {missing}")
        values = {c: (row[c] or "").strip() for c in SELECTION_COLUMNS}
        if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", values["repo"]):
            raise SelectionError(f"{where}: repo {values['repo']!r} is not owner/name")
        if not re.fullmatch(r"[0-9a-f]{40}", values["commit"]):
            raise SelectionError(f"{where}: commit must be 40 hex digits, not {values['commit']!r}")
        if values["label"] not in {"0", "1"}:
            raise SelectionError(f"{where}: label must be 0 (real) or 1 (generated)")
        if values["label"] == "0" and values["generator"] != "real":
            raise SelectionError(f"{where}: a real photo's generator must be 'real'")
        if values["label"] == "1" and values["generator"] in {"", "real"}:
            raise SelectionError(f"{where}: a generated image needs its generator")
        for column in ("pattern", "source", "license"):
            if not values[column]:
                raise SelectionError(f"{where}: {column} is empty")
        parse_cut(values["cut"], where)
        return cls(label=int(values["label"]), where=where,
                   **{c: values[c] for c in SELECTION_COLUMNS if c != "label"})


def parse_cut(cut: str, where: str = "") -> tuple[str, tuple[int, ...]]:
    """``("whole", ())``, ``("grid", (rows, cols, gap))`` or ``("box", (l, t, r, b))``."""
    if not cut:
        return "whole", ()
    m = re.fullmatch(r"grid:(\d+)x(\d+)(?::gap=(\d+))?", cut)
    if m:
        rows, cols, gap = int(m[1]), int(m[2]), int(m[3] or 0)
        if rows < 1 or cols < 1 or rows * cols < 2:
            raise SelectionError(f"{where}: grid {cut!r} needs at least two tiles")
        return "grid", (rows, cols, gap)
    m = re.fullmatch(r"box:(\d+),(\d+),(\d+),(\d+)", cut)
    if m:
        left, top, right, bottom = map(int, m.groups())
        if right <= left or bottom <= top:
            raise SelectionError(f"{where}: empty box {cut!r}")
        return "box", (left, top, right, bottom)
    raise SelectionError(f"{where}: cut {cut!r} is not empty, grid:RxC[:gap=G] or box:L,T,R,B")


def tile_boxes(width: int, height: int, rows: int, cols: int, gap: int) -> list[tuple[int, int, int, int]]:
    """Boxes of a ``rows`` x ``cols`` grid with ``gap`` px between tiles and around the border.

    The tile size is what the image's size implies; a grid whose size does not divide evenly is
    refused rather than cut into tiles that straddle a border.
    """
    inner_w, inner_h = width - gap * (cols + 1), height - gap * (rows + 1)
    if inner_w <= 0 or inner_h <= 0 or inner_w % cols or inner_h % rows:
        raise SelectionError(f"a {width}x{height} image is not a {rows}x{cols} grid with gap {gap}")
    tw, th = inner_w // cols, inner_h // rows
    return [(gap + c * (tw + gap), gap + r * (th + gap), gap + c * (tw + gap) + tw, gap + r * (th + gap) + th)
            for r in range(rows) for c in range(cols)]


def read_selections(paths: list[Path]) -> list[Selection]:
    out = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                if not any((v or "").strip() for v in row.values()):
                    continue
                out.append(Selection.from_row(row, f"{path.name}:{i}"))
    return out


def find_snapshot(snapshots: Path, repo: str) -> Path:
    """The git directory of ``repo`` under ``snapshots`` (fetch's bare layout or a clone)."""
    owner, name = repo.split("/")
    for candidate in (snapshots / f"{owner}+{name}" / "repo", snapshots / f"{owner}+{name}" / "repo" / ".git",
                      snapshots / f"{owner}+{name}",
                      snapshots / owner / name / ".git", snapshots / owner / name):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    raise SelectionError(f"no snapshot of {repo} under {snapshots} (owner+name/repo or owner/name)")


class Snapshot:
    """Read-only access to one git directory: the tree of a commit and blobs, in one process."""

    def __init__(self, git_dir: Path):
        self.git_dir = git_dir
        self._batch: subprocess.Popen | None = None

    def _git(self, *args: str) -> bytes:
        return subprocess.run(["git", "--git-dir", str(self.git_dir), *args],
                              check=True, capture_output=True).stdout

    def has_commit(self, commit: str) -> bool:
        result = subprocess.run(["git", "--git-dir", str(self.git_dir), "cat-file", "-e", f"{commit}^{{commit}}"],
                                capture_output=True)
        return result.returncode == 0

    def files(self, commit: str) -> list[tuple[str, int]]:
        """(path, size) of every blob in ``commit``'s tree; size -1 where the snapshot lacks the blob."""
        out = []
        for line in self._git("ls-tree", "-r", "-z", "--long", commit).split(b"\0"):
            if not line:
                continue
            meta, path = line.split(b"\t", 1)
            kind, size = meta.split()[1], meta.split()[3]
            if kind == b"blob":
                size_ = int(size) if size.isdigit() else -1
                out.append((path.decode("utf-8", "surrogateescape"), size_))
        return out

    def read(self, commit: str, path: str) -> bytes | None:
        """The blob's bytes, or None when the snapshot lacks it (large files are left out of snapshots)."""
        if self._batch is None:
            self._batch = subprocess.Popen(["git", "--git-dir", str(self.git_dir), "cat-file", "--batch"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._batch.stdin and self._batch.stdout
        self._batch.stdin.write(f"{commit}:{path}\n".encode("utf-8", "surrogateescape"))
        self._batch.stdin.flush()
        header = self._batch.stdout.readline().split()
        if len(header) < 3 or header[1] != b"blob":
            return None
        data = self._batch.stdout.read(int(header[2]))
        self._batch.stdout.read(1)
        return data

    def close(self) -> None:
        if self._batch is not None:
            self._batch.stdin.close()  # type: ignore[union-attr]
            self._batch.wait()
            self._batch = None


def open_image(data: bytes) -> Image.Image:
    """Decode with Pillow's safe formats only; raises ValueError for anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.init()
        image = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS & set(Image.OPEN)))
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} is more than {MAX_PIXELS} pixels")
        image.load()
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode in {"RGB", "L"} else image.convert("RGB")


@dataclass
class Candidate:
    """One image an engine run would write."""

    selection: Selection
    repo_path: str
    data: bytes
    width: int
    height: int
    format: str
    tile: str  # "" for a whole file, "r0c1" for a tile, "box" for a box
    dhash: int  # of the pixels written, computed from the image already decoded

    def out_name(self) -> str:
        stem = Path(self.repo_path).stem
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60]
        digest = sha256_bytes(self.data)[:10]
        if self.tile:
            return f"{stem}_{self.tile}_{digest}.png"
        return f"{stem}_{digest}{Path(self.repo_path).suffix.lower()}"


def candidates(selection: Selection, snapshot: Snapshot, files: list[tuple[str, int]],
               problems: list[str]) -> list[Candidate]:
    """Every image a selection yields, cut as it says; unreadable files become problems."""
    kind, args = parse_cut(selection.cut)
    out = []
    matched = [(p, s) for p, s in files
               if Path(p).suffix.lower() in IMAGE_SUFFIXES and fnmatch.fnmatchcase(p, selection.pattern)]
    if not matched:
        problems.append(f"{selection.where}: {selection.pattern!r} matches no image in {selection.repo}")
    for path, _size in sorted(matched):
        data = snapshot.read(selection.commit, path)
        if data is None:
            problems.append(f"{selection.where}: {path} is absent from the snapshot (large or LFS file)")
            continue
        if data.startswith(b"version https://git-lfs"):
            problems.append(f"{selection.where}: {path} is a Git LFS pointer")
            continue
        try:
            image = open_image(data)
        except Exception as error:  # noqa: BLE001 - any decoder failure is a problem row, not a crash
            problems.append(f"{selection.where}: {path} cannot be decoded ({type(error).__name__}: {error})")
            continue
        fmt = "JPEG" if image.format == "MPO" else image.format
        if kind == "whole":
            out.append(Candidate(selection, path, data, image.width, image.height, fmt, "", dhash64(image)))
            continue
        try:
            boxes = (tile_boxes(image.width, image.height, *args) if kind == "grid" else [args])
        except SelectionError as error:
            problems.append(f"{selection.where}: {path}: {error}")
            continue
        rgb = as_rgb(image)
        for i, box in enumerate(boxes):
            if box[2] > image.width or box[3] > image.height:
                problems.append(f"{selection.where}: {path}: box {box} outside {image.width}x{image.height}")
                continue
            tile = rgb.crop(box)
            name = f"r{i // args[1]}c{i % args[1]}" if kind == "grid" else "box"
            out.append(Candidate(selection, path, png_bytes(tile), tile.width, tile.height, "PNG", name, dhash64(tile)))
    return out


def sealed_dhashes(split: Path) -> list[int]:
    """dHashes of the sealed test split's images (paths relative to the split file); [] when absent."""
    if not split.is_file():
        return []
    out = []
    with open(split, newline="") as f:
        for row in csv.DictReader(f):
            path = (split.parent / row["path"]).resolve()
            if path.is_file():
                with Image.open(path) as image:
                    out.append(dhash64(image))
    return out


@dataclass
class Run:
    kept: list[tuple[Candidate, int, str]]
    dropped: list[dict[str, str]]
    problems: list[str]
    per_selection: dict[str, Counter]


def collect(selections: list[Selection], snapshots: Path, blocklist: Blocklist, *,
            sealed: list[int], near_bits: int, min_side: int) -> Run:
    """Apply the selections: read, cut, filter by the held-out rule, size and duplicates."""
    kept: list[tuple[Candidate, int, str]] = []
    dropped: list[dict[str, str]] = []
    problems: list[str] = []
    per_selection: dict[str, Counter] = defaultdict(Counter)
    seen_sha: set[str] = set()
    seen_dhash: list[int] = []
    by_repo: dict[str, list[Selection]] = defaultdict(list)
    for s in selections:
        by_repo[s.repo].append(s)
    for repo, repo_selections in by_repo.items():
        if blocklist.repo_held_out(repo):
            for s in repo_selections:
                problems.append(f"{s.where}: {repo} is listed in blocklist_repos.txt: nothing may be taken from it")
                per_selection[s.where]["held-out repository"] += 1
            continue
        try:
            snapshot = Snapshot(find_snapshot(snapshots, repo))
        except SelectionError as error:
            problems.extend(f"{s.where}: {error}" for s in repo_selections)
            continue
        try:
            trees: dict[str, list[tuple[str, int]]] = {}
            for s in repo_selections:
                if s.commit not in trees:
                    if not snapshot.has_commit(s.commit):
                        problems.append(f"{s.where}: commit {s.commit} is not in the snapshot of {repo}")
                        continue
                    trees[s.commit] = snapshot.files(s.commit)
                for c in candidates(s, snapshot, trees[s.commit], problems):
                    digest, dhash = sha256_bytes(c.data), c.dhash
                    origin = f"{repo}:{c.repo_path}@{s.commit}"
                    reason = ""
                    if min(c.width, c.height) < min_side:
                        reason = f"smaller than {min_side} px"
                    elif why := blocklist.held_out(digest, dhash):
                        reason = f"held out ({why})"
                    elif digest in seen_sha:
                        reason = "duplicate (sha256)"
                    elif any(hamming(dhash, d) <= blocklist.max_bits for d in sealed):
                        reason = "near duplicate of the sealed test split"
                    elif any(hamming(dhash, d) <= near_bits for d in seen_dhash):
                        reason = f"near duplicate (dhash within {near_bits} bits)"
                    per_selection[s.where][reason or "kept"] += 1
                    if reason:
                        dropped.append({"origin": origin, "tile": c.tile, "sha256": digest,
                                        "dhash64": f"{dhash:016x}", "reason": reason})
                        continue
                    seen_sha.add(digest)
                    seen_dhash.append(dhash)
                    kept.append((c, dhash, origin))
        finally:
            snapshot.close()
    return Run(kept, dropped, problems, per_selection)


def write(run: Run, out: Path) -> list[dict[str, str]]:
    """Write the kept images and ``manifest.csv``/``dropped.csv`` under ``out``; return the manifest."""
    rows = []
    for c, dhash, origin in run.kept:
        s = c.selection
        rel = Path("real" if s.label == 0 else "fake") / s.source / c.out_name()
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or sha256_bytes(target.read_bytes()) != sha256_bytes(c.data):
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(c.data)
            os.replace(tmp, target)
        rows.append({"path": rel.as_posix(), "label": str(s.label), "generator": s.generator,
                     "source": s.source, "width": str(c.width), "height": str(c.height),
                     "format": c.format, "license": s.license, "origin": origin,
                     "sha256": sha256_bytes(c.data), "dhash64": f"{dhash:016x}",
                     "cut": f"{s.cut}@{c.tile}" if c.tile else ""})
    write_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    write_csv(out / "dropped.csv", ["origin", "tile", "sha256", "dhash64", "reason"], run.dropped)
    return rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def check(out: Path, lock: Path) -> list[str]:
    """Differences between the files under ``out`` and the pinned SHA-256s of ``lock``."""
    if not lock.is_file():
        return [f"{lock}: no lock file"]
    problems = []
    with open(lock, newline="") as f:
        for row in csv.DictReader(f):
            path = out / row["path"]
            if not path.is_file():
                problems.append(f"missing: {row['path']}")
            elif sha256_bytes(path.read_bytes()) != row["sha256"]:
                problems.append(f"differs: {row['path']}")
    return problems


def table(rows: list[dict[str, str]]) -> str:
    """Markdown: one line per source (reals) or generator (generated), with counts, licence, repos."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["source"] if r["label"] == "0" else r["generator"])].append(r)
    lines = ["| class | source / generator | images | formats | licence | repositories |", "|---|---|---|---|---|---|"]
    for (label, name), members in sorted(groups.items()):
        formats = ", ".join(f"{k} {v}" for k, v in Counter(m["format"] for m in members).most_common())
        licences = "; ".join(sorted({m["license"] for m in members}))
        repos = ", ".join(sorted({m["origin"].split(":", 1)[0] for m in members}))
        lines.append(f"| {'real' if label == '0' else 'generated'} | `{name}` | {len(members)} | {formats} "
                     f"| {licences} | {repos} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, str]]) -> str:
    reals = [r for r in rows if r["label"] == "0"]
    fakes = [r for r in rows if r["label"] == "1"]
    return (f"{len(reals)} real photos from {len({r['source'] for r in reals})} sources; "
            f"{len(fakes)} generated images from {len({r['generator'] for r in fakes})} generators")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="*", type=Path,
                        help="source lists (default: every data/sources/github/*.csv)")
    parser.add_argument("--snapshots", type=Path, default=Path("/work/.mirror"))
    parser.add_argument("--out", type=Path, default=HERE.parent.parent / "shared-corpus")
    parser.add_argument("--blocklist", type=Path, default=DEFAULT_DIR,
                        help="folder with blocklist.csv and blocklist_repos.txt")
    parser.add_argument("--sealed", type=Path, default=SEALED, help="split whose near duplicates are dropped")
    parser.add_argument("--near-bits", type=int, default=2, help="dHash distance of near duplicates")
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--dry-run", action="store_true", help="count and report, write nothing")
    parser.add_argument("--check", action="store_true", help="verify --out against the lock file")
    parser.add_argument("--update-lock", action="store_true", help="write the lock from this run")
    parser.add_argument("--table", action="store_true", help="print the per-source table of --out's manifest")
    args = parser.parse_args(argv)

    if args.check:
        problems = check(args.out, args.lock)
        print("\n".join(problems) if problems else f"{args.out}: every file matches {args.lock.name}")
        return 1 if problems else 0
    if args.table:
        with open(args.out / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        print(table(rows))
        print(f"\n{summary(rows)}")
        return 0
    try:
        blocklist = Blocklist.read(args.blocklist)
        selections = read_selections(args.sources or sorted(SOURCES_DIR.glob("*.csv")))
    except (FileNotFoundError, SelectionError) as error:
        print(f"collect_repos: {error}", file=sys.stderr)
        return 2
    run = collect(selections, args.snapshots, blocklist, sealed=sealed_dhashes(args.sealed),
                  near_bits=args.near_bits, min_side=args.min_side)
    for where, counts in run.per_selection.items():
        print(f"{where}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for problem in run.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    fake_rows = [{"label": str(c.selection.label), "source": c.selection.source,
                  "generator": c.selection.generator} for c, _, _ in run.kept]
    print(summary(fake_rows) + f"; dropped {len(run.dropped)}")
    if args.dry_run:
        return 0
    rows = write(run, args.out)
    print(f"wrote {len(rows)} images and manifest.csv to {args.out}")
    if args.update_lock:
        write_csv(args.lock, ["path", "sha256", "origin"],
                  [{k: r[k] for k in ("path", "sha256", "origin")} for r in rows])
        print(f"pinned {len(rows)} files in {args.lock}")
    elif args.lock.is_file():
        problems = check(args.out, args.lock)
        if problems:
            print(f"{len(problems)} files differ from {args.lock.name} (first: {problems[0]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
