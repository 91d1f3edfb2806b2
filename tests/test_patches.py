import numpy as np
import pytest

from detector.fusion import combine_crops, fuse
from detector.inference import Detector
from detector.patches import PatchSettings, full_plan, patch_plan
from tests.conftest import noise_image


def test_full_plan_small_image_is_one_crop():
    assert len(full_plan(100, 120, tile_size=128)) == 1


def test_full_plan_cores_partition_the_image():
    crops = full_plan(300, 200, tile_size=64, margin=24)
    cover = np.zeros((300, 200), int)
    for c in crops:
        cover[c.core_top : c.core_bottom, c.core_left : c.core_right] += 1
        assert c.top % 8 == 0 and c.left % 8 == 0
        assert c.top <= c.core_top and c.bottom >= c.core_bottom
    assert (cover == 1).all()


@pytest.mark.parametrize("layout", ["grid", "random"])
def test_patch_plan_aligned_inside_and_deterministic(layout):
    a = patch_plan(500, 333, patch_size=128, num_patches=9, layout=layout, seed=3)
    b = patch_plan(500, 333, patch_size=128, num_patches=9, layout=layout, seed=3)
    assert a == b and 1 <= len(a) <= 9
    for c in a:
        assert c.top % 8 == 0 and c.left % 8 == 0
        assert c.bottom <= 500 and c.right <= 333 and c.shape == (128, 128)


def test_patch_plan_small_image_uses_whole_image():
    crops = patch_plan(40, 50, patch_size=128, num_patches=8)
    assert len(crops) == 1 and crops[0].shape == (40, 50)


def test_fusion_rules():
    x = np.array([-2.0, 0.0, 1.0, 5.0])
    assert fuse(x, "mean") == pytest.approx(1.0)
    assert fuse(x, "max") == 5.0
    assert fuse(x, "median") == pytest.approx(0.5)
    assert fuse(x, "trimmed", trim=0.25) == pytest.approx(0.5)
    lse = fuse(x, "lse")
    assert fuse(x, "mean") < lse < fuse(x, "max")
    assert fuse(np.array([1.0, 1.0]), "lse") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(x, "vote")


def test_tiled_full_mode_equals_untiled(tiny_checkpoint):
    """An image several tiles wide and tall, sides not multiples of 8: the stitched map is the untiled one."""
    det = Detector.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    assert det.tile_margin == 40  # receptive field 71 px
    img = noise_image(301, 389, seed=1)
    tiled_settings = PatchSettings(mode="full", tile_size=48)
    plan = det.resolve_settings(tiled_settings).plan(301, 389)
    assert len({c.top for c in plan}) >= 3 and len({c.left for c in plan}) >= 3  # several tiles each way
    assert len({c.shape for c in plan}) == 1  # all tiles share one shape (README)
    assert all(c.shape[0] < 301 and c.shape[1] < 389 for c in plan)  # tiles, not the whole image
    whole, whole_map, n1 = det.score_pixels(img, PatchSettings(mode="full", tile_size=4096))
    tiled, tiled_map, n2 = det.score_pixels(img, tiled_settings)
    assert n1 == 1 and n2 == len(plan)
    assert abs(whole - tiled) <= 1e-4
    np.testing.assert_allclose(tiled_map, whole_map, rtol=1e-4, atol=1e-4)


def test_tiling_with_small_margin_drifts_but_stays_close(tiny_checkpoint):
    det = Detector.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    img = noise_image(301, 389, seed=1)
    whole, whole_map, _ = det.score_pixels(img, PatchSettings(mode="full", tile_size=4096))
    no_margin, no_margin_map, n = det.score_pixels(img, PatchSettings(mode="full", tile_size=48, margin=0))
    assert n > 1
    drift = np.abs(no_margin_map - whole_map)
    assert drift.max() > 1e-3  # zero padding at tile borders changes border cells ...
    assert abs(whole - no_margin) < drift.max()  # ... and averages out in the image logit


@pytest.mark.parametrize("h, w", [(301, 389), (1000, 777), (96, 1001), (225, 224)])
def test_full_plan_tiles_share_one_shape(h, w):
    crops = full_plan(h, w, tile_size=96, margin=64)
    assert len({c.shape for c in crops}) == 1
    assert all(c.bottom <= h and c.right <= w and c.top % 8 == 0 and c.left % 8 == 0 for c in crops)


def test_combine_full_weights_cells_equally():
    crops = full_plan(16, 32, tile_size=16, margin=0)
    maps = [np.full((2, 2), 1.0), np.full((2, 2), 3.0)]
    logit, canvas = combine_crops(crops, maps, mode="full", stride=8, height=16, width=32)
    assert logit == pytest.approx(2.0)
    assert canvas.shape == (2, 4) and canvas[0, 0] == 1.0 and canvas[0, 3] == 3.0
