"""Run a function over a list of jobs in DataLoader worker processes, results in job order, and
size that work to the CPU cores that are free.

Used by ``scan`` (decode and cut crops) and ``evaluate`` (inspect, decode and perturb) so that the
network in the main process never waits on image decoding. Workers exit when their parent dies,
even by SIGKILL, instead of blocking forever on a full result pipe while holding memory.

On a machine that other programs keep busy, compute threads and decode workers sized to every
core oversubscribe it: the network's threads wait on each other at every layer while one of them
is descheduled. :class:`CpuShare` measures what the other programs use while the command starts,
and :func:`share_cpus` sizes torch's threads and the workers to the rest.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

__all__ = ["CpuShare", "die_with_parent", "free_cores", "in_workers", "share_cpus", "usable_cores"]


class _Jobs(Dataset):
    """``fn(jobs[i])`` as a map-style dataset (what DataLoader distributes over its workers)."""

    def __init__(self, fn: Callable, jobs: Sequence) -> None:
        self.fn, self.jobs = fn, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int):
        return self.fn(self.jobs[index])


def _unbatched(item):
    return item


def die_with_parent(parent: int, worker_id: int) -> None:
    """Make a worker exit when its parent dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def in_workers(
    fn: Callable, jobs: Sequence, workers: int, *, prefetch: int = 2, pin_memory: bool = False
) -> Iterator:
    """``fn(job)`` for every job, in order, computed in up to ``workers`` processes (0: in this one).

    ``fn`` and the jobs must pickle; tensors in the results travel through shared memory.
    ``prefetch`` results per worker are computed ahead.
    """
    jobs = list(jobs)
    if not jobs:
        return iter(())
    n = min(workers, len(jobs))
    return iter(DataLoader(
        _Jobs(fn, jobs), batch_size=None, shuffle=False, num_workers=n, collate_fn=_unbatched,
        prefetch_factor=prefetch if n else None, pin_memory=pin_memory, persistent_workers=False,
        worker_init_fn=partial(die_with_parent, os.getpid()) if n else None,
    ))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's or ``taskset``'s)."""
    cpus = _affinity()
    return len(cpus) if cpus else os.cpu_count() or 1


def _cpu_jiffies(cpus: set[int] | None = None) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot of the CPUs in ``cpus`` (all of them when None), from
    ``/proc/stat``'s per-CPU lines; None off Linux."""
    busy = total = 0
    seen = False
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(" ")
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if not name[3:].isdigit():
                    break
                if cpus is not None and int(name[3:]) not in cpus:
                    continue
                fields = [int(v) for v in rest.split()]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
                ticks = sum(fields[:8])  # guest time is already counted in user
                busy, total, seen = busy + ticks - idle, total + ticks, True
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if seen else None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def free_cores(cores: int, busy_elsewhere: float) -> int:
    """Cores left to this process: ``cores`` minus what other programs keep busy, at least 1.

    A plain function of the measurement (see :class:`CpuShare`); a core counts as taken when
    others use at least 0.5 of it on average.
    """
    return max(1, cores - int(math.floor(max(0.0, busy_elsewhere) + 0.5)))


@dataclass
class CpuShare:
    """How busy the machine is with other programs, measured between :meth:`start` and :meth:`stop`.

    Only the CPUs this process may run on count (its affinity mask: ``taskset``, a container's
    cpuset): what other programs do on the others takes nothing from us. Our own CPU time (all
    threads of this process) is subtracted from those CPUs' busy time over the same interval, so the command's own start-up work (importing torch) can be the
    measurement window: no extra wait. ``busy_elsewhere`` is in cores (1.0: another program keeps
    one core busy).
    """

    cores: int = 0
    busy_elsewhere: float = 0.0
    seconds: float = 0.0
    _t0: float = 0.0
    _own0: float = 0.0
    _machine0: tuple[int, int] | None = None
    _cpus: set[int] | None = None

    @classmethod
    def start(cls) -> "CpuShare":
        share = cls(cores=usable_cores())
        share._cpus = _affinity()
        share._t0, share._own0, share._machine0 = time.perf_counter(), time.process_time(), _cpu_jiffies(share._cpus)
        return share

    def stop(self, min_seconds: float = 0.2) -> "CpuShare":
        """End the window (waiting until it lasted ``min_seconds``, so that the ticks mean something)."""
        elapsed = time.perf_counter() - self._t0
        if elapsed < min_seconds:
            time.sleep(min_seconds - elapsed)
        machine1 = _cpu_jiffies(self._cpus)
        self.seconds = time.perf_counter() - self._t0
        if self._machine0 is None or machine1 is None or machine1[1] <= self._machine0[1]:
            return self
        busy, total = machine1[0] - self._machine0[0], machine1[1] - self._machine0[1]
        ncpu = len(self._cpus) if self._cpus else (os.cpu_count() or 1)
        wall_ticks = total / ncpu  # ticks per core over the window
        own_ticks = (time.process_time() - self._own0) * wall_ticks / max(self.seconds, 1e-9)
        self.busy_elsewhere = max(0.0, (busy - own_ticks) / wall_ticks)
        return self

    @property
    def free(self) -> int:
        return free_cores(self.cores, self.busy_elsewhere)


def share_cpus(share: CpuShare, workers: int, threads: int | None = None) -> tuple[int, int]:
    """Set torch's compute threads to the free cores (or ``threads``); returns (threads, workers).

    Decode workers are capped at the free cores too (at least 1 when asked for any): they mostly
    sleep once their queue is full, but each one awake on a taken core delays the network.
    """
    import torch

    n = threads or share.free
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, min(workers, max(1, share.free)) if workers else 0
