"""The detector as one object (detector.load): the shipped model set as loaded, members that do not
vote, failures that become error rows, resume under another model set, and the package's layout."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import detector
from detector.cli import main
from detector.ensemble import Ensemble
from detector.scanning import ScanOptions, scan

from .conftest import ROOT, noise_image

WEIGHTS = ROOT / "weights"
SHIPPED_SET = WEIGHTS / "detector.json"
SAMPLE = ROOT / "data" / "samples" / "real_camera.png"
needs_encoder = pytest.mark.skipif(not (WEIGHTS / "clip_vitb16.int8.onnx").is_file(),
                                   reason="the CLIP encoder is not in weights/ (`make` fetches it)")


@needs_encoder
def test_shipped_model_set_as_loaded_is_the_probe_and_its_silent_resnet():
    voting = detector.load(SHIPPED_SET, device="cpu")
    assert isinstance(voting, Ensemble) and voting.names == ["clip"] and voting.weights == [1.0]
    assert voting.conv is None  # the weight-0 ResNet is not even loaded
    verdict = voting.predict(SAMPLE)
    assert verdict.label == ("fake" if verdict.probability >= 0.5 else "real")
    assert verdict.width and verdict.height and verdict.members == {}
    # the default detector is that set, and the interface is the same for every kind of file
    default = detector.load(device="cpu")
    assert default.describe()["weights_sha256"] == voting.describe()["weights_sha256"]
    assert default.predict(SAMPLE).probability == pytest.approx(verdict.probability)
    margins = default.decision_function([SAMPLE, np.asarray(Image.open(SAMPLE).convert("RGB"))])
    assert margins.shape == (2,) and margins[0] == pytest.approx(margins[1], abs=1e-6)
    assert (margins[0] >= 0) == (verdict.label == "fake")

    everyone = detector.load(SHIPPED_SET, device="cpu", members="all")
    assert everyone.names == ["clip", "resnet"] and everyone.weights == [1.0, 0.0]
    record = everyone.describe()
    assert record["voting"] == ["clip"] and {m["weight"] for m in record["members"].values()} == {0.0, 1.0}
    both = everyone.predict(SAMPLE)
    assert set(both.members) == {"clip", "resnet"}
    # the ResNet is reported, not heard: the verdict is the probe's alone
    assert both.probability == pytest.approx(verdict.probability, abs=1e-6) and both.label == verdict.label
    assert both.logit_map is None  # a map of a model with no say would mislead


@needs_encoder
def test_info_describes_a_model_set_member_by_member():
    done = CliRunner().invoke(main, ["info", str(SHIPPED_SET)])
    assert done.exit_code == 0, done.output
    assert "member clip (weight 1)" in done.output and "member resnet (weight 0" in done.output
    assert "clip-probe:" in done.output and "resnet50nodown" in done.output


@needs_encoder
def test_default_scan_computes_no_weight_zero_member(tmp_path):
    out = tmp_path / "default.csv"
    runner = CliRunner()
    done = runner.invoke(main, ["scan", str(SAMPLE), "-o", str(out), "-q", "--workers", "0"])
    assert done.exit_code == 0, done.output
    assert not any(c.startswith("logit_") for c in pd.read_csv(out).columns)
    used = json.loads(Path(f"{out}.json").read_text())["detector"]
    assert used["architecture"].startswith("clip-probe:")
    asked = tmp_path / "all.csv"
    done = runner.invoke(main, ["scan", str(SAMPLE), "-o", str(asked), "-q", "--workers", "0", "--members", "all",
                                "--patch-size", "64", "--num-patches", "1"])
    assert done.exit_code == 0, done.output
    assert {"logit_clip", "logit_resnet"} <= set(pd.read_csv(asked).columns)
    done = runner.invoke(main, ["scan", str(SAMPLE), "-o", str(tmp_path / "x.csv"), "--members", "nobody"])
    assert done.exit_code != 0 and "no member named nobody" in done.output


def test_a_non_finite_score_is_an_error_row_not_a_verdict(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(noise_image(48, 48, i)).save(folder / f"{i}.png")
    model = detector.load(tiny_checkpoint, device="cpu", precision="fp32")
    runtime = model.conv.runtime
    real_maps = runtime.logit_maps
    calls = {"n": 0}

    def sometimes_nan(x):
        maps = real_maps(x)
        calls["n"] += 1
        return np.full_like(maps, np.nan) if calls["n"] == 2 else maps

    runtime.logit_maps = sometimes_nan
    out = tmp_path / "s.csv"
    options = ScanOptions(patches=detector.PatchSettings(patch_size=32, num_patches=1), workers=0, progress=False,
                          batch_size=1)
    summary = scan([folder], model, out, options)
    rows = pd.read_csv(out, keep_default_na=False)
    assert summary.n_errors == 1 and summary.n_fake + summary.n_real == 2
    bad = rows[rows["error"] != ""]
    assert len(bad) == 1 and "non-finite" in bad["error"].iloc[0] and bad["label"].iloc[0] == ""
    assert all(math.isfinite(float(v)) for v in rows.loc[rows["error"] == "", "probability"])


def test_resume_under_a_changed_model_set_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(noise_image(40, 40, i)).save(folder / f"{i}.png")
    spec = tmp_path / "set.json"
    spec.write_text(json.dumps({"models": [{"name": "tiny", "weights": str(tiny_checkpoint), "weight": 1.0}]}))
    out = tmp_path / "s.csv"
    runner = CliRunner()
    args = ["scan", str(folder / "0.png"), "--weights", str(spec), "-o", str(out), "-q", "--workers", "0",
            "--patch-size", "32", "--num-patches", "1", "--device", "cpu", "--precision", "fp32"]
    assert runner.invoke(main, args).exit_code == 0
    # the same set resumes; a moved operating point is another verdict rule and is refused
    args[1] = str(folder)
    done = runner.invoke(main, args + ["--resume"])
    assert done.exit_code == 0, done.output
    from detector.checkpoints import with_metadata

    other = tmp_path / "other.safetensors"

    with_metadata(tiny_checkpoint, other, {"calibration": {"temperature": 1.0, "threshold": 0.5}})
    spec.write_text(json.dumps({"models": [{"name": "tiny", "weights": str(other), "weight": 1.0}], "fusion": "mean"}))
    done = runner.invoke(main, args + ["--resume"])
    assert done.exit_code != 0 and "model set" in done.output
    assert len(pd.read_csv(out)) == 2  # nothing lost, nothing added


# --- the layout ---

def _imports(module: str, tree: ast.AST, modules: set[str], is_package: bool) -> set[str]:
    """The ``detector`` modules that ``module`` imports anywhere (module level or inside functions),
    except under ``if TYPE_CHECKING:``, which never runs."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            stem = ".".join(p for p in (base, node.module or "") if p)
            names = [f"{stem}.{a.name}" for a in node.names] + [stem]
        for name in names:
            while name and name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name not in (module, "detector"):
                found.add(name)
    return found


def test_no_module_imports_a_module_that_imports_it():
    root = ROOT / "detector"
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph = {m: _imports(m, ast.parse(p.read_text(encoding="utf-8")), set(files), p.name == "__init__.py")
             for m, p in files.items()}
    assert graph["detector.hub"] >= {"detector.ensemble", "detector.probe"}  # the walk sees what it should

    def reach(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_train_refuses_options_that_do_not_apply_to_the_architecture(tmp_path):
    runner = CliRunner()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,0\n")
    probe = runner.invoke(main, ["train", "--arch", "clip-probe:clip:onnx:enc.onnx", "--train", str(manifest),
                                 "--val", str(manifest), "--output-dir", str(tmp_path / "o"), "--lr", "0.1",
                                 "--resume"])
    assert probe.exit_code != 0 and "--lr, --resume do not apply to a CLIP probe" in probe.output
    net = runner.invoke(main, ["train", "--train", str(manifest), "--val", str(manifest), "--output-dir",
                               str(tmp_path / "o"), "--views", "4"])
    assert net.exit_code != 0 and "--views does not apply to --arch resnet50nodown" in net.output
