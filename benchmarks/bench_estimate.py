"""Benchmark of ``estimate_memory`` (``%estimate``), each case in a fresh process.

Goals (issue 13): the training step of a 70B Llama built on meta (``Llama.config_70b()``), AdamW,
bf16 weights, batch 1 x 4096, estimated in <= 10 s of wall time with <= 1 GB peak RSS (the whole
process: Python, torch, the fake trace), no weight allocated.

Cases:
- ``70b``: that estimate (torch imported and one meta op done first, not timed; the peak RSS is the
  process's VmHWM at the end);
- ``small``: the estimate of a training step of a small GPT (6 layers, d=512, batch 8 x 256) against
  one real AdamW step of the same model on this CPU (after a warm-up step), as a ratio;
- ``errors``: the estimate's error for each model of the test list (MLP, CNN with BatchNorm, GPT
  with tied weights, Hugging Face Llama from its config when transformers is installed, a model
  calling torch.utils.checkpoint), training step with AdamW: against torch's MemTracker measuring
  the same step on real CPU tensors, and against ``torch.cuda.max_memory_allocated()`` of the real
  step when CUDA is available.

Usage: ``python benchmarks/bench_estimate.py`` (about a minute on a laptop).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

GOAL_SECONDS = 10.0
GOAL_MB = 1024.0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _case_70b() -> dict:
    import torch

    import torchmagic
    from torchmagic.models import Llama

    with torch.device("meta"):
        torch.randn(4) + 1
        model = Llama(Llama.config_70b())
    t0, c0 = time.perf_counter(), time.process_time()
    est = torchmagic.estimate_memory(model, input_size=(1, 4096), dtypes="long", train=True,
                                     optimizer="adamw", dtype="bf16", what_if=False,
                                     name="llama70b")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(p.is_meta for p in model.parameters())
    return {"case": "70b", "seconds": seconds, "cpu_seconds": cpu,
            "peak_mb": _rss_kib("VmHWM") / 1024,
            "peak_gib": est.peak_bytes / 2**30, "phase": est.peak_phase, "op": est.peak_op,
            "ops": est.ops, "act_gib": est.activation_peak / 2**30,
            "by_kind_gib": {k: v / 2**30 for k, v in est.by_kind.items()},
            "traced_on": est.settings["traced on"]}


def _case_small() -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    import torchmagic
    from torchmagic.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8000, block_size=256, n_layer=6, n_head=8, d_model=512))
    ids = torch.randint(0, 8000, (8, 256))
    torchmagic.estimate_memory(model, ids, train=True, what_if=False)  # first fake ops: warm
    t0 = time.perf_counter()
    est = torchmagic.estimate_memory(model, ids, train=True, what_if=False, trace_device="cpu")
    estimate = time.perf_counter() - t0
    real = copy.deepcopy(model)
    opt = torch.optim.AdamW(real.parameters())

    def step() -> None:
        loss = F.cross_entropy(real(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    step()
    real_s = time.perf_counter() - t0
    return {"case": "small", "estimate_s": estimate, "real_step_s": real_s,
            "peak_mib": est.peak_bytes / 2**20, "threads": torch.get_num_threads()}


def _case_errors() -> dict:
    import copy

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.checkpoint import checkpoint

    import torchmagic
    from torchmagic.models import GPT, GPTConfig, SmallCNN

    class CheckpointNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 1024), nn.GELU(),
                                                      nn.Linear(1024, 256)) for _ in range(4))
            self.head = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = x + checkpoint(b, x, use_reentrant=False)
            return self.head(x)

    def ce(out: object, ids: torch.Tensor) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())

    def mean(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.float().mean()

    cases: dict = {
        "MLP": (lambda: nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048),
                                      nn.GELU(), nn.Linear(2048, 10)),
                ((torch.randn(128, 512),), {}), mean),
        "CNN + BatchNorm": (SmallCNN, ((torch.randn(128, 3, 32, 32),), {}), mean),
        "GPT (tied)": (lambda: GPT(GPTConfig(vocab_size=4000, block_size=128, n_layer=4,
                                             n_head=4, d_model=256)),
                       ((torch.randint(0, 4000, (8, 128)),), {}), ce),
        "torch.utils.checkpoint": (CheckpointNet, ((torch.randn(512, 256),), {}), mean),
    }
    try:
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688,
                                       num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=4000,
                                       max_position_embeddings=256)
        cases["HF Llama (config)"] = (lambda: transformers.LlamaForCausalLM(cfg), (
            (), {"input_ids": torch.randint(0, 4000, (4, 128))}), ce)
    except ImportError:
        pass

    def real_cpu(model: nn.Module, args: tuple, kwargs: dict, loss_fn) -> int:
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), foreach=True)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in m.parameters():
            p.grad = None
        mt = MemTracker()
        mt.track_external(*args, *kwargs.values())
        mt.track_external(m, opt)
        first = args[0] if args else next(iter(kwargs.values()))
        with mt:
            out = m(*args, **kwargs)
            loss = loss_fn(out, first)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, out
        return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])

    def real_cuda(model: nn.Module, args: tuple, kwargs: dict, loss_fn) -> int:
        dev = torch.device("cuda")
        m = copy.deepcopy(model).to(dev).train()
        a = tuple(t.to(dev) for t in args)
        k = {n: t.to(dev) for n, t in kwargs.items()}
        opt = torch.optim.AdamW(m.parameters(), foreach=True)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in m.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = m(*a, **k)
        loss = loss_fn(out, a[0] if a else next(iter(k.values())))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss, out
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del m, opt, a, k
        torch.cuda.empty_cache()
        return peak

    rows = []
    for name, (make, (args, kwargs), loss_fn) in cases.items():
        torch.manual_seed(0)
        model = make()
        inputs = [*args, *([kwargs] if kwargs else [])]
        cpu_est = torchmagic.estimate_memory(model, *inputs, train=True, what_if=False,
                                             trace_device="cpu").peak_bytes
        row = {"model": name, "cpu_estimate": cpu_est,
               "cpu_real": real_cpu(model, args, kwargs, loss_fn)}
        if torch.cuda.is_available():
            row["cuda_estimate"] = torchmagic.estimate_memory(
                model, *inputs, train=True, what_if=False, trace_device="cuda").peak_bytes
            row["cuda_real"] = real_cuda(model, args, kwargs, loss_fn)
        rows.append(row)
    return {"case": "errors", "rows": rows,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _child(case: str) -> None:
    fn = {"70b": _case_70b, "small": _case_small, "errors": _case_errors}[case]
    print(json.dumps(fn()))


def _run(case: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True,
                         text=True, env=dict(os.environ), check=False)
    if out.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    big = _run("70b")
    print("70B Llama (config_70b, built on meta) training step, AdamW, bf16 weights, batch 1 x 4096")
    print(f"  estimate: {big['seconds']:.2f} s wall ({big['seconds'] / GOAL_SECONDS:.2f}x the "
          f"10 s goal; {big['cpu_seconds']:.2f} s of CPU time: the wall time on an idle core), "
          f"peak RSS {big['peak_mb']:.0f} MB ({big['peak_mb'] / GOAL_MB:.2f}x the 1 GB goal); "
          f"{big['ops']:,} ops traced on {big['traced_on']}")
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in big["by_kind_gib"].items() if v >= 0.05)
    print(f"  peak {big['peak_gib']:.1f} GiB in {big['phase']} at {big['op']} ({kinds} GiB); "
          f"activations at their peak {big['act_gib']:.1f} GiB")
    small = _run("small")
    print("\nSmall GPT (6 layers, d=512, vocab 8000) training step, batch 8 x 256, AdamW, on CPU "
          f"({small['threads']} threads)")
    print(f"  estimate {small['estimate_s']:.3f} s, one real step {small['real_step_s']:.3f} s: "
          f"the estimate costs {small['estimate_s'] / small['real_step_s']:.2f}x a real step "
          f"(peak {small['peak_mib']:.1f} MiB)")
    errors = _run("errors")
    print("\nError of the estimate per model (training step, AdamW)")
    cuda = errors["device"] is not None
    head = f"  {'model':<24} {'estimate':>12} {'MemTracker real':>16} {'error':>8}"
    if cuda:
        head += f" {'est. (cuda)':>12} {'max_mem_alloc':>14} {'error':>8}"
    print(head)
    for r in errors["rows"]:
        line = (f"  {r['model']:<24} {r['cpu_estimate'] / 2**20:10.1f} M "
                f"{r['cpu_real'] / 2**20:14.1f} M "
                f"{100 * (r['cpu_estimate'] - r['cpu_real']) / r['cpu_real']:+7.2f}%")
        if cuda:
            line += (f" {r['cuda_estimate'] / 2**20:10.1f} M {r['cuda_real'] / 2**20:12.1f} M "
                     f"{100 * (r['cuda_estimate'] - r['cuda_real']) / r['cuda_real']:+7.2f}%")
        print(line)
    if cuda:
        print(f"  (CUDA: {errors['device']})")
    ok = big["seconds"] <= GOAL_SECONDS and big["peak_mb"] <= GOAL_MB
    print("goals met" if ok else "GOALS MISSED")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
