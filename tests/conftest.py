"""Shared fixtures: small seeded models and checkpoints, the shared fixture images when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import models
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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Compiled-model caches (detector.runtimes.compiled_model_cache) go to a temporary folder, not
    the user's ~/.cache, for the test run and the commands it starts."""
    old = os.environ.get("DETECTOR_CACHE_DIR")
    os.environ["DETECTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DETECTOR_CACHE_DIR", None)
    else:
        os.environ["DETECTOR_CACHE_DIR"] = old


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


TINY = "tiny-test-nodown"


class TinyNoDown(torch.nn.Module):
    """A fully convolutional stand-in for the detector (output stride 8, receptive field 71 px, zero
    padding like the ResNets) that scores a 400 px image in milliseconds: tiling and full-mode scans
    are tested on it, since their exactness depends only on the receptive field and the stride."""

    output_stride = 8

    def __init__(self) -> None:
        super().__init__()
        convs = [torch.nn.Conv2d(3, 8, 3, padding=1)]
        convs += [torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
        convs += [torch.nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3)]
        convs += [torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
        self.convs = torch.nn.ModuleList(convs)
        self.head = torch.nn.Conv2d(8, 1, 1)
        for conv in [*self.convs, self.head]:  # keeps the signal's scale through ten layers
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)

    @property
    def receptive_field(self) -> int:
        rf, jump = 1, 1
        for conv in self.convs:
            rf, jump = rf + (conv.kernel_size[0] - 1) * jump, jump * conv.stride[0]
        return rf

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_map(x).mean(dim=(2, 3))[:, 0]


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch) -> Path:
    """:class:`TinyNoDown` registered as ``tiny-test-nodown`` for this test only, with seeded weights, saved."""
    monkeypatch.setitem(models._REGISTRY, TINY, TinyNoDown)
    torch.manual_seed(0)
    model = create_model(TINY)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, {"note": "tiny seeded test weights"}, dtype=None)
    return path
