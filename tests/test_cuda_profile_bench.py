"""``%%profile`` and ``%%benchmark`` on a real GPU: the profile's CUDA time columns against CUDA
events around the same kernels; ``%%benchmark`` synchronises (its median agrees with
``torch.utils.benchmark.Timer`` and CUDA events, while an unsynchronised clock would see only the
launch)."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import run
from cuda_helpers import cuda_only, cuda_seconds, figure, warm_up

pytestmark = cuda_only


@pytest.fixture(autouse=True)
def _warm():
    warm_up()


@pytest.fixture
def big(ip):
    torch.manual_seed(0)
    a = torch.randn(4096, 4096, device="cuda")  # a float32 matmul: about 2 ms on an H100-class GPU
    ip.user_ns["a"] = a
    return a


def test_profile_has_cuda_time_matching_cuda_events(ip, big, request):
    cell = "b = a @ a\nc = b @ a\nd = c @ a"
    _, shown = run(ip, "profile --rows 100 --warmup 1 -o p", cell)
    p = ip.user_ns["p"]
    assert p.cuda and p.sort == "self_device"
    assert any("self CUDA" in line for line in shown.splitlines()[:4]), shown
    mm = [r for r in p.rows if r.name in ("aten::mm", "mm")]
    assert len(mm) == 1 and mm[0].calls == 3, [(r.name, r.calls) for r in p.rows]
    a = big
    events = cuda_seconds(lambda: ((a @ a) @ a) @ a, runs=5)
    ratio = mm[0].device_total / events
    figure(request, "profile_mm_device_seconds", {"profiler": mm[0].device_total,
                                                   "cuda_events": events,
                                                   "ratio": round(ratio, 3)})
    assert 0.5 < ratio < 2.0
    assert p.self_device_total >= 0.9 * mm[0].device_total
    kernels = [r for r in p.rows if r.self_device > 0]
    assert kernels and p.rows[0].self_device == max(r.self_device for r in p.rows)


def test_benchmark_synchronises_like_torch_utils_benchmark(ip, big, request):
    from torch.utils.benchmark import Timer

    a = big
    run(ip, "benchmark -n 20 -o r", "a @ a")
    r = ip.user_ns["r"]
    timer = Timer("a @ a", globals={"a": a}).blocked_autorange(min_run_time=0.5).median
    events = cuda_seconds(lambda: a @ a, runs=20)
    launches = []
    for _ in range(10):  # what a clock without synchronisation would see: the launch alone
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        launches.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    launch = statistics.median(launches)
    figure(request, "matmul_4096_fp32_seconds", {
        "benchmark_magic": r.median, "torch_utils_benchmark": timer, "cuda_events": events,
        "launch_only": launch})
    assert "synchronises" in r.sync
    assert 0.67 < r.median / timer < 1.5
    assert 0.67 < r.median / events < 1.5
    assert launch < 0.5 * events, "the matmul is not asynchronous here: nothing to prove"
