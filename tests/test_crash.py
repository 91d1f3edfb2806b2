"""Crash safety (issue 4): scans killed with SIGKILL and resumed, torn rows, the output lock, atomic saves.

The kill test runs the real command line in a subprocess (two decoding workers, one crop per batch
so that rows are written one by one), kills it at random moments, resumes it each time, and checks
that the finished output has one row per image with the scores of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from detector.checkpoints import atomic_write, file_sha256, read_state_dict, save_checkpoint
from detector.inference import Detector
from detector.patches import PatchSettings
from detector.results import display_path, repair_and_read
from detector.scanning import ScanOptions, scan
from tests.conftest import noise_image

ROOT = Path(__file__).resolve().parent.parent
KILLS = 10
PATCHES = PatchSettings(mode="patches", patch_size=64, num_patches=1)


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")


def _images(folder: Path, n: int = 12) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.fromarray(noise_image(64, 64, 100 + i)).save(path)
        paths.append(path)
    return paths


def _command(folder: Path, out: Path, checkpoint: Path) -> list[str]:
    return [sys.executable, "-m", "detector.cli", "scan", str(folder), "--weights", str(checkpoint), "-o", str(out),
            "--patch-size", "64", "--num-patches", "1", "--batch-size", "1", "--workers", "2", "--device", "cpu",
            "--precision", "fp32", "-q", "--resume"]


def _rows_written(out: Path) -> int:
    try:
        return max(0, out.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _survivors(out: Path) -> list[int]:
    """Processes (a scan or its decoding workers) whose command line names ``out``."""
    needle = os.fsencode(out)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    if needle in fh.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def _wait_gone(out: Path, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _survivors(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
@pytest.mark.timeout(400)
def test_killed_scans_resume_to_the_uninterrupted_result(tmp_path, checkpoint, detector, capsys):
    paths = _images(tmp_path / "imgs")
    reference = tmp_path / "reference.csv"
    scan([tmp_path / "imgs"], detector, reference, ScanOptions(patches=PATCHES, batch_size=1, workers=0, progress=False))
    expected = pd.read_csv(reference, keep_default_na=False).set_index("path")

    out = tmp_path / "out" / "killed.csv"
    command = _command(tmp_path / "imgs", out, checkpoint)
    rng = random.Random(20240611)
    kills, attempts, torn, lock_refused = 0, 0, 0, False
    while kills < KILLS:
        attempts += 1
        assert attempts <= 4 * KILLS, "the scan kept finishing before it could be killed"
        with open(tmp_path / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        started, before = time.monotonic(), _rows_written(out)
        if before >= len(paths) or rng.random() < 0.3:
            moment = ("start-up", rng.uniform(0.2, 3.0))  # import, weights, lock, run record
        else:
            moment = ("rows", before + rng.randint(1, 2))  # while rows are being written
        while proc.poll() is None:
            if moment[0] == "start-up" and time.monotonic() - started >= moment[1]:
                break
            if moment[0] == "rows" and _rows_written(out) >= moment[1]:
                time.sleep(rng.uniform(0.0, 0.15))
                break
            if not lock_refused and before < _rows_written(out) < len(paths) - 1:
                # a second scan of the same output is refused while this one runs
                with pytest.raises(RuntimeError, match="another scan is writing"):
                    scan([tmp_path / "imgs"], detector, out, ScanOptions(patches=PATCHES, workers=0, progress=False, resume=True))
                lock_refused = True
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            continue  # it finished first: not a kill
        kills += 1
        assert _wait_gone(out) == [], "decoding workers of a killed scan are still running"
        data = out.read_bytes() if out.exists() else b""
        if kills % 3 == 0 and data.endswith(b"\n") and _rows_written(out) < len(paths):
            with open(out, "ab") as fh:  # a row cut mid-write, as a full disk or a power cut leaves it
                fh.write(display_path(paths[-1]).encode() + b",0.12")
            torn += 1

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode(errors="replace")[-2000:]
    assert _wait_gone(out) == []

    got = pd.read_csv(out, keep_default_na=False)
    lost = len(paths) - got["path"].nunique()
    assert sorted(got["path"]) == sorted(display_path(p) for p in paths), "a row is missing or written twice"
    assert (got["error"] == "").all()
    got = got.set_index("path").loc[expected.index]
    assert got["logit"].tolist() == pytest.approx(expected["logit"].tolist(), abs=1e-4)
    assert got["label"].tolist() == expected["label"].tolist()
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["detector"]["weights_sha256"] == file_sha256(checkpoint)
    assert lock_refused
    with capsys.disabled():
        print(f"\n[reliability] crash safety: {kills} SIGKILLs survived in {attempts} runs ({torn} torn last rows "
              f"injected and repaired), {lost} rows lost, scores equal to the uninterrupted run")


def test_torn_row_and_lookalike_names_resume(tmp_path, detector):
    """Resume after torn rows, with names that break naive CSV handling or display alike."""
    folder = tmp_path / "in"
    folder.mkdir()
    # sorted as scanned: carriage, new-line, plain, then the twins, which both display as twin\xff.png
    names = [b"carriage\rreturn.png", b'new\nline "quoted", =1.png', b"plain.png", b"twin\\xff.png", b"twin\xff.png"]
    for i, name in enumerate(names):
        Image.fromarray(noise_image(64, 64, 200 + i)).save(os.path.join(os.fsencode(folder), name))
    options = ScanOptions(patches=PATCHES, batch_size=4, workers=0, progress=False)
    resume = ScanOptions(**{**options.__dict__, "resume": True})
    out = tmp_path / "out.csv"
    scan([folder], detector, out, options)
    full = pd.read_csv(out, keep_default_na=False)
    assert len(full) == len(names) and full["path"].nunique() == len(names) - 1
    data = out.read_bytes()

    # cut just after the newline inside the quoted name: that newline must not pass for a row's end
    out.write_bytes(data[: data.index(b"new\nline") + 4])
    assert [row["path"] for row in repair_and_read(out)] == [full["path"][0]]
    assert scan([folder], detector, out, resume).n_skipped == 1
    pd.testing.assert_frame_equal(pd.read_csv(out, keep_default_na=False).drop(columns="seconds"), full.drop(columns="seconds"))

    # cut in the last row, between the twins: the one already scored is skipped, the other is not
    last = data.rstrip(b"\n").rindex(b"\n") + 1
    out.write_bytes(data[: last + 12])
    assert scan([folder], detector, out, resume).n_skipped == len(names) - 1
    pd.testing.assert_frame_equal(pd.read_csv(out, keep_default_na=False).drop(columns="seconds"), full.drop(columns="seconds"))
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["detector"]["weights_sha256"] == file_sha256(detector.info.path)


def test_failed_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    import detector.checkpoints as checkpoints

    path = tmp_path / "w.safetensors"
    save_checkpoint(path, torch.nn.Linear(4, 2), {"generation": 1}, dtype=None)
    old = file_sha256(path)

    def half_then_fail(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "_st_save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, torch.nn.Linear(4, 2), {"generation": 2}, dtype=None)
    assert file_sha256(path) == old
    assert read_state_dict(path)[1]["generation"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"], "a temporary file was left behind"


@pytest.mark.timeout(120)
def test_checkpoint_save_killed_midway_keeps_the_previous_file(tmp_path):
    """SIGKILL in the middle of writing: the previous checkpoint is untouched and loads."""
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, torch.nn.Linear(4, 2), {"generation": 1}, dtype=None)
    old = file_sha256(path)
    code = f"""
