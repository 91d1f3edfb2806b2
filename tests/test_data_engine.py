"""The data engine (data/collect_repos.py) and the held-out rule it enforces (data/blocklist.py)."""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def _load(name: str):
    sys.path.insert(0, str(ROOT / "data"))
    try:
        spec = importlib.util.spec_from_file_location(f"data_{name}", ROOT / "data" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"data_{name}"] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "data"))


blocklist = _load("blocklist")
engine = _load("collect_repos")


def _image(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _repo(root: Path, files: dict[str, bytes]) -> str:
    """A git clone layout (root/.git) holding ``files``; returns its HEAD commit."""
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "images"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def world(tmp_path: Path):
    """Snapshots of two repositories, a blocklist naming one image by hash, one by dHash and one repo."""
    clean, by_sha, by_dhash_src, grid = _image(1), _image(2), _image(3), _image(4, size=(290, 146))
    listed_png = _bytes(by_sha, "PNG")
    files = {
        "photos/clean.png": _bytes(clean, "PNG"),
        "photos/listed_sha.png": listed_png,
        "photos/copy_of_clean.png": _bytes(clean, "PNG"),  # same bytes: an exact duplicate
        # the held-out image itself is a PNG; what was gathered is its JPEG re-save: other bytes, same look
        "photos/listed_look.jpg": _bytes(by_dhash_src, "JPEG", quality=85),
        "photos/tiny.png": _bytes(_image(5, size=(40, 40)), "PNG"),
        "photos/notes.txt": b"not an image",
        "samples/grid.png": _bytes(grid, "PNG"),
    }
    snaps = tmp_path / "snapshots"
    commit = _repo(snaps / "someone" / "photos", files)
    held_commit = _repo(snaps / "held" / "out", {"a.png": _bytes(_image(6), "PNG")})
    bl = tmp_path / "blocklist"
    bl.mkdir()
    listed_dhash = blocklist.dhash64(by_dhash_src)
    with open(bl / "blocklist.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sha256", "dhash64"])
        w.writerow([blocklist.sha256_bytes(listed_png), "0000000000000000"])
        # written in the other bit order, which the rule must also catch
        w.writerow(["0" * 64, f"{blocklist.reverse64(listed_dhash):016x}"])
    (bl / "blocklist_repos.txt").write_text("# held out\nHeld/Out\n")
    head = "repo,commit,pattern,label,generator,source,license,cut,note\n"
    sources = tmp_path / "sources.csv"
    sources.write_text(head
                       + f"someone/photos,{commit},photos/*,0,real,test-photos,CC0,,\n"
                       + f"someone/photos,{commit},samples/grid.png,1,testgan,gh-someone,MIT,grid:2x4:gap=2,\n"
                       + f"held/out,{held_commit},*,0,real,held,CC0,,\n")
    return {"snaps": snaps, "blocklist": bl, "sources": sources, "out": tmp_path / "corpus",
            "lock": tmp_path / "lock.csv", "sealed": tmp_path / "none.csv"}


def _run(world, *extra: str) -> int:
    return engine.main(["--sources", str(world["sources"]), "--snapshots", str(world["snaps"]),
                        "--out", str(world["out"]), "--blocklist", str(world["blocklist"]),
                        "--lock", str(world["lock"]), "--sealed", str(world["sealed"]), *extra])


def test_engine_enforces_the_held_out_rule(world, capsys):
    assert _run(world, "--update-lock") == 0
    err = capsys.readouterr().err
    kept = _rows(world["out"] / "manifest.csv")
    dropped = {(Path(r["origin"].split(":", 1)[1].rsplit("@", 1)[0]).name, r["reason"])
               for r in _rows(world["out"] / "dropped.csv")}
    names = sorted(Path(r["origin"].split(":", 1)[1].rsplit("@", 1)[0]).name for r in kept if r["label"] == "0")
    assert names == ["clean.png"]
    assert ("listed_sha.png", "held out (sha256)") in dropped
    assert ("listed_look.jpg", "held out (dhash)") in dropped
    assert ("copy_of_clean.png", "duplicate (sha256)") in dropped
    assert ("tiny.png", "smaller than 64 px") in dropped
    assert "blocklist_repos.txt" in err and "held/out" in err.lower()
    assert not any(r["origin"].lower().startswith("held/out") for r in kept)
    # the grid became eight 70x70 tiles, without the 2 px gaps
    tiles = [r for r in kept if r["label"] == "1"]
    assert len(tiles) == 8 and all(r["width"] == "70" and r["height"] == "70" for r in tiles)
    assert {r["cut"] for r in tiles} == {f"grid:2x4:gap=2@r{i}c{j}" for i in range(2) for j in range(4)}
    # whole files are byte for byte; the lock pins them and --check verifies them
    clean_row = next(r for r in kept if r["label"] == "0")
    assert blocklist.sha256_bytes((world["out"] / clean_row["path"]).read_bytes()) == clean_row["sha256"]
    assert _run(world, "--check") == 0
    (world["out"] / clean_row["path"]).write_bytes(b"changed")
    assert _run(world, "--check") == 1


