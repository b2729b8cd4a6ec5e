"""torchmagic.estimate_memory: the peak of a training step or an inference on fake tensors.

Every number is checked against a reference computed here: torch's own ``MemTracker`` measuring
the same step on *real* tensors (a real warm-up step first, so the optimizer state exists as in any
step after the first), parameter counts, or arithmetic on them; never against our own output.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from estimate_helpers import (
    CheckpointNet,
    ce_against_ids,
    free_reference_cycles,
    mean_loss,
    mlp,
    real_peak,
)
from statecheck import Snapshot
from torch.utils.checkpoint import checkpoint

import torchmagic
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.estimate import fold_activations
from torchmagic.core.estimate_devices import GiB, MiB, find_accelerator, parse_bytes
from torchmagic.core.estimate_trace import KINDS
from torchmagic.models import GPT, GPTConfig, Llama, SmallCNN


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Leave no tensor of this file alive for later tests (``%gpumem --top`` counts them)."""
    yield
    free_reference_cycles()


# ---------------------------------------------------------------------------------------------
# models of the test list and the reference
# ---------------------------------------------------------------------------------------------
def hf_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg)


# name -> (model factory, inputs factory, how "auto" makes the loss: loss(out, first input))
CASES = {
    "mlp": (mlp, lambda: ((torch.randn(16, 32),), {}), mean_loss),
    "cnn_batchnorm": (SmallCNN, lambda: ((torch.randn(8, 3, 32, 32),), {}), mean_loss),
    "gpt_tied": (lambda: GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4,
                                       d_model=64)),
                 lambda: ((torch.randint(0, 300, (4, 64)),), {}), ce_against_ids),
    "hf_llama": (hf_llama, lambda: ((), {"input_ids": torch.randint(0, 500, (2, 32))}),
                 ce_against_ids),
    "torch_checkpoint": (CheckpointNet, lambda: ((torch.randn(16, 64),), {}), mean_loss),
}


def assert_within_1pct(est: torchmagic.MemoryEstimate, ref: dict[str, int]) -> None:
    for kind in KINDS:
        got, want = est.by_kind[kind], ref[kind]
        assert abs(got - want) <= 0.01 * want, f"{kind}: estimate {got:,} vs real {want:,}"
    assert abs(est.peak_bytes - ref["total"]) <= 0.01 * ref["total"]
    assert sum(est.by_kind.values()) == est.peak_bytes


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", list(CASES))
def test_fake_estimate_equals_memtracker_on_real_tensors(case: str, train: bool) -> None:
    make, inputs, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = make()
    args, kwargs = inputs()
    est = torchmagic.estimate_memory(model, *args, *([kwargs] if kwargs else []), train=train,
                                     trace_device="cpu")
    ref = real_peak(model, args, kwargs, train, loss_fn)
    assert_within_1pct(est, ref)
    # parameters at the peak: exactly the model's parameter bytes (tied weights once)
    unique = {id(p): p for p in model.parameters()}.values()
    assert est.by_kind["parameters"] == sum(p.numel() * p.element_size() for p in unique)
    if train:
        assert est.peak_phase in ("forward", "loss", "backward", "optimizer step")
        assert est.by_kind["optimizer_state"] > 0


@pytest.mark.slow
def test_options_match_real_steps() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 100, (4, 32))
    # bf16 weights: the reference is the model cast to bf16
    est = torchmagic.estimate_memory(gpt, ids, train=True, dtype="bf16", trace_device="cpu")
    assert_within_1pct(est, real_peak(copy.deepcopy(gpt).to(torch.bfloat16), (ids,), {}, True,
                                      ce_against_ids))
    # autocast
    est = torchmagic.estimate_memory(gpt, ids, train=True, amp="bf16", trace_device="cpu")
    assert_within_1pct(est, real_peak(gpt, (ids,), {}, True, ce_against_ids,
                                      amp=torch.bfloat16))
    # another optimizer
    est = torchmagic.estimate_memory(gpt, ids, train=True, optimizer="sgd-momentum",
                                     trace_device="cpu")
    assert_within_1pct(est, real_peak(gpt, (ids,), {}, True, ce_against_ids, optimizer=lambda ps:
                                      torch.optim.SGD(ps, momentum=0.9, foreach=True)))
    # a batch of 8 instead of 4
    est = torchmagic.estimate_memory(gpt, ids, train=True, batch=8, trace_device="cpu")
    ids8 = torch.randint(0, 100, (8, 32))
    assert_within_1pct(est, real_peak(gpt, (ids8,), {}, True, ce_against_ids))
    assert est.batch == 8
    # activation checkpointing of each block: the reference wraps the blocks itself
    est = torchmagic.estimate_memory(gpt, ids, train=True, checkpointing=True,
                                     trace_device="cpu")

    def wrap(model: nn.Module) -> None:
        for block in model.blocks:
            block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(
                block.forward)

    assert_within_1pct(est, real_peak(gpt, (ids,), {}, True, ce_against_ids, prepare=wrap))
    plain = torchmagic.estimate_memory(gpt, ids, train=True, trace_device="cpu")
    assert est.by_kind["activations"] < plain.by_kind["activations"]


