"""The first hour of a new user (#20): commands that work twice, output for pipelines, inputs judged
before they are scored, quiet logs, and README's Python examples run as written."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from detector.cli import main
from detector.progress import Progress, plural

from .conftest import ROOT, noise_image

FAST = ["--workers", "0", "--patch-size", "32", "--num-patches", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture
def two_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(noise_image(48, 56, seed)).save(tmp_path / name)
    return tmp_path


def test_named_files_print_their_verdicts_twice_and_write_nothing(two_images, tiny_checkpoint):
    runner = CliRunner()
    for name in ("a.png", "b.png", "a.png"):
        done = runner.invoke(main, ["scan", name, "--weights", str(tiny_checkpoint), *FAST])
        assert done.exit_code == 0, done.output
        assert re.search(rf"^{name}: (fake|real) \(probability 0\.\d+", done.output, re.M)
    assert sorted(p.name for p in two_images.iterdir()) == ["a.png", "b.png", "tiny.safetensors"]
    # a folder writes results.csv; the second run says what to type
    assert runner.invoke(main, ["scan", ".", "--weights", str(tiny_checkpoint), *FAST, "-q"]).exit_code == 0
    again = runner.invoke(main, ["scan", ".", "--weights", str(tiny_checkpoint), *FAST, "-q"])
    assert again.exit_code == 1 and "with --resume to continue it" in again.output and "-o NEW.csv" in again.output


def test_jsonl_holds_the_csv_fields_and_stdout_streams_csv(two_images, tiny_checkpoint):
    runner = CliRunner()
    base = ["scan", "a.png", "b.png", "--weights", str(tiny_checkpoint), *FAST, "-q"]
    assert runner.invoke(main, base + ["-o", "x.csv"]).exit_code == 0
    assert runner.invoke(main, base + ["-o", "x.jsonl"]).exit_code == 0
    rows = [json.loads(line) for line in (two_images / "x.jsonl").read_text().splitlines()]
    table = pd.read_csv(two_images / "x.csv", keep_default_na=False)
    assert [list(r) for r in rows] == [list(table.columns)] * 2
    assert [r["label"] for r in rows] == list(table["label"])
    assert rows[0]["probability"] == pytest.approx(table["probability"].iloc[0]) and isinstance(rows[0]["width"], int)
    streamed = runner.invoke(main, base[:-1] + ["-o", "-"])
    assert streamed.exit_code == 0, streamed.output
    assert pd.read_csv(io.StringIO(streamed.stdout))["path"].tolist() == ["a.png", "b.png"]
    assert "scanned" in streamed.stderr and not (two_images / "-").exists()
    refused = runner.invoke(main, base + ["-o", "x.json"])
    assert refused.exit_code != 0 and ".csv, .jsonl or .parquet" in refused.output


def test_fail_on_fake_exits_non_zero_exactly_when_a_row_is_fake(two_images, tiny_checkpoint):
    from detector.checkpoints import with_metadata

    runner = CliRunner()
    verdicts = {}
    for threshold in (-1e6, 1e6):  # everything fake, then nothing fake
        weights = two_images / f"t{threshold:+.0f}.safetensors"
        with_metadata(tiny_checkpoint, weights, {"calibration": {"temperature": 1.0, "threshold": threshold}})
        done = runner.invoke(main, ["scan", "a.png", "b.png", "--weights", str(weights), *FAST, "-q",
                                    "--fail-on", "fake", "-o", f"{threshold:+.0f}.csv"])
        labels = set(pd.read_csv(two_images / f"{threshold:+.0f}.csv")["label"])
        verdicts[threshold] = (done.exit_code, labels)
    assert verdicts[-1e6] == (3, {"fake"}) and verdicts[1e6] == (0, {"real"})


def test_too_small_images_are_error_rows_and_bad_numbers_are_refused_before_loading(two_images, tiny_checkpoint):
    Image.new("RGB", (1, 1)).save(two_images / "one.png")
    runner = CliRunner()
    done = runner.invoke(main, ["scan", "one.png", "--weights", str(tiny_checkpoint), *FAST, "--fail-on", "error"])
    assert done.exit_code == 3 and "one.png: not scored: too small" in done.output
    for option in (["--num-patches", "0"], ["--patch-size", "-5"], ["--batch-size", "0"]):
        # no weights would load from this path: a refusal before loading cannot mention them
        refused = runner.invoke(main, ["scan", "a.png", "--weights", "missing.safetensors", *option])
        assert refused.exit_code == 2 and "is not in the range" in refused.output and "missing" not in refused.output
    (two_images / "empty").mkdir()
    empty = runner.invoke(main, ["scan", "empty", "--weights", str(tiny_checkpoint), *FAST])
    assert empty.exit_code == 1 and "no image found" in empty.output


def test_progress_in_a_log_is_plain_lines_and_words_agree():
    stream = io.StringIO()  # not a terminal
    bar = Progress(5, stream=stream, interval=0.0)
    for _ in range(5):
        bar.update()
    bar.close()
    assert "\r" not in stream.getvalue() and "scanned 1/5 images" in stream.getvalue()
    assert plural(1, "error") == "1 error" and plural(2, "error") == "2 errors"


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(not (ROOT / "weights" / "clip_vitb16.int8.onnx").is_file(),
                    reason="README's examples use the default detector, whose CLIP encoder `make` fetches")
@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_python_examples_run_as_written(index, tmp_path):
    code = _readme_python_blocks()[index]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, f"README block {index}:\n{code}\n{done.stderr[-3000:]}"
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, f"README block {index}, second run:\n{again.stderr[-3000:]}"
