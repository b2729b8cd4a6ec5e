"""Issue 11, item 1: twins share nothing mutable with the user's objects.

``%%meta_shape`` (and every twin made by ``core/twin.py``: ``%summary --meta``'s included) must
leave every real object as it was: no meta or fake tensor lands in a real object, no attribute, list,
dict, optimizer state, LR or scaler changes. Where isolation is impossible it refuses before running,
naming the object and why. Each case is checked with the snapshot helper and, where it applies,
with what plain torch does next (the real optimizer still steps).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from conftest import run
from IPython.core.error import UsageError
from statecheck import Snapshot, fake_or_meta_tensors

from torchmagic.core.isolation import Isolation, IsolationError
from torchmagic.core.twin import (
    meta_tensor,
    meta_twin,
    twin,
    twin_grad_scaler,
    twin_lr_scheduler,
    twin_optimizer,
)

FLAGS = ["", "--fake"]


def _trained(ip):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    adam = torch.optim.Adam(net.parameters(), lr=0.01)
    net(x).sum().backward()
    adam.step()  # real state: step, exp_avg, exp_avg_sq
    sched = torch.optim.lr_scheduler.StepLR(adam, step_size=1, gamma=0.5)
    ip.user_ns.update(net=net, x=x, adam=adam, sched=sched)
    return net, x, adam, sched


@pytest.mark.parametrize("flag", FLAGS)
def test_optimizer_step_in_the_cell_touches_no_real_optimizer(ip, flag):
    net, x, adam, sched = _trained(ip)
    snap = Snapshot.take(net, adam=adam, sched=sched, x=x)
    cell = ("loss = net(x).sum()\nloss.backward()\nadam.step()\nsched.step()\n"
            "adam.zero_grad()\nlr = adam.param_groups[0]['lr']\n"
            "avg = adam.state[net[0].weight]['exp_avg']")
    # fake tensors carry the optimizer's .item() as a symbol: the step runs (without --fake, the
    # meta run stops at that .item() and the cell runs again on fake tensors)
    run(ip, f"meta_shape {flag} -o rep", cell)
    rep = ip.user_ns.pop("rep")
    assert rep.value("lr").value == "0.005" and rep.value("avg").shapes == [(4, 4)]
    assert rep.mode == "fake"
    snap.assert_unchanged()
    assert fake_or_meta_tensors(adam, "adam") == [] and fake_or_meta_tensors(sched, "sched") == []
    # the real optimizer still steps for real (it failed after the cell)
    net(x).sum().backward()
    adam.step()
    sched.step()
    assert all(v.device.type == "cpu" for st in adam.state.values() for v in st.values())


def test_meta_optimizer_step_continues_on_fake_tensors_and_names_the_line(ip):
    _trained(ip)
    run(ip, "meta_shape -o rep", "net(x).sum().backward()\nadam.step()")
    rep = ip.user_ns.pop("rep")
    assert rep.mode == "fake" and rep.error is None
    assert rep.notes[0].startswith("the meta run stopped at line 2: it reads tensor values")


def test_twin_optimizer_holds_the_twin_parameters_and_state():
    net = nn.Linear(3, 2)
    adam = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 3)).sum().backward()
    adam.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=1.0, total_steps=10)
    iso = Isolation(meta_tensor, "meta")
    tnet = twin(net, isolation=iso)
    topt = twin_optimizer(adam, isolation=iso)
    twin_params = [p for g in topt.param_groups for p in g["params"]]
    assert twin_params == [tnet.weight, tnet.bias] or all(
        a is b for a, b in zip(twin_params, [tnet.weight, tnet.bias]))
    st = topt.state[tnet.weight]
    assert {k: v.is_meta for k, v in st.items()} == {"step": True, "exp_avg": True,
                                                     "exp_avg_sq": True}
    assert st["exp_avg"].shape == adam.state[net.weight]["exp_avg"].shape
    assert topt.param_groups[0]["lr"] == adam.param_groups[0]["lr"]
    assert topt.defaults == adam.defaults
    tsched = twin_lr_scheduler(sched, isolation=iso)
    assert tsched.optimizer is topt
    before = adam.param_groups[0]["lr"]
    topt.step()  # no grads on the twin parameters: nothing computed, counters move
    tsched.step()
    assert adam.param_groups[0]["lr"] == before and topt.param_groups[0]["lr"] != before
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(net(torch.randn(2, 3)).sum())  # the scale tensor now exists
    tscaler = twin_grad_scaler(scaler, isolation=iso)
    assert tscaler._scale is not scaler._scale and tscaler._scale.is_meta
    assert scaler.get_scale() == 1024.0


def test_grad_scaler_twin_mid_iteration_keys_the_twin_optimizer():
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net(torch.randn(2, 3)).sum()).backward()
    scaler.unscale_(opt)  # per-optimizer state now exists: pickling would refuse
    iso = Isolation(lambda t: t.detach().clone(), "copy")
    twin(net, isolation=iso)
    topt = twin_optimizer(opt, isolation=iso)
    tscaler = twin_grad_scaler(scaler, isolation=iso)
    assert list(tscaler._per_optimizer_states) == [id(topt)]
    assert list(scaler._per_optimizer_states) == [id(opt)]


class Trainer:
    """An object deepcopy alone cannot copy (a lock), holding a model and counters."""

    def __init__(self) -> None:
        self.model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        self.step = 0
        self.lock = threading.Lock()
        self.history: list = []


@pytest.mark.parametrize("flag", FLAGS)
def test_changes_to_objects_do_not_stick(ip, flag):
    trainer = Trainer()
    cfg = {"lr": 0.1, "sizes": [1, 2]}
    ip.user_ns.update(trainer=trainer, cfg=cfg)
    snap = Snapshot.take(trainer.model, trainer=trainer, cfg=cfg)
    run(ip, f"meta_shape {flag}",
        "trainer.model.eval()\ntrainer.step += 1\ntrainer.history.append(trainer.model(torch."
        "randn(4, 2)))\ncfg['lr'] = 5\ncfg['sizes'].append(3)\ntrainer.new_attr = 1")
    snap.assert_unchanged()
    assert trainer.model.training and trainer.step == 0 and trainer.history == []
    assert cfg == {"lr": 0.1, "sizes": [1, 2]} and not hasattr(trainer, "new_attr")
    assert fake_or_meta_tensors(trainer, "trainer") == []


def _hooked(ip):
    outputs: list = []
    calls = {"n": 0}

    class Recorder:
        def __init__(self) -> None:
            self.seen: list = []

        def hook(self, module, args, out):  # noqa: ANN001
            self.seen.append(out)

    def make_closure_hook():
        box: list = []

        def hook(module, args, out):  # noqa: ANN001
            box.append(out)
        return hook, box

    def global_hook(module, args, out):  # noqa: ANN001
        outputs.append(out)
        calls["n"] += 1

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    rec = Recorder()
    closure_hook, box = make_closure_hook()
    net[0].register_forward_hook(global_hook)
    net[0].register_forward_hook(rec.hook)
    net[1].register_forward_hook(closure_hook)
    net[1].register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", a[0].shape))
    ip.user_ns.update(net=net, outputs=outputs, calls=calls, rec=rec)
    return net, outputs, calls, rec, box


@pytest.mark.parametrize("flag", FLAGS)
def test_hooks_side_effects_land_on_copies(ip, flag):
    net, outputs, calls, rec, box = _hooked(ip)
    snap = Snapshot.take(net, outputs=outputs, calls=calls, rec=rec, box=box)
    run(ip, f"meta_shape {flag} -o rep", "y = net(torch.randn(5, 4))\nn = calls['n']\n"
        "m = len(outputs)")
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert outputs == [] and calls == {"n": 0} and rec.seen == [] and box == []
    assert rep.value("n").value == "1" and rep.value("m").value == "1"  # the twins' hooks ran


def test_notebook_hook_writing_a_global_with_the_global_statement(ip):
    r = ip.run_cell("import torch.nn as nn\ncount = 0\nseen = []\n"
                    "def hook(m, a, out):\n    global count\n    count += 1\n    seen.append(out)\n"
                    "lin = nn.Linear(2, 2)\nh = lin.register_forward_hook(hook)")
    assert r.success
    run(ip, "meta_shape -o rep", "y = lin(torch.randn(3, 2))\nc = count")
    assert ip.user_ns.pop("rep").value("c").value == "1"
    assert ip.user_ns["count"] == 0 and ip.user_ns["seen"] == []


def test_summary_meta_hooks_write_no_real_list(ip):
    """%summary --meta runs a meta twin (core/twin.py): its hooks' side effects are isolated."""
    net, outputs, calls, rec, box = _hooked(ip)
    run(ip, "summary net (5,4) --meta")
    assert outputs == [] and rec.seen == [] and box == [] and calls == {"n": 0}