def test_shape_inputs_and_loss_choices() -> None:
    gpt = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=1, n_head=4, d_model=64))
    a = torchmagic.estimate_memory(gpt, input_size=(4, 64), dtypes="long", train=True)
    b = torchmagic.estimate_memory(gpt, torch.zeros(4, 64, dtype=torch.long), train=True)
    assert a.peak_bytes == b.peak_bytes and "cross-entropy" in a.settings["loss"]
    mean = torchmagic.estimate_memory(gpt, input_size=(4, 64), dtypes="long", train=True,
                                      loss="mean", trace_device="cpu")
    assert "mean" in mean.settings["loss"]
    ref = real_peak(gpt, (torch.zeros(4, 64, dtype=torch.long),), {}, True, mean_loss)
    assert_within_1pct(mean, ref)
    custom = torchmagic.estimate_memory(gpt, input_size=(4, 64), dtypes="long", train=True,
                                        loss=lambda out: out.float().mean())
    assert custom.peak_bytes == mean.peak_bytes


def test_hf_model_own_loss_with_labels() -> None:
    model = hf_llama()
    ids = torch.randint(0, 500, (2, 32))
    est = torchmagic.estimate_memory(model, {"input_ids": ids, "labels": ids}, train=True,
                                     trace_device="cpu")
    assert est.settings["loss"].startswith("the model's own loss")
    ref = real_peak(model, (), {"input_ids": ids, "labels": ids}, True,
                    lambda out, _: out.loss)
    assert_within_1pct(est, ref)


# ---------------------------------------------------------------------------------------------
# optimizer state vs the step's temporaries: analytic figures
# ---------------------------------------------------------------------------------------------
def wide_mlp() -> nn.Module:
    """32 MiB of float32 parameters, a batch of 4: the optimizer step holds the peak."""
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))


def _step_samples(est: torchmagic.MemoryEstimate) -> list[int]:
    assert len(est.timeline) == est.ops   # few ops: the timeline keeps every sample
    return [i for i, p in enumerate(est.timeline_phase) if p == "optimizer step"]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_adam_state_is_its_moments_and_step_the_sqrt_a_temporary(cls: type, foreach: bool
                                                                  ) -> None:
    model = wide_mlp()
    params = list(model.parameters())
    size = [p.numel() * p.element_size() for p in params]
    P = sum(size)
    est = torchmagic.estimate_memory(model, torch.randn(4, 1024), train=True,
                                     optimizer=lambda ps: cls(ps, foreach=foreach),
                                     trace_device="cpu")
    assert est.peak_phase == "optimizer step"
    # exp_avg and exp_avg_sq of every parameter, and one float32 step count per parameter
    state = 2 * P + 4 * len(params)
    assert est.by_kind["optimizer_state"] == state
    assert est.by_kind["parameters"] == P and est.by_kind["gradients"] == P
    if foreach:
        # torch._foreach_sqrt(exp_avg_sqs): one new tensor per parameter, P bytes in all
        assert est.peak_op == "aten._foreach_sqrt" and est.by_kind["temporaries"] == P
    else:
        # per parameter: exp_avg_sq.sqrt() and its quotient by the bias correction live together,
        # and the previous parameter's denominator is still referenced
        want = max(2 * size[i] + (size[i - 1] if i else 0) for i in range(len(size)))
        assert est.peak_op == "aten.div" and est.by_kind["temporaries"] == want
    # the state is there (as in any step after the first) at every moment of the step
    kinds = est.timeline_kinds
    assert {kinds["optimizer_state"][i] for i in _step_samples(est)} == {state}
    assert min(kinds["optimizer_state"]) == state
    # totals unchanged: MemTracker's own peak of the same real step (after a warm-up step)
    ref = real_peak(model, (torch.randn(4, 1024),), {}, True, mean_loss,
                    optimizer=lambda ps: cls(ps, foreach=foreach))
    assert est.peak_bytes == ref["total"]
    assert est.by_kind == {k: ref[k] for k in KINDS}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_sgd_momentum_state_is_its_buffers(foreach: bool) -> None:
    model = wide_mlp()
    P = sum(p.numel() * p.element_size() for p in model.parameters())
    est = torchmagic.estimate_memory(model, torch.randn(4, 1024), train=True,
                                     optimizer=lambda ps: torch.optim.SGD(
                                         ps, lr=0.1, momentum=0.9, foreach=foreach),
                                     trace_device="cpu")
    # one momentum buffer per parameter, from the start; its step updates in place
    assert est.by_kind["optimizer_state"] == P
    assert set(est.timeline_kinds["optimizer_state"]) == {P}
    assert {est.timeline_kinds["temporaries"][i] for i in _step_samples(est)} == {0}
    ref = real_peak(model, (torch.randn(4, 1024),), {}, True, mean_loss,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                         foreach=foreach))
    assert est.peak_bytes == ref["total"]
    assert est.by_kind == {k: ref[k] for k in KINDS}


