import math
import pickle
import re
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


# ------------------------------------------------------------------------------- metadata schema

import json  # noqa: E402

from click.testing import CliRunner  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from detector import models  # noqa: E402
from detector.checkpoints import validate_metadata  # noqa: E402
from detector.cli import main  # noqa: E402
from tests.conftest import TINY, TinyNoDown  # noqa: E402


@pytest.fixture(scope="module")
def tiny_state():
    """TinyNoDown registered for this module; its state dict and a valid metadata record."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models._REGISTRY, TINY, TinyNoDown)
        model = models.create_model(TINY)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {"architecture": TINY, "format_version": 1, "model_config": model.config.to_dict(),
                "calibration": {"temperature": 1.5, "threshold": -0.25, "rule": "eer"}, "val_auc": 0.9, "step": 10,
                "data": {"train": ["x.csv"], "n_train": 4}, "git_commit": "abc", "placeholder": False}
        yield state, meta


def _write(path, state, metadata) -> None:
    raw = metadata if isinstance(metadata, str) else json.dumps(metadata, allow_nan=True)
    save_file(state, str(path), metadata={"detector": raw})


def _info(path):
    return CliRunner().invoke(main, ["info", str(path)])


@pytest.mark.parametrize("field, value, message", [
    ("architecture", "resnet51", "'architecture' must be a known architecture"),
    ("architecture", 50, "'architecture' must be a known architecture"),
    ("calibration", [1.0], "'calibration' must be an object"),
    ("calibration.temperature", 0.0, "'calibration.temperature' must be a finite number > 0"),
    ("calibration.temperature", -2.0, "'calibration.temperature' must be a finite number > 0"),
    ("calibration.temperature", float("nan"), "'calibration.temperature' must be a finite number > 0, got NaN"),
    ("calibration.threshold", float("inf"), "'calibration.threshold' must be a finite number, got Infinity"),
    ("calibration.threshold", "0.5", "'calibration.threshold' must be a finite number"),
    ("calibration.threshold", True, "'calibration.threshold' must be a finite number"),
    ("calibration.a", None, "'calibration.a' must be a finite number"),
    ("model_config.mean", [0.5, 0.5], "'model_config.mean' must be a list of three finite numbers"),
    ("model_config.std", [0.2, 0.0, 0.2], "'model_config.std' must be a list of three finite numbers > 0"),
    ("model_config.std", [0.3, 0.3, 0.3], "'model_config.std' is [0.3, 0.3, 0.3], but architecture"),
    ("model_config.output_stride", 16, "'model_config.output_stride' is 16, but architecture"),
    ("model_config.output_stride", 8.5, "'model_config.output_stride' must be an integer >= 1"),
    ("model_config.architecture", "resnet18", "'model_config.architecture' ('resnet18') contradicts 'architecture'"),
    ("format_version", 99, "'format_version' must be an integer from 1 to 1"),
    ("placeholder", "no", "'placeholder' must be true or false"),
    ("val_auc", "high", "'val_auc' must be a finite number"),
    ("data", "x.csv", "'data' must be an object"),
])
def test_malformed_metadata_names_the_field(tmp_path, tiny_state, field, value, message):
    state, meta = tiny_state
    meta = json.loads(json.dumps(meta))
    parent, _, key = field.rpartition(".")
    (meta[parent] if parent else meta)[key] = value
    path = tmp_path / "bad.safetensors"
    _write(path, state, meta)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(path)
    result = _info(path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.count("\n") == 1 and message in result.output


def test_valid_metadata_with_unknown_fields_loads(tmp_path, tiny_state):
    state, meta = tiny_state
    meta = {**meta, "calibration": {**meta["calibration"], "a": 0.8, "b": -0.1, "fitted_on": {"n": 3}},
            "something_new": [1, {"x": None}]}
    path = tmp_path / "ok.safetensors"
    _write(path, state, meta)
    _, info = load_model(path)
    assert info.temperature == 1.5 and info.threshold == -0.25 and info.metadata["something_new"] == [1, {"x": None}]
    result = _info(path)
    assert result.exit_code == 0 and "temperature 1.5" in result.output and "0.9000 at step 10" in result.output


def test_validate_metadata_refuses_non_objects():
    for value in ([], "x", 3, None):
        with pytest.raises(CheckpointError, match="metadata must be a JSON object"):
            validate_metadata(value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_paths = st.sampled_from(["architecture", "format_version", "placeholder", "calibration", "calibration.temperature",
                          "calibration.threshold", "calibration.a", "calibration.b", "calibration.rule", "model_config",
                          "model_config.architecture", "model_config.mean", "model_config.std",
                          "model_config.output_stride", "model_config.extra", "val_auc", "step", "data",
                          "git_commit", "other"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(_paths, _json), min_size=1, max_size=4), raw=st.none() | st.text(max_size=30))
def test_fuzzed_metadata_gives_a_one_line_error_or_loads(tmp_path_factory, tiny_state, changes, raw):
    state, meta = tiny_state
    meta = json.loads(json.dumps(meta))
    for field, value in changes:
        parent, _, key = field.rpartition(".")
        holder = meta.get(parent) if parent else meta
        if isinstance(holder, dict):
            holder[key] = value
    path = tmp_path_factory.mktemp("fuzz") / "w.safetensors"
    _write(path, state, raw if raw is not None else meta)
    try:
        _, info = load_model(path)
    except CheckpointError as err:
        assert "\n" not in str(err)
    else:
        assert math.isfinite(info.threshold) and math.isfinite(info.temperature) and info.temperature > 0
    result = _info(path)
    assert result.exit_code in (0, 1) and (result.exception is None or isinstance(result.exception, SystemExit)), \
        result.output
    if result.exit_code == 1:
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
