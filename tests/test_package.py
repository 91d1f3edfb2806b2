"""The installed package: a fast start, the weights lookup, optional extras, and a wheel that works elsewhere."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from detector import resources
from detector.resources import DEFAULT_WEIGHTS_NAME, default_weights_path, model_card_summary, weights_dirs

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "pandas", "sklearn", "scipy", "matplotlib")


def _python(code: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_imports_no_heavy_package():
    """`detector --help` and every command's --help, in a fresh interpreter: no torch, pandas, sklearn."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from detector.cli import main\n"
        "commands = [[]] + [[name] for name in main.commands]\n"
        "for c in commands:\n"
        "    r = CliRunner().invoke(main, c + ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage:' in r.output, (c, r.output)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), len(commands))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    heavy, n_commands = result.stdout.split("]")
    assert heavy == "[" and int(n_commands) >= 8  # report among the commands


def test_import_time_shows_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "from detector.cli import main"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "detector.cli" in imported
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_public_names_load_on_first_use():
    result = _python("import sys, detector\nassert 'torch' not in sys.modules\n"
                     "from detector import Detector, scan, PatchSettings\n"
                     "print(Detector.__module__, 'torch' in sys.modules, sorted(set(detector.__all__) - set(dir(detector))))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["detector.inference", "True", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import detector

        detector.nope  # noqa: B018


def test_weights_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(resources.ENV_VAR, raising=False)
    bundled = default_weights_path()
    assert bundled is not None and bundled.name == DEFAULT_WEIGHTS_NAME and bundled.parent in weights_dirs()
    assert weights_dirs()[0] == Path(resources.__file__).resolve().parent / "weights"  # the package's copy first
    assert "Read the limits first" in (model_card_summary(bundled) or "")

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / DEFAULT_WEIGHTS_NAME).write_bytes(b"x")
    monkeypatch.setenv(resources.ENV_VAR, str(folder))
    assert default_weights_path() == folder / DEFAULT_WEIGHTS_NAME and weights_dirs()[0] == folder

    single = tmp_path / "other_name.pth"
    single.write_bytes(b"x")
    monkeypatch.setenv(resources.ENV_VAR, str(single))
    assert default_weights_path() == single  # a file is the default weights whatever its name
    assert weights_dirs()[0] == tmp_path and default_weights_path("something_else.safetensors") is None

    monkeypatch.setenv(resources.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such file or folder"):
        default_weights_path()


def test_bad_env_weights_fail_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from detector.cli import main

    monkeypatch.setenv(resources.ENV_VAR, str(tmp_path / "missing.safetensors"))
    result = CliRunner().invoke(main, ["scan", str(tmp_path), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code != 0 and "DETECTOR_WEIGHTS" in result.output and "Traceback" not in result.output


def test_missing_extra_names_it(monkeypatch):
    with pytest.raises(resources.MissingExtraError, match=r"pip install 'detector\[timm\]'"):
        resources.require("no_such_module_here", "timm", "the architecture timm:x")


def test_heic_without_pillow_heif_says_what_to_install(tmp_path, monkeypatch):
    from detector import images

    monkeypatch.setattr(images, "HEIF_SUPPORTED", False)
    monkeypatch.setattr(images, "DECODED_FORMATS", tuple(f for f in images.DECODED_FORMATS if f != "HEIF"))
    photo = tmp_path / "phone.heic"
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    with pytest.raises(images.ImageError, match=r"detector\[heif\]"):
        images.decode_image(photo)


def test_every_imported_package_is_declared():
    """Third-party imports of detector/ appear in pyproject.toml's dependencies or extras."""
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = " ".join(project["dependencies"] + sum(project["optional-dependencies"].values(), [])).lower()
    distribution = {"PIL": "pillow", "sklearn": "scikit-learn", "pillow_heif": "pillow-heif", "yaml": "pyyaml",
                    "imwatermark": "invisible-watermark", "cv2": "opencv-python-headless", "pywt": "pywavelets"}
    imported = set()
    for path in (ROOT / "detector").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names) if m != "detector"}
    missing = sorted(m for m in third_party if distribution.get(m, m).lower() not in declared)
    assert missing == []
    assert "<" not in " ".join(project["dependencies"])  # no upper-bound pins: exact ones live in the Makefile


@pytest.mark.slow
def test_wheel_installed_elsewhere_finds_its_weights(tmp_path):
    """Build a wheel from a copy of the sources, install it into a new venv, scan from another folder."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "detector", source / "detector", ignore=shutil.ignore_patterns("__pycache__"))  # links resolved
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp_path / "dist").glob("detector-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The new venv borrows this one's dependencies through a .pth file, so nothing is downloaded.
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (resources.ENV_VAR, "PYTHONPATH")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # where `detector download` puts the encoder
    command = [str(venv / "bin" / "detector"), "scan", str(ROOT / "data" / "samples" / "fake_dcgan_0.png"),
               "-o", "out.csv", "--workers", "0", "-q"]
    # the wheel carries the probe, not its 90 MB encoder: without it, one message saying what is missing and where
    scan = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert scan.returncode != 0 and "clip_vitb16.int8.onnx" in scan.stderr + scan.stdout
    assert "detector download" in scan.stderr + scan.stdout
    assert "Traceback" not in scan.stderr and not (elsewhere / "out.csv").exists()
    encoder = ROOT / "weights" / "clip_vitb16.int8.onnx"
    if not encoder.is_file():
        pytest.skip("the CLIP encoder is not in this checkout's weights/ (`make` fetches it)")
    # what a user runs; --from a local copy, as no test may download
    fetched = subprocess.run([str(venv / "bin" / "detector"), "download", "--from", str(encoder)], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300, env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "cache" / "detector" / encoder.name).is_file()
    scan = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert scan.returncode == 0, scan.stderr
    assert "Warning" not in scan.stderr + scan.stdout
    assert "fake_dcgan_0.png: " in scan.stdout  # the single image's verdict
    with open(elsewhere / "out.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["label"] in ("fake", "real") and not rows[0]["error"]
    used = json.loads((elsewhere / "out.csv.json").read_text())["detector"]
    assert used["weights"].startswith(str(site)), used  # the wheel's own copy, not the checkout's
    assert used["architecture"].startswith("clip-probe:")  # the probe's verdict, not the ResNet's
    assert used["backbone"].endswith(str(tmp_path / "cache" / "detector" / encoder.name))