# ---------------------------------------------------------------------------------------------
# big models: nothing allocated
# ---------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_70b_llama_on_meta_inference_without_allocating() -> None:
    with torch.device("meta"):
        big = Llama(Llama.config_70b())
    n = sum(p.numel() for p in big.parameters())
    before = _rss()
    est = torchmagic.estimate_memory(big, input_size=(1, 128), dtypes="long", dtype="bf16",
                                     device="H100")
    assert est.by_kind["parameters"] == 2 * n
    assert est.params == n
    # a forward keeps at most a few layers' activations (each (1, 128, 28672) bf16 = 7 MiB)
    assert 0 < est.by_kind["activations"] < 64 * MiB
    assert est.verdict is not None and not est.verdict.fits   # 128.5 GiB of bf16 weights
    assert est.verdict.capacity.reserve_source.startswith("left for")
    if os.path.exists("/proc/self/status"):
        assert _rss() - before < 1 * GiB
    assert all(p.is_meta for p in big.parameters())


# ---------------------------------------------------------------------------------------------
# verdict, devices, sizes
# ---------------------------------------------------------------------------------------------
def test_parse_bytes_units() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    assert parse_bytes(1000) == 1000
    for bad in ("lots", "-1GB", "80 parsecs", True, -5):
        with pytest.raises(TorchMagicError, match="size like"if bad != -5 else "negative"):
            parse_bytes(bad)


def test_accelerator_names() -> None:
    assert find_accelerator("H100").name == "NVIDIA H100 80GB"
    assert find_accelerator("a100-80gb").name == "NVIDIA A100 80GB"
    assert find_accelerator("A100 40GB").name == "NVIDIA A100 40GB"
    assert find_accelerator("RTX 4090").name == "NVIDIA RTX 4090"
    assert find_accelerator("tpu") is None
    for acc in torchmagic.core.estimate_devices.ACCELERATORS:
        assert "datasheet" in acc.source or "specifications" in acc.source


# torch.cuda.get_device_properties(i).total_memory (MiB) as published from real machines (torch's
# printout of _CudaDeviceProperties, or CUDA's deviceQuery: the same cudaDeviceProp) and the
# datasheet's memory of one device (GB) it must stay under
TORCH_SEES = {
    "t4": (15102, 16), "l4": (22518, 24), "a10g": (22587, 24), "l40s": (45589, 48),
    "rtx4090": (24563, 24), "rtx3090": (24238, 24), "v100": (16144, 16),
    "v100-32gb": (32494, 32), "a100": (40339, 40), "a100-80gb": (81049, 80),
    "h100": (81089, 80), "h200": (143156, 141), "mi300x": (196592, 192),
    "mi250x": (65520, 64),   # one GCD: PyTorch sees each of the MI250X's two dies as a device
}


@pytest.mark.parametrize("name", list(TORCH_SEES))
def test_each_accelerator_is_one_pytorch_device(name: str) -> None:
    acc = find_accelerator(name)
    assert acc is not None
    seen, datasheet_gb = TORCH_SEES[name]
    assert acc.memory == seen * MiB
    # what PyTorch sees of one device is never more than the datasheet's memory of one device
    # (the driver keeps some; ECC takes its share on GDDR); a datasheet's GB of GPU memory are
    # binary (the chips come in powers of two): 80 GB HBM3 is 81,920 MiB as nvidia-smi counts
    assert acc.memory <= datasheet_gb * GiB
    assert f"{seen:,} MiB" in acc.source


def test_mi250x_verdict_is_for_one_die() -> None:
    """A step needing 70 GiB does not fit on one MI250X device (a 64 GB die), but does on an
    MI300X; the table verdict says so."""
    from torchmagic.core.estimate_devices import fits_table

    verdicts = {v.capacity.name: v for v in fits_table(70 * GiB, reserve=GiB)}
    mi250x = next(v for name, v in verdicts.items() if "MI250X" in name)
    assert "GCD" in mi250x.capacity.name and not mi250x.fits
    assert mi250x.margin == 70 * GiB - (65520 * MiB - GiB)
    assert verdicts["AMD MI300X"].fits


