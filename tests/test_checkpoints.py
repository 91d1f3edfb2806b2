import pickle
from pathlib import Path

import pytest
import torch

from detector.checkpoints import CheckpointError, load_model, read_state_dict, save_checkpoint
from tests.conftest import seeded_model


@pytest.fixture(scope="module")
def model():
    """A private copy: other tests hand the shared one to Detector, which makes it channels-last."""
    return seeded_model()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd},
        lambda sd: {"net": sd},
        lambda sd: sd,
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    ],
    ids=["model", "state_dict", "net", "bare", "module-prefix"],
)
def test_published_formats_load_identically(tmp_path, model, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(model.state_dict()), path)
    loaded, info = load_model(path)
    x = torch.randn(1, 3, 48, 48)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert info.architecture == "resnet50nodown" and len(info.sha256) == 64


def test_safetensors_round_trip_keeps_metadata(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, model, {"calibration": {"temperature": 2.0, "threshold": 0.5}}, dtype=None)
    loaded, info = load_model(path)
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert info.temperature == 2.0 and info.threshold == 0.5
    assert info.metadata["architecture"] == "resnet50nodown"


def test_fp16_checkpoint_is_close(tmp_path, model):
    path = tmp_path / "w16.safetensors"
    save_checkpoint(path, model)
    loaded, _ = load_model(path)
    x = torch.randn(1, 3, 40, 40)
    assert torch.allclose(_logits(loaded, x), _logits(model, x), atol=5e-2)


def test_missing_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["layer3.2.bn2.running_var"]
    path = tmp_path / "missing.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layer3\.2\.bn2\.running_var"):
        load_model(path)


def test_wrong_architecture_names_shapes(tmp_path):
    from detector.models import create_model

    path = tmp_path / "r18.pth"
    torch.save(create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet50nodown'"):
        load_model(path)


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Exploit(str(marker))}, fh)
    # the same through torch.save's zip container
    zpath = tmp_path / "evil_zip.pth"
    torch.save({"model": _Exploit(str(marker))}, zpath)
    marker.unlink(missing_ok=True)  # torch.save itself called __reduce__ only to record it
    for p in (path, zpath):
        with pytest.raises(CheckpointError, match="refused"):
            read_state_dict(p)
        assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\0" * 100])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(Path("/nonexistent/w.pth"))
