"""%%estimate's core: the peak of the user's own cell on fake twins (torchmagic.core.estimate_cell),
and the optimizer twin it needs (torchmagic.core.twin.twin_optimizer).

References are computed here: the same cell run for real on copies of the model and optimizer
under torch's MemTracker (a real warm-up step first where the estimate makes missing state).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from estimate_helpers import free_reference_cycles, optimizer_state_bytes
from statecheck import Snapshot, assert_released
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.estimate_cell import estimate_cell
from torchmagic.core.estimate_trace import KINDS
from torchmagic.core.twin import Isolation, meta_tensor, twin, twin_optimizer
from torchmagic.models import GPT, GPTConfig

REFS = {"parameters": "Parameter", "buffers": "Buffer", "gradients": "Gradient",
        "optimizer_state": "Optstate", "activations": "Activation", "temporaries": "Temp",
        "inputs": "Other"}

STEP = """
opt.zero_grad()
logits = gpt(ids)
loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
loss.backward()
opt.step()
"""

@pytest.fixture(autouse=True)
def _collect_garbage():
    """Leave no tensor of this file alive for later tests (``%gpumem --top`` counts them)."""
    yield
    free_reference_cycles()



def setup(trained: bool = True) -> dict:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=200, block_size=32, n_layer=2, n_head=2, d_model=32))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    ids = torch.randint(0, 200, (4, 32))
    if trained:   # the optimizer has state, the parameters have gradients
        F.cross_entropy(gpt(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
    return {"torch": torch, "F": F, "gpt": gpt, "opt": opt, "ids": ids}


def real_cell(ns: dict, source: str, warm_up: bool, reset_between: bool = False,
              model: str = "gpt", inputs: str = "ids") -> dict:
    """Run ``source`` for real on copies under MemTracker; the reference."""
    gpt, opt = copy.deepcopy((ns[model], ns["opt"]))   # one memo: opt updates this model
    assert opt.param_groups[0]["params"][0] is next(gpt.parameters())
    for p, q in zip(ns[model].parameters(), gpt.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    if warm_up and not opt.state:
        saved = [p.grad for p in gpt.parameters()]
        for p in gpt.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, g in zip(gpt.parameters(), saved):
            p.grad = g
    mt = MemTracker()
    local = {**ns, model: gpt, "opt": opt, "mt": mt}
    mt.track_external(ns[inputs])
    mt.track_external(gpt)
    mt.track_external(opt)
    with mt:
        exec(source, local)  # noqa: S102 - the test's own cell
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    ref = {k: int(snap[_MemRefType(v)]) for k, v in REFS.items()}
    ref["total"] = int(snap["Total"])
    # MemTracker files what opt.step() allocates as optimizer state, its temporaries too; the
    # state is what opt.state holds, all of it live at a peak that holds any (torch's optimizers
    # make their state first thing in the step)
    state = optimizer_state_bytes(opt)
    if ref["optimizer_state"] >= state:
        ref["temporaries"] += ref["optimizer_state"] - state
        ref["optimizer_state"] = state
    return ref


def assert_within_1pct(est, ref: dict) -> None:
    for kind in KINDS:
        got, want = est.by_kind[kind], ref[kind]
        assert abs(got - want) <= 0.01 * want, f"{kind}: estimate {got:,} vs real {want:,}"
    assert abs(est.peak_bytes - ref["total"]) <= 0.01 * ref["total"]


@pytest.mark.parametrize("trained", [True, False], ids=["optimizer-with-state", "fresh"])
def test_cell_estimate_equals_memtracker_on_the_real_cell(trained: bool) -> None:
    ns = setup(trained)
    est = estimate_cell(STEP, ns)
    assert_within_1pct(est, real_cell(ns, STEP, warm_up=True))
    assert est.what == "cell" and est.peak_phase in ("forward", "backward", "optimizer step")
    assert "opt: AdamW" in est.settings["optimizers"]
    assert ("state twinned" in est.settings["optimizers"]) is trained


def test_first_step_measures_the_fresh_optimizer() -> None:
    ns = setup(trained=False)
    est = estimate_cell(STEP, ns, first_step=True)
    assert_within_1pct(est, real_cell(ns, STEP, warm_up=False))
    steady = estimate_cell(STEP, ns)
    assert steady.peak_bytes > est.peak_bytes


@pytest.mark.parametrize("first_step", [False, True], ids=["steady", "first-step"])
def test_cell_adam_state_and_step_temporaries_analytic(first_step: bool) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    ns = {"mlp": mlp, "opt": torch.optim.AdamW(mlp.parameters(), foreach=True),
          "x": torch.randn(4, 1024), "torch": torch}
    cell = "mlp(x).mean().backward()\nopt.step()\nopt.zero_grad()\n"
    est = estimate_cell(cell, ns, first_step=first_step)
    params = list(mlp.parameters())
    P = sum(p.numel() * p.element_size() for p in params)
    assert est.peak_phase == "optimizer step" and est.peak_op == "aten._foreach_sqrt"
    # exp_avg, exp_avg_sq and a float32 step count per parameter; the sqrt: a temporary
    assert est.by_kind["optimizer_state"] == 2 * P + 4 * len(params)
    assert est.by_kind["temporaries"] == P
    assert est.by_kind["parameters"] == P and est.by_kind["gradients"] == P
    ref = real_cell(ns, cell, warm_up=not first_step, model="mlp", inputs="x")
    assert est.by_kind == {k: ref[k] for k in KINDS} and est.peak_bytes == ref["total"]


def test_gradient_accumulation_micro_steps() -> None:
    ns = setup()
    cell = ("for i in range(2):\n"
            "    loss = F.cross_entropy(gpt(ids).flatten(0, 1), ids.flatten()) / 2\n"
            "    loss.backward()\n"
            "opt.step()\nopt.zero_grad()\n")
    ref_cell = cell.replace("    loss.backward()\n", "    loss.backward()\n    mt.reset_mod_stats()\n")
    est = estimate_cell(cell, ns)
    assert_within_1pct(est, real_cell(ns, ref_cell, warm_up=True))
    assert est.by_kind["gradients"] > 0 or est.peak_phase == "optimizer step"


def test_user_objects_unchanged_scheduler_included() -> None:
    ns = setup()
    sched = torch.optim.lr_scheduler.StepLR(ns["opt"], step_size=1, gamma=0.1)
    ns["sched"] = sched
    gpt, opt = ns["gpt"], ns["opt"]
    snap = Snapshot.take(gpt, ids=ns["ids"])
    state = copy.deepcopy(opt.state_dict())
    names = set(ns)
    lr = opt.param_groups[0]["lr"]
    est = estimate_cell(STEP + "sched.step()\nextra = torch.zeros(1000)\n", ns)
    snap.assert_unchanged()
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 0
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, s in state["state"].items():
        for name, v in s.items():
            assert torch.equal(after["state"][k][name], v), name
    assert set(ns) == names   # nothing assigned in the cell lands in the namespace
    assert est.peak_bytes > 0


def test_failing_cell_one_line_state_kept_and_released() -> None:
    ns = setup()
    snap = Snapshot.take(ns["gpt"], ids=ns["ids"])
    with pytest.raises(ForwardError) as info:
        estimate_cell("y = gpt(ids)\nz = gpt.lm_head(y)\n", ns)
    msg = str(info.value)
    assert msg.startswith("line 2") and "lm_head" in msg and "\n" not in msg
    snap.assert_unchanged()

    def failing(model: nn.Module) -> None:
        with pytest.raises(ForwardError):
            estimate_cell("y = m(torch.randn(2, 3))\n", {"m": model, "torch": torch})

    assert_released(lambda: nn.Linear(4, 4), failing)


def test_keyboard_interrupt_in_the_cell() -> None:
    ns = setup()
    snap = Snapshot.take(ns["gpt"], ids=ns["ids"])
    with pytest.raises(KeyboardInterrupt):
        estimate_cell("y = gpt(ids)\nraise KeyboardInterrupt\n", ns)
    snap.assert_unchanged()


def test_data_reads() -> None:
    ns = setup()
    # .item() continues as a symbol (what %%meta_shape --fake does)
    est = estimate_cell("loss = F.cross_entropy(gpt(ids).flatten(0, 1), ids.flatten())\n"
                        "value = loss.item()\n", ns)
    assert est.peak_bytes > 0
    # branching on it: why it cannot continue
    with pytest.raises(ForwardError) as info:
        estimate_cell("y = gpt(ids)\nif y.sum() > 0:\n    y = y * 2\n", ns)
    assert "line 2" in str(info.value) and "real data" in str(info.value)
    # a size that depends on the values: its memory cannot be known
    with pytest.raises(ForwardError) as info:
        estimate_cell("keep = ids[ids > 100]\nh = gpt.wte(keep)\n", ns)
    msg = str(info.value)
    assert msg.startswith("line 1") and "depends on the values" in msg and "\n" not in msg


def test_cell_that_builds_its_own_model_and_optimizer() -> None:
    cell = ("m = torch.nn.Linear(64, 64)\nopt2 = torch.optim.SGD(m.parameters(), momentum=0.9)\n"
            "m(torch.randn(32, 64)).sum().backward()\nopt2.step()\n")
    est = estimate_cell(cell, {"torch": torch})
    params = (64 * 64 + 64) * 4
    # at the optimizer step: the momentum buffer is made, and the gradients are alive
    assert est.by_kind["optimizer_state"] >= params
    assert est.by_kind["parameters"] + est.by_kind["activations"] >= params


def test_verdict_and_bad_input() -> None:
    ns = setup()
    est = estimate_cell(STEP, ns, memory="1GiB", reserve="512MiB")
    assert est.fits and est.verdict.margin == 512 * 2**20 - est.peak_bytes
    with pytest.raises(TorchMagicError, match="the cell is empty"):
        estimate_cell("", ns)
    with pytest.raises(TorchMagicError, match="not valid Python"):
        estimate_cell("x = (", ns)
    with pytest.raises(TorchMagicError, match="top must be"):
        estimate_cell(STEP, ns, top=-2)


# ---------------------------------------------------------------------------------------------
# twin_optimizer
# ---------------------------------------------------------------------------------------------
def test_twin_optimizer_maps_params_and_state() -> None:
    ns = setup()
    gpt, opt = ns["gpt"], ns["opt"]
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    iso = Isolation(meta_tensor, "meta")
    model_twin = twin(gpt, isolation=iso)
    opt_twin = twin_optimizer(opt, isolation=iso)
    assert type(opt_twin) is type(opt)
    twin_params = opt_twin.param_groups[0]["params"]
    assert [id(p) for p in twin_params] == [id(p) for p in model_twin.parameters()]
    assert len(opt_twin.state) == len(opt.state)
    first = twin_params[0]
    assert opt_twin.state[first]["exp_avg"].is_meta
    assert opt_twin.state[first]["exp_avg"].shape == first.shape
    # the scheduler's step wrapper of the twin marks the twin, never the original
    assert hasattr(opt.step, "_wrapped_by_lr_sched")
    assert vars(opt_twin).get("step") is not vars(opt).get("step")
    handle = opt_twin.register_step_pre_hook(lambda *a: None)
    assert len(opt._optimizer_step_pre_hooks) == 0
    handle.remove()
    opt_twin.param_groups[0]["lr"] = 5.0
    assert opt.param_groups[0]["lr"] != 5.0
    assert sched.optimizer is opt
    # a parameter not in the map is converted and added
    extra = nn.Parameter(torch.randn(3))
    o2 = torch.optim.SGD([extra], lr=0.1)
    t2 = twin_optimizer(o2, meta_tensor)
    assert t2.param_groups[0]["params"][0].is_meta
