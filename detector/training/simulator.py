"""Synthetic fakes: the AutoGAN idea of Zhang, Karaman and Chang (2019, "Detecting and simulating
artifacts in GAN fake images").

Generators share one component, up-sampling, and its traces. A small CycleGAN-style autoencoder
(stride-2 convolutions down, residual blocks, transposed convolutions up) trained briefly to
reconstruct real photos produces images that look like the photos but carry genuine up-sampling
traces; added as extra fakes, they teach the detector those traces without images of any
particular generator. ``detector simulate`` trains and saves a simulator once; ``detector train
--simulate-fakes FILE`` reuses it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoints import CheckpointError, atomic_write

__all__ = ["Simulator", "train_simulator", "load_simulator", "simulate"]


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Simulator(nn.Module):
    """CycleGAN-style generator: 7x7 stem, two stride-2 convs, residual blocks, two transposed convs."""

    def __init__(self, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.width, self.blocks = width, blocks
        w = width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7), nn.InstanceNorm2d(w), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(w, 2 * w, 3, 2, 1), nn.InstanceNorm2d(2 * w), nn.ReLU(inplace=True),
                   nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.InstanceNorm2d(4 * w), nn.ReLU(inplace=True)]
        layers += [_Residual(4 * w) for _ in range(blocks)]
        layers += [nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(2 * w), nn.ReLU(inplace=True),
                   nn.ConvTranspose2d(2 * w, w, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(w), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` in [-1, 1], sides multiples of 4; returns the reconstruction in [-1, 1]."""
        return self.net(x)


def _to_unit(batch: np.ndarray) -> Tensor:
    # a copy: decoded pixels are read-only, and torch wants memory it may write
    return torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_simulator(
    images: list[np.ndarray],
    output: str | os.PathLike,
    *,
    steps: int = 300,
    crop: int = 128,
    batch_size: int = 8,
    lr: float = 2e-4,
    width: int = 32,
    blocks: int = 3,
    seed: int = 0,
    log=print,
) -> Path:
    """Train a simulator to reconstruct crops of real ``images`` (RGB uint8) and save it (safetensors)."""
    usable = [im for im in images if min(im.shape[:2]) >= crop]
    if not usable:
        raise ValueError(f"no real image is at least {crop} px a side")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Simulator(width, blocks)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    t0 = time.time()
    for step in range(steps):
        crops = []
        for i in rng.integers(0, len(usable), batch_size):
            im = usable[i]
            top = int(rng.integers(0, im.shape[0] - crop + 1))
            left = int(rng.integers(0, im.shape[1] - crop + 1))
            crops.append(im[top : top + crop, left : left + crop])
        x = _to_unit(np.stack(crops))
        loss = F.l1_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"simulator step {step + 1}/{steps}: L1 {loss.item():.4f}")
    meta = {"width": width, "blocks": blocks, "steps": steps, "crop": crop, "lr": lr, "seed": seed,
            "n_images": len(usable), "final_l1": loss.item(), "minutes": (time.time() - t0) / 60}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(output, lambda tmp: save_file(state, tmp, metadata={"simulator": json.dumps(meta)}))
    return Path(output)


def load_simulator(path: str | os.PathLike) -> Simulator:
    """A simulator saved by :func:`train_simulator` (safetensors only: nothing executes)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["simulator"])
        state = load_file(str(path))
    except (KeyError, OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a simulator saved by `detector simulate` ({err})") from None
    model = Simulator(meta["width"], meta["blocks"])
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def simulate(model: Simulator, pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """A simulated fake of an RGB uint8 image: its central crop (at most ``max_side``, multiple of 4) rebuilt."""
    h, w = (min(s, max_side) // 4 * 4 for s in pixels.shape[:2])
    top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
    x = _to_unit(np.ascontiguousarray(pixels[None, top : top + h, left : left + w]))
    y = model(x)[0].permute(1, 2, 0)
    return ((y + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