def test_origins_in_held_out_repositories_are_not_named():
    rule = blocklist.Blocklist(repos={"held/out"}, loaded=True)
    assert rule.public_origin("github:Held/Out:assets/a.png") == "shared-dev:assets/a.png"
    assert rule.public_origin("github:other/repo:assets/a.png") == "github:other/repo:assets/a.png"
    assert rule.public_origin("deb-mate-backgrounds") == "deb-mate-backgrounds"


def test_grid_tiles_are_cut_without_gaps():
    boxes = engine.tile_boxes(130, 66, 2, 4, 2)
    assert boxes[0] == (2, 2, 32, 32) and boxes[-1] == (98, 34, 128, 64)
    with pytest.raises(engine.SelectionError):
        engine.tile_boxes(131, 66, 2, 4, 2)


def test_engine_refuses_to_run_without_the_blocklist(world, tmp_path, capsys):
    world["blocklist"] = tmp_path / "nowhere"
    assert _run(world, "--dry-run") == 2
    assert "held-out list is missing" in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [
    ({"commit": "abc"}, "40 hex"),
    ({"label": "2"}, "label"),
    ({"label": "0", "generator": "sdxl"}, "generator must be 'real'"),
    ({"cut": "grid:1x1"}, "two tiles"),
    ({"cut": "tiles"}, "cut"),
])
def test_bad_selection_rows_are_refused(row, message):
    good = {"repo": "a/b", "commit": "0" * 40, "pattern": "*.png", "label": "1", "generator": "g", "source": "s",
            "license": "MIT", "cut": "", "note": ""}
    with pytest.raises(engine.SelectionError, match=message):
        engine.Selection.from_row({**good, **row}, "x.csv:2")


@pytest.mark.skipif(not (SHARED / "blocklist.csv").is_file(), reason="../shared/data (the held-out list) is absent")
def test_the_project_blocklist_is_read_and_enforced():
    rule = blocklist.Blocklist.read(SHARED)
    assert rule.loaded and len(rule.sha256) > 100 and len(rule.repos) > 10
    assert rule.repo_held_out("https://github.com/CompVis/stable-diffusion")
    listed = next(iter(rule.sha256))
    assert rule.held_out(listed, 0x0123456789ABCDEF ^ 0xFFFF) in {"sha256"}


def test_committed_source_lists_parse_and_avoid_held_out_repositories():
    lists = sorted((ROOT / "data" / "sources" / "github").glob("*.csv"))
    selections = engine.read_selections(lists)
    if (SHARED / "blocklist_repos.txt").is_file():
        rule = blocklist.Blocklist.read(SHARED)
        assert not [s.where for s in selections if rule.repo_held_out(s.repo)]


@pytest.mark.skipif(not (SHARED / "blocklist.csv").is_file(), reason="../shared/data (the held-out list) is absent")
def test_the_pinned_package_photos_are_not_held_out():
    photos = _load("collect_photos")
    assert photos.held_out_photos(blocklist.Blocklist.read(SHARED)) == []


def test_committed_real_selections_leave_out_network_processed_collections():
    """The rule of real_collections.md: a collection whose pixels passed through a learned image model
    (CelebA-HQ: upsampled and completed by its authors' restoration) is not a real photograph."""
    lists = sorted((ROOT / "data" / "sources" / "github").glob("*.csv"))
    reals = [s for s in engine.read_selections(lists) if s.label == 0]
    assert reals, "no real selections were read"
    processed = [s.where for s in reals
                 if s.source.startswith("celeba-hq") or any(k in s.pattern.lower() for k in ("celeba_hq", "celebahq"))]
    assert processed == []