def test_meta_twin_isolates_attributes_and_refuses_what_cannot_be_copied():
    net = nn.Linear(2, 2)
    net.counter = [0]
    net.lock = threading.Lock()
    tw = meta_twin(net)
    tw.counter.append(1)
    assert net.counter == [0] and tw.lock is net.lock  # locks are shared, harmlessly
    with open(__file__) as f:
        net.log = f
        with pytest.raises(IsolationError, match=r"Linear.log \(TextIOWrapper\) is an open file"):
            meta_twin(net)


@pytest.mark.parametrize("bad,words", [
    ("(i for i in range(3))", "is a generator: running the code would advance the real one"),
    ("open(__import__('os').devnull)", "is an open file or stream"),
])
def test_refused_before_running_naming_the_object(ip, bad, words):
    ip.run_cell(f"import torch.nn as nn\nsrc = {bad}\nnet = nn.Linear(2, 2).train()")
    snap = Snapshot.take(ip.user_ns["net"])
    with pytest.raises(UsageError) as info:
        run(ip, "meta_shape", "net.eval()\nfor item in src:\n    pass")
    msg = str(info.value)
    assert "src (" in msg and words in msg and "nothing was run" in msg
    snap.assert_unchanged()


def test_twins_in_one_run_stay_consistent(ip):
    net, x, adam, sched = _trained(ip)
    ip.user_ns.update(first=net[0], params=list(net.parameters()))
    run(ip, "meta_shape -o rep", "a = first is net[0]\nb = params[0] is net[0].weight\n"
        "c = adam.param_groups[0]['params'][0] is net[0].weight\nd = sched.optimizer is adam")
    rep = ip.user_ns.pop("rep")
    assert [rep.value(k).value for k in "abcd"] == ["True"] * 4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tensor_without_a_meta_form_is_refused_naming_it(ip):
    qnet = nn.Linear(4, 4)
    qnet.register_buffer("q", torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.quint8))
    ip.user_ns["qnet"] = qnet
    with pytest.raises(UsageError) as info:
        run(ip, "meta_shape", "y = qnet(torch.randn(2, 4))")
    msg = str(info.value)
    assert "qnet.q is quantized tensor (quint8, per_tensor_affine), which has no meta form" in msg
    assert "nothing was run" in msg
