"""Shared fixtures: small seeded models and checkpoints, the shared fixture images when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.checkpoints import save_checkpoint
from detector.models import create_model

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
FIXTURE = SHARED_DATA / "fixture"
DEV = SHARED_DATA / "dev"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def seeded_model(name: str = "resnet50nodown", seed: int = 0) -> torch.nn.Module:
    """A model with seeded weights *and* non-trivial BatchNorm parameters and statistics.

    A freshly built ResNet zero-initialises the last BN of every residual branch, which would make
    most tests blind to bugs in those branches.
    """
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.normal_(0, 0.01)  # logits of a few units, like a trained detector
    return model.eval()


@pytest.fixture(scope="session")
def model() -> torch.nn.Module:
    return seeded_model()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model) -> Path:
    """The seeded model as a project checkpoint (fp32, so comparisons can be exact)."""
    path = tmp_path_factory.mktemp("weights") / "seeded.safetensors"
    save_checkpoint(path, model, {"note": "seeded test weights"}, dtype=None)
    return path


@pytest.fixture
def fixture_dir() -> Path:
    if not (FIXTURE / "manifest.csv").is_file():
        pytest.skip(f"shared fixture images not found at {FIXTURE} (they live beside the project in CI)")
    return FIXTURE


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
