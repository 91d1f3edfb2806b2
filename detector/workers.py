"""Run a function over a list of jobs in DataLoader worker processes, results in job order.

Used by ``scan`` (decode and cut crops) and ``evaluate`` (inspect, decode and perturb) so that the
network in the main process never waits on image decoding. Workers exit when their parent dies,
even by SIGKILL, instead of blocking forever on a full result pipe while holding memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from functools import partial
from typing import Callable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

__all__ = ["die_with_parent", "in_workers"]


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
