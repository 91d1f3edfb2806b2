"""Training: a tiny run learns, resumes bit for bit, runs under DDP, and calibrates what scan reads."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from detector.checkpoints import load_model
from detector.datasets import read_labelled
from detector.inference import Detector
from detector.training import Recipe, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: Path, fixture: Path, **kw) -> TrainConfig:
    base = dict(
        train=[str(fixture / "manifest.csv")], val=[str(fixture / "manifest.csv")], output_dir=str(tmp),
        recipe=Recipe(crop_size=32, blur_p=0.0, jpeg_p=0.0, jpeg_align=False), batch_size=8, lr=1e-3,
        steps_per_epoch=4, max_epochs=2, val_crop=64, val_crops_per_image=1, threads=2, seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _tables(fixture: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = read_labelled(fixture / "manifest.csv")
    return t, t


def test_tiny_run_writes_checkpoints_and_learns(tmp_path, fixture_dir):
    cfg = _config(tmp_path / "run", fixture_dir, steps_per_epoch=6, max_epochs=4)
    train_t, val_t = _tables(fixture_dir)
    record = train(cfg, train_table=train_t, val_table=val_t, log=lambda m: None)
    out = tmp_path / "run"
    for name in ("best.safetensors", "last.safetensors", "history.csv", "curves.png", "training_state.safetensors"):
        assert (out / name).is_file(), name
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 4 and record["step"] == 24
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    model, info = load_model(out / "last.safetensors")
    assert info.metadata["config"]["recipe"]["crop_size"] == 32
    assert info.metadata["data"]["n_train"] == 24
    assert "versions" in info.metadata and "calibration" in info.metadata


def test_resume_is_bit_for_bit(tmp_path, fixture_dir):
    train_t, val_t = _tables(fixture_dir)
    full = train(_config(tmp_path / "a", fixture_dir), train_table=train_t, val_table=val_t, log=lambda m: None)
    train(_config(tmp_path / "b", fixture_dir, max_epochs=1), train_table=train_t, val_table=val_t, log=lambda m: None)
    with pytest.raises(FileExistsError):
        train(_config(tmp_path / "b", fixture_dir), train_table=train_t, val_table=val_t, log=lambda m: None)
    resumed = train(_config(tmp_path / "b", fixture_dir, resume=True), train_table=train_t, val_table=val_t,
                    log=lambda m: None)
    assert resumed["step"] == full["step"] == 8
    a = load_file(str(tmp_path / "a" / "training_state.safetensors"))
    b = load_file(str(tmp_path / "b" / "training_state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


def test_calibration_is_read_back_by_scan(tmp_path, fixture_dir):
    train_t, val_t = _tables(fixture_dir)
    train(_config(tmp_path / "c", fixture_dir, max_epochs=1), train_table=train_t, val_table=val_t, log=lambda m: None)
    _, info = load_model(tmp_path / "c" / "best.safetensors")
    cal = info.metadata["calibration"]
    det = Detector.from_checkpoint(tmp_path / "c" / "best.safetensors", device="cpu")
    assert det.temperature == pytest.approx(cal["temperature"]) and det.threshold == pytest.approx(cal["threshold"])
    assert cal["temperature"] != 1.0  # really fitted
    z = cal["threshold"] + 0.3
    assert det.label(z) == "fake" and det.label(cal["threshold"] - 0.3) == "real"
    # one meaning for a verdict: the probability is 0.5 at the threshold and "fake" means p >= 0.5
    assert det.probability(z) == pytest.approx(1 / (1 + np.exp(-0.3 / cal["temperature"])))
    assert det.probability(cal["threshold"]) == pytest.approx(0.5)
    assert cal["rule"] == "platt"


@pytest.mark.timeout(600)
def test_ddp_two_processes_agree(tmp_path, fixture_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "detector.cli", "train",
           "--train", str(fixture_dir / "manifest.csv"), "--val", str(fixture_dir / "manifest.csv"),
           "--output-dir", str(tmp_path / "ddp"), "--crop-size", "32", "--batch-size", "4", "--steps-per-epoch", "3",
           "--max-epochs", "1", "--val-crop", "64", "--val-crops", "1", "--threads", "1", "--no-jpeg-align"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if "weights checksum" in l]
    assert len(lines) == 2 and all("ranks agree: True" in l for l in lines), proc.stderr[-2000:]
    assert (tmp_path / "ddp" / "best.safetensors").is_file()


def test_simulated_fakes_join_training(tmp_path, fixture_dir):
    from detector.images import decode_image
    from detector.training import load_simulator, simulate, train_simulator

    train_t, val_t = _tables(fixture_dir)
    reals = [decode_image(p).pixels for p in train_t.loc[train_t["label"] == 0, "path"]]
    sim_path = train_simulator(reals, tmp_path / "sim.safetensors", steps=2, crop=32, batch_size=2, width=8,
                               blocks=1, log=lambda m: None)
    sim = load_simulator(sim_path)
    fake = simulate(sim, reals[0])
    assert fake.dtype == np.uint8 and fake.shape[2] == 3 and fake.shape[0] % 4 == 0
    record = train(_config(tmp_path / "s", fixture_dir, max_epochs=1, steps_per_epoch=2, simulate_fakes=str(sim_path)),
                   train_table=train_t, val_table=val_t, log=lambda m: None)
    assert record["data"]["n_simulated_fakes"] == 12
    assert record["data"]["n_train_fake"] == 24


@pytest.mark.timeout(600)
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path, fixture_dir):
    """A run killed with SIGKILL mid-training and resumed ends with the weights of an uninterrupted run."""
    import signal
    import time

    args = ["--train", str(fixture_dir / "manifest.csv"), "--val", str(fixture_dir / "manifest.csv"),
            "--crop-size", "32", "--batch-size", "8", "--lr", "1e-3", "--steps-per-epoch", "4", "--max-epochs", "6",
            "--val-crop", "64", "--val-crops", "1", "--threads", "2", "--no-jpeg-align", "--blur-p", "0", "--jpeg-p", "0"]
    cli = [sys.executable, "-m", "detector.cli", "train"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, *args, "--output-dir", str(killed)], cwd=ROOT, stderr=subprocess.DEVNULL)
    state = killed / "training_state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*cli, *args, "--output-dir", str(killed), "--resume"], cwd=ROOT, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stderr
    clean = subprocess.run([*cli, *args, "--output-dir", str(tmp_path / "clean")], cwd=ROOT, capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a = load_file(str(killed / "training_state.safetensors"))
    b = load_file(str(tmp_path / "clean" / "training_state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k
