import pytest
import torch
import torchvision

from detector.models import ModelConfig, ResNet, create_model, list_models
from tests.conftest import seeded_model


def test_names_and_shapes_equal_torchvision():
    ours = create_model("resnet50nodown").state_dict()
    theirs = torchvision.models.resnet50(num_classes=1).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["fc.weight"].shape == (1, 2048) and ours["fc.bias"].shape == (1,)


def test_stem_strides():
    nodown, standard = create_model("resnet50nodown"), create_model("resnet50")
    assert nodown.conv1.stride == (1, 1) and nodown.maxpool.stride == 1
    assert standard.conv1.stride == (2, 2) and standard.maxpool.stride == 2
    assert nodown.output_stride == 8 and standard.output_stride == 32


def test_standard_resnet50_computes_like_torchvision():
    ours = seeded_model("resnet50", seed=1)
    tv = torchvision.models.resnet50(num_classes=1)
    tv.load_state_dict(ours.state_dict())
    tv.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x)[:, 0], atol=1e-5)


def test_logit_is_mean_of_logit_map(model):
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        maps = model.logit_map(x)
        logits = model(x)
    assert maps.shape == (2, 1, 9, 11)
    assert torch.allclose(logits, maps.mean(dim=(2, 3))[:, 0], atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18nodown", "resnet34", "resnext50_32x4d", "resnet101nodown"])
def test_registry_builds_family(name):
    m = create_model(name)
    assert isinstance(m, ResNet) and isinstance(m.config, ModelConfig)
    assert m.config.architecture == name
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1,)


def test_registry_lists_all_variants():
    names = list_models()
    for base in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d"):
        assert base in names and base + "nodown" in names


def test_timm_model_by_name():
    m = create_model("timm:resnet18")
    assert m.config.architecture == "timm:resnet18"
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1,)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="resnet51"):
        create_model("resnet51")


def test_npr_input_is_the_neighbouring_pixel_residual_and_travels_with_the_weights(tmp_path):
    import torch

    from detector.checkpoints import load_model, save_checkpoint
    from detector.models import npr_residual

    x = torch.rand(1, 3, 9, 12)
    r = npr_residual(x)
    assert torch.all(r[..., ::2, ::2] == 0)
    assert torch.allclose(r[..., 1, 3], x[..., 1, 3] - x[..., 0, 2])
    assert torch.equal(npr_residual(x[..., 2:8, 4:10]), r[..., 2:8, 4:10])  # even crops keep their blocks
    model = create_model("resnet18nodown_npr")
    assert model.config.extra == {"input": "npr"} and model.receptive_field == create_model("resnet18nodown").receptive_field + 1
    save_checkpoint(tmp_path / "npr.safetensors", model, dtype=None)
    loaded, info = load_model(tmp_path / "npr.safetensors")
    assert info.architecture == "resnet18nodown_npr" and loaded.input_residual == "npr"
    plain = create_model("resnet18nodown")
    plain.load_state_dict(loaded.state_dict())  # the same weights, fed the image instead of its residual
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded(image), plain.eval()(image))
        assert torch.allclose(loaded(image), plain(npr_residual(image)))