def test_verdict_against_memory_and_reserve() -> None:
    model = mlp()
    x = torch.randn(16, 32)
    est = torchmagic.estimate_memory(model, x, train=True, memory="10MiB", reserve="1MiB")
    usable = 10 * MiB - 1 * MiB
    assert est.verdict is not None and est.fits is (est.peak_bytes <= usable)
    assert est.verdict.margin == abs(usable - est.peak_bytes)
    small = torchmagic.estimate_memory(model, x, train=True, memory=est.peak_bytes, reserve=0,
                                       what_if=False)
    assert small.fits and small.verdict.margin == 0
    tight = torchmagic.estimate_memory(model, x, train=True, memory=est.peak_bytes - 1,
                                       reserve=0, what_if=False)
    assert not tight.fits and tight.verdict.margin == 1
    assert tight.alternatives == []


def test_default_reserve_scales_with_a_given_memory() -> None:
    """Without reserve=, a given memory keeps the smaller of 1 GiB and an eighth of it: 1 GiB of
    memory is not eaten by a reserve meant for a big GPU's CUDA context."""
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    x = torch.randn(64, 1024)
    ref = real_peak(model, (x,), {}, True, mean_loss,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True))["total"]
    est = torchmagic.estimate_memory(model, x, train=True, optimizer="sgd", memory="1GiB",
                                     trace_device="cpu")
    cap = est.verdict.capacity
    assert cap.total == GiB and cap.reserve == GiB // 8 and cap.usable == GiB - GiB // 8
    assert "eighth" in cap.reserve_source
    assert est.fits and est.verdict.margin == GiB - GiB // 8 - ref
    assert est.alternatives == [] and not any("sharding" in n for n in est.notes)
    # a big memory keeps the full 1 GiB; a device keeps 1 GiB; reserve= is taken as given
    big = torchmagic.estimate_memory(model, x, memory="64GiB", what_if=False)
    assert big.verdict.capacity.reserve == GiB
    t4 = torchmagic.estimate_memory(model, x, device="t4", what_if=False)
    assert t4.verdict.capacity.reserve == GiB and "CUDA context" in t4.verdict.capacity.reserve_source
    given = torchmagic.estimate_memory(model, x, memory="1GiB", reserve="300MiB", what_if=False)
    assert given.verdict.capacity.reserve == 300 * MiB
    assert given.verdict.capacity.reserve_source == "as given"


@pytest.mark.parametrize("kwargs, expected", [
    ({"memory": "1GiB", "reserve": "1GiB"}, "reserve=1GiB leaves nothing of memory=1GiB"),
    ({"memory": "1GiB", "reserve": "2GiB"}, "reserve=2GiB leaves nothing of memory=1GiB"),
    ({"memory": 1000, "reserve": 1000}, "reserve=1,000 leaves nothing of memory=1,000"),
    ({"device": "t4", "reserve": "20GiB"}, "reserve=20GiB leaves nothing of NVIDIA T4's 15,102 MiB"),
])
def test_reserve_that_leaves_nothing_is_refused(kwargs: dict, expected: str) -> None:
    with pytest.raises(TorchMagicError) as info:
        torchmagic.estimate_memory(mlp(), torch.randn(4, 32), **kwargs)
    msg = str(info.value)
    assert msg.startswith(expected) and "give a smaller reserve" in msg and "\n" not in msg
    # one byte less is allowed: one byte usable
    if "memory" in kwargs and kwargs["memory"] == 1000:
        est = torchmagic.estimate_memory(mlp(), torch.randn(4, 32), memory=1000, reserve=999,
                                         what_if=False)
        assert est.verdict.capacity.usable == 1


