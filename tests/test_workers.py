"""Sizing threads and decode workers to the cores other programs leave free (detector.workers)."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import pytest
import torch

from detector.workers import CpuShare, free_cores, share_cpus, usable_cores


def test_free_cores_counts_what_others_take():
    assert free_cores(2, 0.0) == 2
    assert free_cores(2, 0.3) == 2  # background noise is not a taken core
    assert free_cores(2, 1.0) == 2 - 1
    assert free_cores(8, 2.6) == 5
    assert free_cores(2, 3.0) == 1  # never below one
    assert free_cores(4, -0.2) == 4


def test_share_cpus_sets_threads_and_caps_workers():
    before = torch.get_num_threads()
    try:
        share = CpuShare(cores=4, busy_elsewhere=3.0)
        assert share_cpus(share, workers=2) == (1, 1)
        assert torch.get_num_threads() == 1
        assert share_cpus(share, workers=0) == (1, 0)  # no workers asked for: none
        assert share_cpus(CpuShare(cores=4), workers=2, threads=3) == (3, 2)  # explicit threads win
    finally:
        torch.set_num_threads(before)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat (Linux)")
def test_cpu_share_sees_a_busy_process_and_not_itself():
    if usable_cores() < 2:
        pytest.skip("needs 2 cores to tell one busy core from our own")
    # Our own work inside the window does not count as others' ...
    share = CpuShare.start()
    _spin(0.4)
    assert share.stop().busy_elsewhere < 0.5
    # ... a process spinning on one core does.
    proc = mp.get_context("spawn").Process(target=_spin, args=(3.0,))
    proc.start()
    try:
        time.sleep(0.5)  # let it start
        share = CpuShare.start().stop(min_seconds=0.5)
    finally:
        proc.terminate()
        proc.join()
    assert share.busy_elsewhere >= 0.7
    assert share.free == share.cores - 1