import os, signal, torch
import detector.checkpoints as checkpoints
def write_then_die(state, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"partial")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints._st_save = write_then_die
checkpoints.save_checkpoint({str(path)!r}, torch.nn.Linear(4, 2), {{"generation": 2}}, dtype=None)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=100)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode(errors="replace")
    assert file_sha256(path) == old
    assert read_state_dict(path)[1]["generation"] == 1
    # the killed save leaves its temporary file (hidden, never the checkpoint's name) and nothing else
    assert [p.name for p in tmp_path.iterdir() if p.name != "w.safetensors"] == [
        p.name for p in tmp_path.glob(".w.safetensors.*.tmp")
    ]


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,auc\n1,0.9\n")

    def broken(tmp):
        Path(tmp).write_text("epoch,auc\n1,0.9\n2,")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_text() == "epoch,auc\n1,0.9\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
@pytest.mark.timeout(300)
def test_killed_evaluation_reruns_to_the_same_metrics(tmp_path, tiny_checkpoint):
    """`detector evaluate` SIGKILLed once its score cache holds a part, then run again: the same metrics.csv."""
    data = tmp_path / "bench"
    for k in range(150):
        folder = data / ("real" if k % 2 else f"gen{k % 4}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(32, 32, 300 + k)).save(folder / f"{k:03d}.png")
    # the command line in a fresh interpreter, with the tiny test architecture registered
    cli = ("import sys; from detector import models; from tests.conftest import TINY, TinyNoDown; "
           "models._REGISTRY[TINY] = TinyNoDown; from detector.cli import main; main(sys.argv[1:])")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-c", cli, "evaluate", str(data), "--weights", str(tiny_checkpoint), "-o", str(out),
                "--patch-size", "32", "--num-patches", "1", "--batch-size", "1", "--workers", "1", "--bootstrap", "50",
                "--device", "cpu", "--precision", "fp32", "-q"]

    reference = subprocess.run(command(tmp_path / "reference"), cwd=ROOT, capture_output=True, timeout=200)
    assert reference.returncode == 0, reference.stderr.decode(errors="replace")[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list((out / "cache").glob("part-*.csv")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the evaluation finished before it could be killed"
    assert _wait_gone(out) == [], "decoding workers of a killed evaluation are still running"
    assert not (out / "metrics.csv").exists()

    again = subprocess.run(command(out), cwd=ROOT, capture_output=True, timeout=200)
    assert again.returncode == 0, again.stderr.decode(errors="replace")[-2000:]
    reused = int(again.stderr.decode().split(" taken from the cache")[0].rsplit(" ", 1)[-1])
    assert 0 < reused < 150  # the rerun continued from the killed run's cache
    assert (out / "metrics.csv").read_bytes() == (tmp_path / "reference" / "metrics.csv").read_bytes()
    assert (out / "scores.csv").read_bytes() == (tmp_path / "reference" / "scores.csv").read_bytes()