def test_sharding_note_says_what_does_not_shard() -> None:
    """No sharding row: a note only when the step does not fit, with the figures that explain it:
    the whole model (no repeated blocks) gathered with its gradients is more than the usable."""
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    x = torch.randn(64, 1024)
    P = sum(p.numel() * 4 for p in model.parameters())
    base = torchmagic.estimate_memory(model, x, train=True, optimizer="sgd", what_if=False,
                                      trace_device="cpu")
    # fits as it is (what_if forced): nothing to explain, though no number of GPUs fits either
    fits = torchmagic.estimate_memory(model, x, train=True, optimizer="sgd", what_if=True,
                                      memory=base.peak_bytes, reserve=0, trace_device="cpu")
    assert fits.fits and not any(a.option.startswith("fully_shard") for a in fits.alternatives)
    assert not any("sharding" in n for n in fits.notes)
    # does not fit: the gathered model and its gradients (2 P) alone exceed the usable memory
    tight = torchmagic.estimate_memory(model, x, train=True, optimizer="sgd",
                                       memory=2 * P - 1, reserve=0, trace_device="cpu")
    assert not tight.fits
    note = next(n for n in tight.notes if n.startswith("sharding over up to 1024 GPUs"))
    assert "the whole model (no repeated blocks to wrap) all-gathered with its gradients " \
           "(64.0 MiB)" in note and "activations of one GPU's batch alone" not in note
    # nothing usable (a reserve as large as the memory, refused above) or no capacity: no note
    from torchmagic.core.estimate_setup import optimizer_spec
    from torchmagic.core.estimate_trace import StepSpec, trace_step
    from torchmagic.core.estimate_whatif import sharding_note

    trace = trace_step(model, (x,), {}, StepSpec(train=True, optimizer=optimizer_spec("sgd")))
    assert sharding_note(trace, model, None, True, 0, False) is None
    assert sharding_note(trace, model, None, True, None, None) is None
    assert sharding_note(trace, model, None, True, 2 * P - 1, False) == note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA table")
def test_without_a_device_every_accelerator_gets_a_verdict() -> None:
    est = torchmagic.estimate_memory(mlp(), torch.randn(4, 32))
    assert est.verdict is None and est.fits is None
    names = [v.capacity.name for v in est.fits_on]
    assert "NVIDIA T4" in names and "AMD MI300X" in names
    assert all(v.fits for v in est.fits_on)
    totals = [v.capacity.total for v in est.fits_on]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.slow
def test_alternatives_are_each_traced() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 100, (8, 32))
    base = torchmagic.estimate_memory(gpt, ids, train=True, memory=1, reserve=0)
    assert not base.fits
    alts = {a.option: a for a in base.alternatives}
    assert set(alts) == {"--dtype bf16", "--amp bf16", "--checkpointing", "--optimizer sgd",
                         "--batch 4"}   # no number of GPUs fits in 1 byte: no sharding row
    assert all(a.traced and a.fits is False for a in alts.values())
    # only what a change alters is traced again; each equals the whole step traced with it
    assert {o: a.how for o, a in alts.items()} == {
        "--dtype bf16": "traced", "--amp bf16": "step from base",
        "--checkpointing": "step from base", "--optimizer sgd": "optimizer swapped",
        "--batch 4": "step from base"}
    for option, kwargs in (("--checkpointing", {"checkpointing": True}),
                           ("--batch 4", {"batch": 4}), ("--amp bf16", {"amp": "bf16"}),
                           ("--dtype bf16", {"dtype": "bf16"})):
        alone = torchmagic.estimate_memory(gpt, ids, train=True, what_if=False, **kwargs)
        assert alts[option].peak_bytes == alone.peak_bytes, option
    # SGD without momentum keeps no state, bf16 halves the parameters
    sgd = torchmagic.estimate_memory(gpt, ids, train=True, optimizer="sgd")
    assert sgd.by_kind["optimizer_state"] == 0 and alts["--optimizer sgd"].peak_bytes == \
        sgd.peak_bytes
    assert alts["--dtype bf16"].peak_bytes < base.peak_bytes


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum", "adagrad"])
def test_derived_alternatives_equal_whole_traces(optimizer: str) -> None:
    """The wide MLP's peak is in the optimizer step with AdamW and Adagrad (their sqrt
    temporaries), in backward with SGD's in-place momentum: the alternatives that keep the step
    take it from the first trace, SGD's step is traced alone; each equals the whole step traced
    with the change."""
    model = wide_mlp()
    x = torch.randn(4, 1024)
    base = torchmagic.estimate_memory(model, x, train=True, optimizer=optimizer, memory=1,
                                      reserve=0, trace_device="cpu")
    assert base.peak_phase == ("backward" if optimizer == "sgd-momentum" else "optimizer step")
    alts = {a.option: a for a in base.alternatives}
    assert alts["--amp bf16"].how == "step from base" and alts["--batch 2"].how == \
        "step from base" and alts["--optimizer sgd"].how == "optimizer swapped"
    for option, kwargs in (("--amp bf16", {"amp": "bf16"}), ("--batch 2", {"batch": 2}),
                           ("--optimizer sgd", {"optimizer": "sgd"})):
        alone = torchmagic.estimate_memory(model, x, train=True, what_if=False,
                                           trace_device="cpu",
                                           **{"optimizer": optimizer, **kwargs})
        assert alts[option].peak_bytes == alone.peak_bytes, option
    assert base.whatif_traces == 4 and base.whatif_seconds > 0


