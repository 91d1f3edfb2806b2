"""Streaming training data: deterministic jobs, aligned twins cut alike, flat memory, GenImage, --init."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from detector.checkpoints import CheckpointError, load_backbone, load_model
from detector.datasets import read_labelled
from detector.images import decode_image
from detector.training import Recipe, TrainConfig, train
from detector.training.data import BatchPlan, DecodedCache, TrainingSamples, TrainingTable, training_batches

ROOT = Path(__file__).resolve().parent.parent


def _smooth(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth random image: JPEG barely changes it, yet every position looks different."""
    coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _twin_manifest(folder: Path, n_pairs: int = 6, n_other: int = 3) -> Path:
    """Reals (half JPEG, half PNG), a PNG twin of each (real + noise of +-2) and unpaired fakes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_pairs):
        real = folder / f"real{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(_smooth(rng)).save(real, quality=90)
        twin_pixels = decode_image(real).pixels.astype(int) + rng.integers(-2, 3, (64, 64, 3))
        Image.fromarray(np.clip(twin_pixels, 0, 255).astype(np.uint8)).save(folder / f"twin{i}.png")
        rows += [(real.name, 0, "", ""), (f"twin{i}.png", 1, "tae", real.name)]
    for i in range(n_other):
        Image.fromarray(_smooth(rng)).save(folder / f"gan{i}.png")
        rows.append((f"gan{i}.png", 1, "gan", ""))
    pd.DataFrame(rows, columns=["path", "label", "generator", "pair"]).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_manifest_keeps_pair_resolved_like_path(tmp_path):
    table = read_labelled(_twin_manifest(tmp_path))
    twins = table[table["generator"] == "tae"]
    assert list(twins["pair"]) == [str(tmp_path / f"real{i}.{'jpg' if i % 2 else 'png'}") for i in range(6)]
    assert table.loc[table["label"] == 0, "pair"].isna().all()
    assert table.loc[table["generator"] == "gan", "pair"].isna().all()


def test_twins_are_cut_at_the_same_position_in_one_batch(tmp_path):
    table = TrainingTable.build(read_labelled(_twin_manifest(tmp_path)), 32, 1 << 28, log=lambda m: None)
    assert table.n_pairs == 6
    recipe = Recipe(crop_size=32)  # every augmentation on, JPEG alignment included
    samples = TrainingSamples(table, recipe, 1 << 28)
    plan = BatchPlan(table, batch_size=8, seed=3, start=0, stop=6)
    n_pairs = 0
    for step, (x, y, failures) in enumerate(training_batches(plan, samples, workers=0)):
        jobs = plan.jobs(step)
        assert [int(table.labels[j.row]) for j in jobs] == y.int().tolist() and not failures
        for i in range(len(jobs) - 1):
            if jobs[i].key != jobs[i + 1].key:
                continue
            n_pairs += 1
            real, twin = x[i].float(), x[i + 1].float()
            assert table.partner[jobs[i + 1].row] == jobs[i].row and y[i] == 0 and y[i + 1] == 1
            assert (real - twin).abs().mean() < 6  # the same position and the same draws
            # control: the twin's image cut with another slot's draws is far from its real's crop
            other = samples[jobs[i + 1]._replace(key=(3, step, 1, 99))][0].permute(2, 0, 1).float()
            assert (real - other).abs().mean() > 15
    assert n_pairs >= 6
    unpaired = BatchPlan(table, batch_size=8, seed=3, start=0, stop=6, paired=False)
    assert all(j.height == 0 for s in range(6) for j in unpaired.jobs(s))


def test_paired_batches_stay_class_balanced(tmp_path):
    table = TrainingTable.build(read_labelled(_twin_manifest(tmp_path)), 32, 1 << 28, log=lambda m: None)
    plan = BatchPlan(table, batch_size=16, seed=0, start=0, stop=300)
    labels = np.array([table.labels[j.row] for s in range(300) for j in plan.jobs(s)])
    assert abs(labels.mean() - 0.5) < 0.03


def test_jobs_are_pure_functions_of_seed_step_and_rank(tmp_path):
    table = TrainingTable.build(read_labelled(_twin_manifest(tmp_path)), 32, 1 << 28, log=lambda m: None)
    a = BatchPlan(table, 8, seed=1, start=0, stop=10, rank=0)
    assert list(a)[7] == BatchPlan(table, 8, seed=1, start=7, stop=8, rank=0).jobs(7)  # resuming at step 7
    other_rank = BatchPlan(table, 8, seed=1, start=0, stop=10, rank=1)
    assert all(a.jobs(s) != other_rank.jobs(s) for s in range(10))
    # the same sample whether a worker process or this one computes it
    samples = TrainingSamples(table, Recipe(crop_size=32, blur_p=0.0), 1 << 28)
    x, _, _ = next(training_batches(BatchPlan(table, 8, seed=1, start=4, stop=5), samples, workers=2))
    direct = torch.stack([samples[j][0] for j in BatchPlan(table, 8, seed=1, start=4, stop=5).jobs(4)])
    assert torch.equal(x, direct.permute(0, 3, 1, 2))


def test_small_and_broken_files_are_skipped_from_headers(tmp_path):
    manifest = _twin_manifest(tmp_path)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    table = pd.concat([read_labelled(manifest), pd.DataFrame(
        {"path": [str(tmp_path / "small.png"), str(tmp_path / "broken.png")], "label": [0, 1],
         "generator": ["real", "gan"], "family": ["real", "gan"], "source": ["s", "gan"]})], ignore_index=True)
    lines: list[str] = []
    built = TrainingTable.build(table, 32, 1 << 28, log=lines.append)
    assert len(built) == 15
    assert any("small.png: 40x20 is smaller than the 32 px crop" in line for line in lines)
    assert any("broken.png" in line for line in lines)
    assert sorted(built.jpeg_qualities.tolist()) == [90, 90, 90]  # from the headers of the three JPEG reals


def test_genimage_layout(tmp_path):
    root = tmp_path / "GenImage"
    for split in ("train", "val"):
        for cls, n in (("ai", 2), ("nature", 3)):
            folder = root / "ADM" / "imagenet_ai_0508_adm" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i}.{'png' if cls == 'ai' else 'JPEG'}")
    everything = read_labelled(root)
    assert len(everything) == 10 and set(everything["generator"]) == {"ADM", "real"}
    train_only = read_labelled(root / "ADM" / "imagenet_ai_0508_adm" / "train")
    assert len(train_only) == 5 and all("/train/" in p for p in train_only["path"])
    assert sorted(train_only["label"]) == [0, 0, 0, 1, 1]
    fakes = train_only[train_only["label"] == 1]
    assert set(fakes["generator"]) == {"ADM"}  # named after the generator folder above the split
    assert set(train_only.loc[train_only["label"] == 0, "source"]) == {"ADM/nature"}
    assert set(read_labelled(root / "ADM")["generator"]) == {"ADM", "real"}


def _imagenet_classifier(folder: Path, name: str) -> Path:
    """A torchvision-shaped state dict (random values) with a 1000-way fc, as torch.save writes it."""
    import torchvision

    torch.manual_seed(0)
    path = folder / f"{name}.pth"
    torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def imagenet_resnet50(tmp_path_factory) -> Path:
    return _imagenet_classifier(tmp_path_factory.mktemp("imagenet"), "resnet50")


def test_init_from_an_imagenet_classifier_reinitialises_only_the_head(imagenet_resnet50, tmp_path):
    state = torch.load(imagenet_resnet50, weights_only=True)
    model, info, reinit = load_backbone(imagenet_resnet50)
    assert set(reinit) == {"fc.weight", "fc.bias"}
    assert "(1000, 2048)" in reinit["fc.weight"] and "(1, 2048)" in reinit["fc.weight"]
    assert model.fc.weight.shape == (1, 2048)
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_model(imagenet_resnet50)  # inference stays strict
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:32]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra.weight.*wrong shapes: layer1.0.conv1.weight"):
        load_backbone(tmp_path / "bad.pth")


def test_training_from_an_imagenet_classifier_says_what_it_reinitialised(tmp_path):
    (tmp_path / "data").mkdir()
    manifest = _twin_manifest(tmp_path / "data")
    lines: list[str] = []
    cfg = TrainConfig(train=[str(manifest)], val=[str(manifest)], output_dir=str(tmp_path / "run"),
                      init=str(_imagenet_classifier(tmp_path, "resnet18")), architecture="resnet18nodown",
                      recipe=Recipe(crop_size=32), batch_size=4, steps_per_epoch=1,
                      max_epochs=1, val_crop=32, val_crops_per_image=1, threads=2, workers=0)
    table = read_labelled(manifest)
    record = train(cfg, train_table=table, val_table=table, log=lines.append)
    assert set(record["init"]["reinitialised"]) == {"fc.weight", "fc.bias"}
    said = [line for line in lines if "re-initialised" in line]
    assert len(said) == 1 and "fc.weight (checkpoint (1000, 512) vs model (1, 512))" in said[0]
    assert "fc.bias" in said[0] and "layer" not in said[0]


_RSS_RUN = textwrap.dedent("""
    import resource, sys
    from detector.datasets import read_manifest
    from detector.training import Recipe, TrainConfig, train

    table, val = read_manifest(sys.argv[1]), read_manifest(sys.argv[2])
    cfg = TrainConfig(train=[sys.argv[1]], val=[sys.argv[2]], output_dir=sys.argv[3], architecture="resnet18nodown",
                      recipe=Recipe(crop_size=32, blur_p=0.0), batch_size=8, steps_per_epoch=3, max_epochs=1,
                      val_crop=32, val_crops_per_image=1, threads=1, workers=2)
    train(cfg, train_table=table, val_table=val, log=lambda m: None)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


