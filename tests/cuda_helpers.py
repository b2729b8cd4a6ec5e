"""Shared by ``tests/test_cuda_*.py``: the ``cuda`` marker with its skip, figure recording, counting
CUDA synchronisations and timing with CUDA events.

Every CUDA test checks torchmagic's numbers against torch's own counters read in the test
(``torch.cuda.memory_allocated()``, ``FlopCounterMode``, ``torch.utils.benchmark``, CUDA events...),
never against torchmagic's output. What it measures on the way is recorded with :func:`figure`:
``scripts/gpu_check.sh`` collects the figures from the JUnit XML into ``figures.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

#: ``pytestmark = cuda_only`` in each CUDA test file.
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

MiB = 2**20
GiB = 2**30


def figure(request: pytest.FixtureRequest, name: str, value: Any) -> None:
    """Record a measured figure of this test (a JUnit ``figure:NAME`` property, JSON-encoded).

    Recorded before the test asserts on it, so a failing test still reports what it measured.
    """
    request.node.user_properties.append((f"figure:{name}", json.dumps(value, default=str)))


def warm_up() -> None:
    """Initialise CUDA and create cuBLAS / cuBLASLt handles and workspaces: they live in torch's
    caching allocator for good, so a test comparing ``memory_allocated()`` before and after must
    not be the first to run a matmul on this stream."""
    torch.cuda.init()
    a = torch.randn(256, 256, device="cuda")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        b = a.to(dt)
        (b @ b).sum()
        torch.nn.functional.linear(b, b, b[0])
        torch.baddbmm(b[None], b[None], b[None])
    torch.cuda.synchronize()
    del a, b
    gc.collect()


@contextlib.contextmanager
def count_syncs() -> Iterator[list[str]]:
    """The CUDA synchronisations the block makes (``torch.cuda.set_sync_debug_mode("warn")``):
    the yielded list holds one warning message per synchronising call once the block ends."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def cuda_seconds(fn: Callable[[], Any], runs: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` measured with CUDA events around each call (device time of the
    queued work, synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