def test_step_traced_alone_analytic() -> None:
    """AdamW's step alone on the wide MLP's parameters: state exp_avg + exp_avg_sq + a float32
    step count per parameter, and the sqrt of exp_avg_sq (P bytes) above the level before it."""
    from torchmagic.core.estimate_setup import optimizer_spec
    from torchmagic.core.estimate_trace import StepSpec, trace_optimizer_step
    from torchmagic.core.estimate_whatif import optimizer_cost

    model = wide_mlp()
    params = list(model.parameters())
    P = sum(p.numel() * 4 for p in params)
    spec = StepSpec(train=True, optimizer=optimizer_spec("adamw"), foreach=True)
    cost = optimizer_cost(trace_optimizer_step(model, spec))
    assert cost.state == 2 * P + 4 * len(params) and cost.excess == P
    sgd = optimizer_cost(trace_optimizer_step(model, StepSpec(
        train=True, optimizer=optimizer_spec("sgd"), foreach=True)))
    assert sgd.state == 0 and sgd.excess == 0   # in place: params -= lr * grads


def test_sharding_arithmetic() -> None:
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(8, 256)
    est = torchmagic.estimate_memory(model, x, what_if=True)   # inference: params are constant
    shard = [a for a in est.alternatives if not a.traced]
    assert len(shard) == 1 and "8 GPUs" in shard[0].change
    params = sum(p.numel() * 4 for p in model.parameters())
    block = sum(p.numel() * 4 for p in model[0].parameters())
    act_peak = est.peak_bytes - params   # params are the only model state in inference
    assert shard[0].peak_bytes == math.ceil(params / 8) + act_peak + block
    # with a capacity: the fewest GPUs that make it fit
    need = torchmagic.estimate_memory(model, x, memory=est.peak_bytes - 1, reserve=0)
    shard = [a for a in need.alternatives if not a.traced][0]
    assert shard.change == "FSDP / ZeRO-3 over 2 GPUs"
    assert shard.peak_bytes == math.ceil(params / 2) + act_peak + block


def test_sharding_divides_the_optimizer_steps_temporaries() -> None:
    """Adam's step at its peak (32 small layers, batch 4): parameters, gradients, exp_avg and
    exp_avg_sq, step counts and the sqrt of exp_avg_sq (made from the sharded state) / N; the
    output (4 x 512 float32), the loss and the input stay; one layer is gathered with its
    gradients."""
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(32)])
    params = list(model.parameters())
    P = sum(p.numel() * 4 for p in params)
    est = torchmagic.estimate_memory(model, torch.randn(4, 512), train=True, what_if=True,
                                     trace_device="cpu")
    assert est.peak_op == "aten._foreach_sqrt"
    shard = [a for a in est.alternatives if not a.traced]
    assert len(shard) == 1 and "8 GPUs" in shard[0].change
    states = P + P + (2 * P + 4 * len(params)) + P
    block = (512 * 512 + 512) * 4
    assert shard[0].peak_bytes == math.ceil(states / 8) + (4 * 512 * 4 + 4) + 4 * 512 * 4 + \
        2 * block


def test_max_batch_by_bisection_matches_real_peaks() -> None:
    model = mlp()
    x = torch.randn(4, 32)
    one = real_peak(model, (torch.randn(1, 32),), {}, True, mean_loss)["total"]
    ten = real_peak(model, (torch.randn(10, 32),), {}, True, mean_loss)["total"]
    usable = one + (ten - one) * 3   # about batch 28
    est = torchmagic.estimate_memory(model, x, train=True, memory=usable, reserve=0,
                                     max_batch=True, what_if=False, trace_device="cpu")
    b = est.max_batch
    assert b and b > 4
    at_b = real_peak(model, (torch.randn(b, 32),), {}, True, mean_loss)["total"]
    above = real_peak(model, (torch.randn(b + 1, 32),), {}, True, mean_loss)["total"]
    assert at_b <= usable < above
    assert len(est.batch_trials) <= 8
    # nothing fits: 0
    est = torchmagic.estimate_memory(model, x, train=True, memory=one - 1, reserve=0,
                                     max_batch=True, what_if=False, trace_device="cpu")
    assert est.max_batch == 0


def test_fold_activations() -> None:
    acts = {"m.layers.0.mlp": 10, "m.layers.0.attn": 5, "m.layers.1.mlp": 10,
            "m.layers.1.attn": 5, "m.layers.2.mlp": 10, "m.layers.2.attn": 6, "m.head": 40,
            "(outside modules)": 3}
    rows, detail, block, block_bytes = fold_activations(acts, "m.layers", 10)
    assert [(r.module, r.bytes, r.count) for r in rows] == [
        ("m.head", 40, 1), ("m.layers.0-1", 15, 2), ("m.layers.2", 16, 1),
        ("(outside modules)", 3, 1)]
    assert block == "m.layers.2" and block_bytes == 16 and [(r.module, r.bytes) for r in detail] == [("mlp", 10),
                                                                               ("attn", 6)]
    rows, detail, _, _ = fold_activations(acts, None, 2)
    assert [r.module for r in rows] == ["m.head", "m.layers.0.mlp"] and detail == []


