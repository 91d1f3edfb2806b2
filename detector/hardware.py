"""The machine a model runs on: device, precision, CPU features, autocast, input normalisation,
and the process-wide tunings a long scan may opt into.

Plain functions with no knowledge of models or files; every detector and runtime asks here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import nullcontext
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["DEVICES", "PRECISIONS", "autocast", "cpu_has_bf16", "cpu_has_int8_dot", "input_scale", "keep_freed_memory",
           "normalise", "resolve_device", "resolve_precision", "tune_process"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps requested but Apple's MPS is not available")
    return torch.device(name)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), so autocast pays off."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), which
    run an int8 model about twice as fast as bf16 (benchmarks/scan_speed.py)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware has it (recent CPUs, Ampere+ GPUs), fp16 on older GPUs
    and Apple's MPS, fp32 otherwise. Explicit choices are kept."""
    if precision == "int8":
        raise ValueError("int8 runs an exported model: `detector export --format onnx --int8 --calibration DATA "
                         "WEIGHTS -o DIR` writes one, then pass --weights DIR")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``bf16``/``fp16``) on ``device``; a no-op for ``fp32``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def input_scale(config, device: torch.device) -> tuple[Tensor, Tensor]:
    """The model's mean and std on the 0-255 scale, shaped ``(1, 3, 1, 1)``, on ``device``."""
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def normalise(batch: Tensor, mean: Tensor, std: Tensor, *, channels_last: bool = True) -> Tensor:
    """uint8 ``(N, 3, H, W)`` to the normalised float input on ``mean``'s device (see :func:`input_scale`)."""
    x = (batch.to(mean.device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed activation buffers to the OS after every layer.

    The no-downsample network allocates activations of tens of MB; glibc serves those with mmap
    and unmaps them on free, so every layer page-faults its buffers in again, which costs about
    half of a CPU forward pass here (see benchmarks/). Serving them from the heap and never
    trimming it keeps the pages mapped. No effect off Linux/glibc. Returns whether it applied.
    Set ``DETECTOR_KEEP_FREED_MEMORY=0`` to opt out.
    """
    global _MEMORY_KEPT
    if _MEMORY_KEPT:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DETECTOR_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _MEMORY_KEPT = ok
    return ok


def tune_process(device: torch.device) -> None:
    """Opt this process into the tunings a long scan wants: :func:`keep_freed_memory` on the CPU,
    ``cudnn.benchmark`` on CUDA.

    Both are process-wide, so the library never applies them by itself (a host application's other
    code, or training under ``use_deterministic_algorithms``, would inherit them); the command line
    calls this once, before scoring.
    """
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
