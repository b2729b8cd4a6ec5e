"""Benchmark of ``estimate_memory`` (``%estimate``), each case in a fresh process.

Goals (issue 13): the training step of a 70B Llama built on meta (``Llama.config_70b()``), AdamW,
bf16 weights, batch 1 x 4096, estimated in <= 10 s of wall time with <= 1 GB peak RSS (the whole
process: Python, torch, the fake trace), no weight allocated.

Cases:
- ``70b``: that estimate (torch imported and one meta op done first, not timed; the peak RSS is the
  process's VmHWM at the end);
- ``small``: the estimate of a training step of a small GPT (6 layers, d=512, batch 8 x 256) against
  one real AdamW step of the same model on this CPU (after a warm-up step), as a ratio;
- ``whatif-7b`` / ``whatif-70b``: ``%estimate MODEL (1,128) --dtypes long --train --device h100``
  on a 7B Llama (Hugging Face ``LlamaConfig()`` defaults, built on meta; skipped without
  transformers) and the 70B one: neither fits, so the alternatives run; printed: the wall time,
  the first trace's ops and time, and the what-ifs' traces and time, each alternative with how it
  was found (traced whole, forward and backward only with the optimizer step from the first
  trace, the optimizer's step alone, arithmetic). No goal: a report;
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

# the script's folder is on sys.path when it runs: VmRSS/VmHWM reading shared with bench_meta
from bench_meta import _rss_kib  # noqa: E402


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


def _case_whatif(size: str) -> dict:
    import torch

    import torchmagic

    with torch.device("meta"):
        torch.randn(4) + 1
        if size == "7b":
            import transformers

            model = transformers.LlamaForCausalLM(transformers.LlamaConfig())
        else:
            from torchmagic.models import Llama

            model = Llama(Llama.config_70b())
    t0 = time.perf_counter()
    est = torchmagic.estimate_memory(model, input_size=(1, 128), dtypes="long", train=True,
                                     device="h100", name="llama")
    seconds = time.perf_counter() - t0
    return {"case": f"whatif-{size}", "seconds": seconds, "ops": est.ops,
            "trace_s": est.trace_seconds, "whatif_traces": est.whatif_traces,
            "whatif_s": est.whatif_seconds, "peak_gib": est.peak_bytes / 2**30,
            "alternatives": [(a.option, a.how, a.peak_bytes / 2**30) for a in est.alternatives]}


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
    import torch
    import torch.nn as nn

    import torchmagic
    from torchmagic.models import GPT, GPTConfig, SmallCNN

    # the test list's models and references (tests/estimate_helpers.py), at larger sizes
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from estimate_helpers import CheckpointNet, ce_against_ids, mean_loss, real_cuda_peak, real_peak

    cases: dict = {
        "MLP": (lambda: nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048),
                                      nn.GELU(), nn.Linear(2048, 10)),
                ((torch.randn(128, 512),), {}), mean_loss),
        "CNN + BatchNorm": (SmallCNN, ((torch.randn(128, 3, 32, 32),), {}), mean_loss),
        "GPT (tied)": (lambda: GPT(GPTConfig(vocab_size=4000, block_size=128, n_layer=4,
                                             n_head=4, d_model=256)),
                       ((torch.randint(0, 4000, (8, 128)),), {}), ce_against_ids),
        "torch.utils.checkpoint": (lambda: CheckpointNet(256, 1024, 4),
                                   ((torch.randn(512, 256),), {}), mean_loss),
    }
    try:
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688,
                                       num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=4000,
                                       max_position_embeddings=256)
        cases["HF Llama (config)"] = (lambda: transformers.LlamaForCausalLM(cfg), (
            (), {"input_ids": torch.randint(0, 4000, (4, 128))}), ce_against_ids)
    except ImportError:
        pass

    rows = []
    for name, (make, (args, kwargs), loss_fn) in cases.items():
        torch.manual_seed(0)
        model = make()
        inputs = [*args, *([kwargs] if kwargs else [])]
        cpu_est = torchmagic.estimate_memory(model, *inputs, train=True, what_if=False,
                                             trace_device="cpu").peak_bytes
        row = {"model": name, "cpu_estimate": cpu_est,
               "cpu_real": real_peak(model, args, kwargs, True, loss_fn)["total"]}
        if torch.cuda.is_available():
            row["cuda_estimate"] = torchmagic.estimate_memory(
                model, *inputs, train=True, what_if=False, trace_device="cuda").peak_bytes
            row["cuda_real"] = real_cuda_peak(model, args, kwargs, loss_fn)
        rows.append(row)
    return {"case": "errors", "rows": rows,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _child(case: str) -> None:
    fn = {"70b": _case_70b, "small": _case_small, "errors": _case_errors,
          "whatif-7b": lambda: _case_whatif("7b"), "whatif-70b": lambda: _case_whatif("70b")}[case]
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
    for size, label in (("7b", "7B Llama (transformers LlamaConfig() defaults)"),
                        ("70b", "70B Llama (config_70b)")):
        try:
            w = _run(f"whatif-{size}")
        except SystemExit as exc:
            if size == "7b" and "No module named 'transformers'" in str(exc):
                print(f"\n{label}: skipped (no transformers)")
                continue
            raise
        print(f"\n{label}, built on meta: %estimate (1,128) --dtypes long --train --device h100 "
              f"(does not fit: the alternatives run)")
        print(f"  {w['seconds']:.2f} s wall: the step {w['ops']:,} ops, {w['trace_s']:.2f} s; "
              f"what-ifs {w['whatif_traces']} traces, {w['whatif_s']:.2f} s; "
              f"peak {w['peak_gib']:.1f} GiB")
        for option, how, gib in w["alternatives"]:
            print(f"    {option:<22} {gib:8.1f} GiB  ({how})")
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