def test_top_activations_name_the_blocks() -> None:
    gpt = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=4, n_head=4, d_model=64))
    est = torchmagic.estimate_memory(gpt, input_size=(4, 64), dtypes="long", train=True,
                                     name="gpt")
    assert est.top_activations[0].module == "gpt.blocks.0-3"
    assert est.top_activations[0].count == 4
    assert est.block.startswith("gpt.blocks.")
    assert {r.module for r in est.block_activations} >= {"mlp.fc", "attn.qkv"}
    assert sum(r.total for r in est.top_activations) <= est.activation_peak


# ---------------------------------------------------------------------------------------------
# the user's state
# ---------------------------------------------------------------------------------------------
def stateful_model() -> nn.Module:
    torch.manual_seed(0)
    m = SmallCNN()
    m.features[1].eval()                      # a frozen BatchNorm inside a train model
    m.head[1].weight.requires_grad_(False)
    m(torch.randn(2, 3, 32, 32)).sum().backward()   # grads present
    m.calls = []
    m.register_forward_hook(lambda mod, i, o: mod.calls.append(1))
    return m


@pytest.mark.parametrize("train", [False, True])
def test_state_unchanged_on_success(train: bool) -> None:
    m = stateful_model()
    x = torch.randn(4, 3, 32, 32)
    snap = Snapshot.take(m, x=x)
    rng = torch.get_rng_state()
    torchmagic.estimate_memory(m, x, train=train, checkpointing=False, dtype="bf16",
                               amp="bf16" if train else None, what_if=True, memory="1MiB")
    snap.assert_unchanged()
    assert m.calls == []   # the hook ran on the twin only: its own list
    assert torch.equal(rng, torch.get_rng_state())


def test_state_unchanged_on_failing_forward_and_model_released() -> None:
    m = stateful_model()
    bad = torch.randn(4, 3, 16)
    snap = Snapshot.take(m, x=bad)
    with pytest.raises(ForwardError) as info:
        torchmagic.estimate_memory(m, bad, train=True)
    msg = str(info.value)
    assert "features.0 (Conv2d" in msg and "(4, 3, 16)" in msg
    snap.assert_unchanged()

    def failing(model: nn.Module) -> None:
        with pytest.raises(ForwardError):
            torchmagic.estimate_memory(model, torch.randn(2, 5, 32, 32), train=True)

    from statecheck import assert_released

    assert_released(SmallCNN, failing)
    assert_released(SmallCNN, lambda model: torchmagic.estimate_memory(
        model, torch.randn(2, 3, 32, 32), train=True))


class Interrupting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def test_state_unchanged_on_keyboard_interrupt() -> None:
    m = Interrupting()
    x = torch.randn(2, 4)
    snap = Snapshot.take(m, x=x)
    with pytest.raises(KeyboardInterrupt):
        torchmagic.estimate_memory(m, x, train=True)
    snap.assert_unchanged()

    def interrupted(model: nn.Module) -> None:
        try:
            torchmagic.estimate_memory(model, torch.randn(2, 4), train=True)
        except KeyboardInterrupt:
            return None
        raise AssertionError("no KeyboardInterrupt")

    from statecheck import assert_released

    assert_released(Interrupting, interrupted)


# ---------------------------------------------------------------------------------------------
# bad input: one clear line
# ---------------------------------------------------------------------------------------------
class ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * 2 if y.sum().item() > 0 else y