@pytest.mark.timeout(300)
def test_peak_memory_does_not_grow_with_the_training_set(tmp_path):
    """1,000 vs 10,000 images of 96x96 px: 9,000 decoded images would add 250 MB; streaming adds little."""
    rng = np.random.default_rng(0)
    import io

    blobs = []
    for _ in range(32):  # 32 distinct small PNGs, copied: writing 10,000 files takes a second
        tile = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.tile(tile, (8, 8, 1))).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(10_000):
        (images / f"{i}.png").write_bytes(blobs[i % len(blobs)])
        rows.append((f"images/{i}.png", i % 2, f"gen{i % 5}" if i % 2 else "real", f"src{i % 7}"))
    table = pd.DataFrame(rows, columns=["path", "label", "generator", "source"])
    table.iloc[:4].to_csv(tmp_path / "val.csv", index=False)
    peaks = {}
    for n in (1_000, 10_000):
        table.iloc[:n].to_csv(tmp_path / f"train{n}.csv", index=False)
        proc = subprocess.run([sys.executable, "-c", _RSS_RUN, str(tmp_path / f"train{n}.csv"), str(tmp_path / "val.csv"),
                               str(tmp_path / f"run{n}")], capture_output=True, text=True, cwd=ROOT, timeout=280)
        assert proc.returncode == 0, proc.stderr[-2000:]
        main_kb, workers_kb = (int(v) for v in proc.stdout.split()[-2:])
        peaks[n] = (main_kb / 1024, workers_kb / 1024)
    print(f"\n[reliability] training memory: peak RSS {peaks[1_000][0]:.0f} MB (main) / {peaks[1_000][1]:.0f} MB "
          f"(largest worker) on 1,000 images, {peaks[10_000][0]:.0f} / {peaks[10_000][1]:.0f} MB on 10,000")
    assert peaks[10_000][0] - peaks[1_000][0] <= 150, peaks
    assert peaks[10_000][1] - peaks[1_000][1] <= 150, peaks


