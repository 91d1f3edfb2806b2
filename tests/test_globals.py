"""The library leaves process-wide settings alone; only the command line opts into its tunings.

Run in a fresh interpreter, because the test process has imported detector long before.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detector.images import ImageError, decode_image
from tests.conftest import ROOT, noise_image

_PROBE = r'''
import ctypes, json, sys, warnings
import numpy as np
import torch
from PIL import Image, ImageFile

def mmapped_blocks_for_a_large_malloc():
    """How many chunks glibc serves by mmap when asked for 64 MB: 1 normally, 0 after mallopt(M_MMAP_MAX, 0)."""
    libc = ctypes.CDLL("libc.so.6")
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)
    during = libc.mallinfo2().hblks
    libc.free(ctypes.c_void_p(block))
    return during - before

def state():
    return {"MAX_IMAGE_PIXELS": Image.MAX_IMAGE_PIXELS, "LOAD_TRUNCATED_IMAGES": ImageFile.LOAD_TRUNCATED_IMAGES,
            "cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "deterministic": torch.are_deterministic_algorithms_enabled(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "matmul": torch.get_float32_matmul_precision(),
            "warning filters": [repr(f) for f in warnings.filters], "mmap": mmapped_blocks_for_a_large_malloc()}

checkpoint, image, out = sys.argv[1:4]
# third-party packages set their own filters when first imported: import them first, so that only
# what detector itself does shows
import click, filelock, pandas, safetensors, scipy.stats, sklearn.metrics, torchvision, tqdm  # noqa: F401
warnings.simplefilter("default")  # a host's own filter, which must survive
torch.set_num_threads(1)
before = state()
import detector
after_import = state()
det = detector.Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")
pred = det.predict(image)
after_predict = state()
from detector.cli import main
main(["scan", image, "-o", out, "--weights", checkpoint, "--device", "cpu", "--precision", "fp32", "--workers", "0",
      "-q", "--patch-size", "32", "--num-patches", "1"], standalone_mode=False)
after_cli = state()
print(json.dumps({"before": before, "import": after_import, "predict": after_predict, "cli": after_cli,
                  "probability": pred.probability}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator probe reads glibc's mallinfo2")
def test_library_leaves_global_settings_alone_and_the_cli_opts_in(tmp_path, checkpoint):
    image = tmp_path / "x.png"
    Image.fromarray(noise_image(40, 48)).save(image)
    done = subprocess.run([sys.executable, "-c", _PROBE, str(checkpoint), str(image), str(tmp_path / "out.csv")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    before = seen["before"]
    assert before["mmap"] == 1 and before["MAX_IMAGE_PIXELS"] == Image.MAX_IMAGE_PIXELS  # the probe sees Pillow's default
    for stage in ("import", "predict"):
        for key, value in before.items():
            assert seen[stage][key] == value, f"{key} changed by {stage}: {value!r} -> {seen[stage][key]!r}"
    assert 0.0 < seen["probability"] < 1.0
    # the command line owns its process and keeps freed memory mapped (the probe can tell)
    assert seen["cli"]["mmap"] == 0
    assert seen["cli"]["MAX_IMAGE_PIXELS"] == before["MAX_IMAGE_PIXELS"]


def test_pixel_limit_is_per_call_and_pillows_guard_stays_on(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(noise_image(64, 80)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a host that guards harder than Pillow's default
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # Pillow's guard still protects the host's own code
    decoded = decode_image(path, max_pixels=64 * 80)  # decode_image applies its own, per-call limit
    np.testing.assert_array_equal(decoded.pixels, noise_image(64, 80))
    with pytest.raises(ImageError, match="too large: 80x64 = 5120 pixels exceeds the limit of 5119"):
        decode_image(path, max_pixels=64 * 80 - 1)
    assert Image.MAX_IMAGE_PIXELS == 1000