@pytest.mark.parametrize("kwargs, expected", [
    ({"train": True}, "give the model's inputs"),
    ({"args": (torch.randn(2, 32),), "train": True, "optimizer": "adamz"},
     "unknown optimizer 'adamz'"),
    ({"args": (torch.randn(2, 32),), "train": True, "optimizer": "lbfgs"}, "closure"),
    ({"args": (torch.randn(2, 32),), "train": True, "optimizer": "adafactor"},
     "reads values in its step"),
    ({"args": (torch.tensor(3.0),), "max_batch": True, "memory": "1GiB"},
     "batch search needs inputs with a batch dimension"),
    ({"args": (torch.randn(2, 32),), "max_batch": True}, "needs a memory to fit in"),
    ({"args": (torch.randn(2, 32),), "device": "tpu-v9"}, "unknown accelerator 'tpu-v9'"),
    ({"args": (torch.randn(2, 32),), "memory": "lots"}, "size like 80GiB"),
    ({"args": (torch.randn(2, 32),), "checkpointing": True}, "add train=True"),
    ({"args": (torch.randn(2, 32),), "train": True, "checkpointing": True},
     "has none"),
    ({"args": (torch.randn(2, 32),), "amp": "fp32"}, "amp must be one of"),
    ({"args": (torch.randn(2, 32),), "dtype": "int8"}, "dtype must be one of"),
    ({"args": (torch.randn(2, 32),), "loss": "hinge"}, "loss must be one of"),
    ({"args": (torch.randn(2, 32),), "batch": 0}, "batch must be a whole number"),
    ({"args": (torch.randn(2, 32),), "top": -1}, "top must be"),
    ({"args": (torch.randn(2, 32),), "trace_device": "mps"}, "trace_device must be cpu or cuda"),
    *([] if torch.cuda.is_available() else [
        ({"args": (torch.randn(2, 32),), "trace_device": "cuda"}, "needs CUDA here")]),
])
def test_bad_input_one_line(kwargs: dict, expected: str) -> None:
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 2))
    args = kwargs.pop("args", ())
    with pytest.raises(TorchMagicError) as info:
        torchmagic.estimate_memory(model, *args, **kwargs)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_model_errors_one_line() -> None:
    with pytest.raises(TorchMagicError, match="must be a torch.nn.Module"):
        torchmagic.estimate_memory(torch.randn(3), torch.randn(3))
    with pytest.raises(TorchMagicError, match="lazy modules"):
        torchmagic.estimate_memory(nn.LazyLinear(4), torch.randn(2, 3))
    with pytest.raises(ForwardError) as info:
        torchmagic.estimate_memory(ReadsValues(), torch.randn(2, 4))
    assert "reads tensor values" in str(info.value) and "\n" not in str(info.value)
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(TorchMagicError, match="no trainable parameters"):
        torchmagic.estimate_memory(frozen, torch.randn(2, 4), train=True)


def test_result_to_dict_and_public_api() -> None:
    est = torchmagic.estimate_memory(mlp(), torch.randn(4, 32), train=True, memory="2GiB")
    d = est.to_dict()
    json.dumps(d)
    assert d["peak_bytes"] == est.peak_bytes and set(d["by_kind"]) == set(KINDS)
    assert d["verdict"]["fits"] is True
    assert torchmagic.MemoryEstimate is type(est)
    assert "estimate_memory" in dir(torchmagic)


# ---------------------------------------------------------------------------------------------
# %summary --memory (issue 13's touch of core/summary.py)
# ---------------------------------------------------------------------------------------------
def test_summary_memory_option() -> None:
    gpt = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=1, n_head=2, d_model=32))
    s = torchmagic.summary(gpt, input_size=(2, 16), dtypes="long", memory=True)
    inf = torchmagic.estimate_memory(gpt, input_size=(2, 16), dtypes="long")
    tr = torchmagic.estimate_memory(gpt, input_size=(2, 16), dtypes="long", train=True)
    assert s.inference_peak_bytes == inf.peak_bytes and s.training_peak_bytes == tr.peak_bytes
    assert any(n.startswith("peak memory (estimated on fake tensors") for n in s.notes)
    plain = torchmagic.summary(gpt, input_size=(2, 16), dtypes="long")
    assert plain.inference_peak_bytes is None and not any("peak memory" in n for n in plain.notes)
    with pytest.raises(TorchMagicError, match="needs the model's inputs"):
        torchmagic.summary(gpt, memory=True)


def test_summary_memory_magic(ip) -> None:
    from conftest import run

    ip.user_ns["gpt"] = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=1, n_head=2,
                                      d_model=32))
    _, shown = run(ip, "summary gpt (2,16) --dtypes long --depth 1 --memory -o s")
    assert "peak memory (estimated on fake tensors" in shown
    assert ip.user_ns["s"].training_peak_bytes > ip.user_ns["s"].inference_peak_bytes


_SEEN: list[str] = []  # what a user's hook appends to


def _hook(module, args, output):
    _SEEN.append(type(output).__name__)


@pytest.mark.parametrize("train", [False, True])
def test_a_users_hook_writes_into_a_copy_never_the_users_objects(train: bool) -> None:
    """The fake twin's hooks run with copies of what they write: no fake tensor (and no entry at
    all) lands in the user's list."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].register_forward_hook(_hook)
    torchmagic.estimate_memory(model, torch.randn(3, 4), train=train, trace_device="cpu")
    assert _SEEN == []
    model(torch.randn(3, 4))
    assert _SEEN == ["Tensor"]  # the hook still works on the user's model
    _SEEN.clear()
