"""Aligned twins: the taef2 autoencoder read strictly, twins the size of their reals, make-fakes' manifest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from detector.checkpoints import CheckpointError
from detector.cli import main
from detector.datasets import read_labelled
from detector.images import decode_image
from detector.training import TAEF2, load_tae, train_simulator, twin_maker

from .conftest import ROOT, noise_image

TAE_DIR = (ROOT / ".." / "shared" / "models" / "taef2").resolve()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def tae_dir():
    if not (TAE_DIR / "taef2_encoder.pth").is_file():
        pytest.skip(f"taef2 weights not found at {TAE_DIR} (they live beside the project in ../shared)")
    return TAE_DIR


@pytest.fixture(scope="module")
def fakes(tmp_path_factory, tae_dir):
    """`make-fakes --method tae` run once on the shared fixture (twelve real crops of at most 256 px)."""
    fixture = ROOT / ".." / "shared" / "data" / "fixture"
    if not (fixture / "manifest.csv").is_file():
        pytest.skip(f"shared fixture images not found at {fixture.resolve()}")
    out = tmp_path_factory.mktemp("twins")
    result = CliRunner().invoke(main, ["make-fakes", str(fixture), "--method", "tae", "--tae-dir", str(tae_dir),
                                       "--device", "cpu", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return fixture, out, result.output


def test_make_fakes_writes_one_aligned_twin_per_real(fakes):
    fixture, out, _ = fakes
    reals = read_labelled(fixture)
    reals = reals[reals["label"] == 0]
    table = read_labelled(out)  # the manifest reads as any labelled data
    assert (table["label"] == 0).sum() == (table["label"] == 1).sum() == len(reals)
    assert set(table.loc[table["generator"] != "real", "generator"]) == {"tae-taef2"}
    raw = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["path", "label", "generator", "source", "pair"]
    twins = raw[raw["label"] == "1"]
    assert set(twins["pair"]) == set(raw.loc[raw["label"] == "0", "path"])
    assert (raw.loc[raw["label"] == "0", "pair"] == "").all()
    quality = []
    for twin in twins.itertuples():
        real_px = decode_image(out / twin.pair).pixels
        twin_px = decode_image(out / twin.path).pixels
        assert twin_px.shape == real_px.shape
        assert not np.array_equal(twin_px, real_px)
        quality.append(psnr(twin_px, real_px))
    # measured: 28-40 dB, mean 31.8; one crop dense with fine detail (scikit-learn's china) 22.5 dB
    assert np.mean(quality) > 25 and np.median(quality) > 25 and min(quality) > 20, quality
    # the twin keeps its real's source, so that splitting by source keeps the pair together
    by_path = table.set_index("path")["source"]
    for twin in twins.itertuples():
        assert by_path[str(out / twin.path)] == by_path[str(out / twin.pair)]


def test_make_fakes_resumes_without_redoing_twins(fakes):
    fixture, out, _ = fakes
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    result = CliRunner().invoke(main, ["make-fakes", str(fixture), "--method", "tae", "--tae-dir", str(TAE_DIR),
                                       "--device", "cpu", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "0 twins written" in result.output and f"{len(before)} already there" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before


def test_twins_of_odd_sizes_keep_their_size_and_tiles_join_exactly(tae_dir):
    """Sides not multiples of 8 are padded and cropped back; tiling changes nothing but memory."""
    maker = twin_maker("tae", tae_dir=tae_dir, tile=512)
    image = decode_image(ROOT / "data" / "samples" / "real_chelsea.png").pixels[:75, :101]
    whole = maker.make_twin(np.ascontiguousarray(image))
    assert whole.shape == image.shape
    assert psnr(whole, image) > 25
    tiled = twin_maker("tae", tae_dir=tae_dir, tile=64).make_twin(np.ascontiguousarray(image))
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 2


def _save_tae(folder, edit=None) -> None:
    folder.mkdir()
    model = TAEF2()
    for name, part in (("encoder", model.encoder), ("decoder", model.decoder)):
        state = part.state_dict()
        if edit and name == "decoder":
            edit(state)
        torch.save(state, folder / f"taef2_{name}.pth")


def test_load_tae_refuses_state_dicts_that_do_not_fit(tmp_path):
    _save_tae(tmp_path / "good")
    assert isinstance(load_tae(tmp_path / "good"), TAEF2)

    _save_tae(tmp_path / "renamed", lambda s: s.__setitem__("3.extra.weight", s.pop("3.pool.0.weight")))
    with pytest.raises(CheckpointError, match=r"missing keys: 3\.pool\.0\.weight.*unexpected keys: 3\.extra\.weight"):
        load_tae(tmp_path / "renamed")

    _save_tae(tmp_path / "reshaped", lambda s: s.__setitem__("19.weight", torch.zeros(4, 64, 3, 3)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: 19\.weight"):
        load_tae(tmp_path / "reshaped")

    with pytest.raises(CheckpointError, match="no such folder"):
        load_tae(tmp_path / "absent")


def test_cli_says_where_the_taef2_weights_go(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    Image.fromarray(noise_image(16, 16)).save(data / "real" / "a.png")
    monkeypatch.chdir(tmp_path)  # no ../shared/models/taef2 from here
    result = CliRunner().invoke(main, ["make-fakes", str(data), "--method", "tae", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--tae-dir" in result.output and "taef2_encoder.pth" in result.output
    result = CliRunner().invoke(main, ["make-fakes", str(data), "--method", "autogan", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "--simulator" in result.output


def test_autogan_twins_keep_their_real_size(tmp_path):
    images = [noise_image(40, 40, seed=s) for s in range(2)]
    path = train_simulator(images, tmp_path / "sim.safetensors", steps=1, crop=32, batch_size=2, width=4, blocks=1,
                           log=lambda m: None)
    maker = twin_maker("autogan", simulator=path)
    real = noise_image(45, 67)
    twin = maker.make_twin(real)
    assert twin.shape == real.shape and twin.dtype == np.uint8
    assert maker.generator == "autogan"
    # made whole (InstanceNorm's statistics span the image), so there is a largest image it takes
    maker.max_pixels = 45 * 67 - 1
    with pytest.raises(ValueError, match="more than the 3014 pixels"):
        maker.make_twin(real)