def test_decoded_cache_keeps_only_large_images_within_its_bound():
    cache = DecodedCache(max_bytes=3 * 1000 * 1000 * 3, min_pixels=1_000_000)
    small = np.zeros((100, 100, 3), np.uint8)
    cache.put(0, small)
    assert cache.get(0) is None  # small images are cheap to decode: never kept
    for key in range(1, 5):
        cache.put(key, np.full((1000, 1000, 3), key, np.uint8))
        cache.get(2)  # 2 stays the most recently used
    assert cache.nbytes <= cache.max_bytes
    assert cache.get(1) is None and cache.get(2) is not None and cache.get(4) is not None
    assert not cache.get(4).flags.writeable  # a sample cannot change what the next one sees


def test_cached_and_fresh_decodes_give_the_same_samples(tmp_path):
    table = TrainingTable.build(read_labelled(_twin_manifest(tmp_path)), 32, 1 << 28, log=lambda m: None)
    jobs = BatchPlan(table, 8, seed=2, start=0, stop=3).jobs(1)
    fresh = TrainingSamples(table, Recipe(crop_size=32), 1 << 28)
    cached = TrainingSamples(table, Recipe(crop_size=32), 1 << 28, cache_bytes=1 << 30)
    cached.cache.min_pixels = 0  # the fixture's images are small: cache them all
    for _ in range(2):  # the second pass reads the cache
        for job in jobs:
            assert torch.equal(fresh[job][0], cached[job][0])
    assert cached.cache.nbytes > 0
