"""``%%meta_shape`` and ``torchmagic.meta_shape``: shapes of a cell run on meta / fake tensors.

Numbers are checked against independent references: shapes from a real forward of the same (tiny)
model, parameter counts from ``parameters()`` or the analytic Llama formula, RSS from psutil.
"""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch
import torch.nn as nn
from conftest import outputs, requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot, assert_released

import torchmagic
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.state import _mode_stack
from torchmagic.models import GPT, GPTConfig, Llama, SmallCNN


def _llama_params(cfg) -> int:
    """Analytic parameter count of torchmagic.models.Llama (untied head, no biases)."""
    d, f, v, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
    hd = d // cfg.n_head
    attn = d * cfg.n_head * hd + 2 * d * cfg.n_kv_head * hd + cfg.n_head * hd * d
    return 2 * v * d + L * (attn + 3 * d * f + 2 * d) + d


@pytest.fixture(autouse=True)
def _warm_meta():
    # the first meta op of a process registers kernels (~0.3 s, some MB): do it outside RSS checks
    with torch.device("meta"):
        torch.randn(2) + 1


def _ns_record(ns: dict) -> dict:
    """ids and values of every name, for a byte-for-byte comparison afterwards."""
    rec = {}
    for k, v in ns.items():
        if isinstance(v, torch.Tensor):
            rec[k] = (id(v), v.detach().clone(), v.requires_grad, v.grad)
        elif isinstance(v, (list, dict, set)):
            rec[k] = (id(v), repr(v))
        else:
            rec[k] = (id(v), None)
    return rec


def _assert_ns_same(ns: dict, rec: dict) -> None:
    assert set(ns) == set(rec), f"names changed: {set(ns) ^ set(rec)}"
    for k, before in rec.items():
        v = ns[k]
        assert id(v) == before[0], f"{k} rebound"
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[1]) and v.requires_grad == before[2] and v.grad is before[3]
        elif isinstance(v, (list, dict, set)):
            assert repr(v) == before[1], f"{k} changed"


def _user_error(ip, line: str, cell: str) -> str:
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# shapes on the models of the issue
# ---------------------------------------------------------------------------------------------
def test_cnn_shapes_match_real_forward_and_state_is_untouched(ip):
    cnn = SmallCNN().train()
    x = torch.randn(8, 3, 32, 32)
    ip.user_ns.update(cnn=cnn, x=x)
    snap = Snapshot.take(cnn, x=x)
    rec = _ns_record(ip.user_ns)
    _, shown = run(ip, "meta_shape -o rep", "feats = cnn.features(x)\nlogits = cnn(x)\nlogits.shape")
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    _assert_ns_same(ip.user_ns, rec)
    with torch.no_grad():  # independent reference: the real model on a copy
        import copy
        real = copy.deepcopy(cnn).eval()
        ref_feats, ref_logits = real.features(x[:8]), real(x)
    assert rep.value("feats").shapes == [tuple(ref_feats.shape)]
    assert rep.value("logits").shapes == [tuple(ref_logits.shape)]
    assert rep.value("logits").device == "meta" and rep.value("logits").dtype == "float32"
    assert rep.values[-1].last_expr and "torch.Size([8, 10])" in rep.values[-1].value
    calls = {}
    for c in rep.calls:
        calls.setdefault(c.path, c)
    assert calls["cnn.features.0"].outputs == [(8, 16, 32, 32)]
    assert calls["cnn.head.1"].inputs == [(8, 2048)] and calls["cnn.head.1"].outputs == [(8, 64)]
    assert calls["cnn"].line == 2 and calls["cnn.features"].line == 1
    assert "cnn: SmallCNN -> meta twin" in rep.converted[0] or any(
        c.startswith("cnn: SmallCNN") for c in rep.converted)
    assert "feats" not in ip.user_ns and "logits" not in ip.user_ns
    assert "(8, 16, 32, 32)" in shown and "logits" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())


def test_gpt_decoder_tied_weights_and_backward(ip):
    gpt = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=2, d_model=16))
    ip.user_ns["gpt"] = gpt
    snap = Snapshot.take(gpt)
    cell = ("idx = torch.randint(0, 97, (2, 12))\nlogits = gpt(idx)\nloss = logits.sum()\n"
            "loss.backward()\ntied = gpt.lm_head.weight is gpt.wte.weight\nm = gpt\n")
    run(ip, "meta_shape -o rep", cell)
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert gpt.wte.weight.grad is None
    with torch.no_grad():
        ref = gpt(torch.randint(0, 97, (2, 12)))
    assert rep.value("logits").shapes == [tuple(ref.shape)]
    assert rep.value("tied").value == "True"
    assert rep.value("m").params == sum(p.numel() for p in gpt.parameters())  # tied once
    folded = [c for c in rep.calls if c.repeat > 1]
    assert folded and folded[0].path == "gpt.blocks.0" and folded[0].repeat == 3
    assert folded[0].last_path == "gpt.blocks.2"


def test_lstm_tuple_outputs(ip):
    lstm = nn.LSTM(10, 20, num_layers=2, batch_first=True)
    x = torch.randn(4, 7, 10)
    ip.user_ns.update(lstm=lstm, x=x)
    snap = Snapshot.take(lstm, x=x)
    run(ip, "meta_shape -o rep", "out, (h, c) = lstm(x)\nres = lstm(x)")
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    with torch.no_grad():
        ref_out, (ref_h, ref_c) = lstm(x)
    assert rep.value("out").shapes == [tuple(ref_out.shape)]
    assert rep.value("h").shapes == [tuple(ref_h.shape)]
    assert rep.value("res").shapes == [tuple(ref_out.shape), tuple(ref_h.shape), tuple(ref_c.shape)]
    assert rep.calls[0].outputs == [tuple(ref_out.shape), tuple(ref_h.shape), tuple(ref_c.shape)]


def test_7b_decoder_built_in_the_cell_allocates_nothing(ip):
    ip.user_ns["Llama"] = Llama
    snap = Snapshot.take()  # global state: default device, RNG (randint), grad mode
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    cell = "cfg = Llama.config_7b()\nmodel = Llama(cfg)\nout = model(torch.randint(0, 32000, (1, 64)))\n"
    run(ip, "meta_shape -o rep", cell)
    grown = proc.memory_info().rss - before
    snap.assert_unchanged()
    rep = ip.user_ns.pop("rep")
    assert rep.value("model").params == _llama_params(Llama.config_7b()) == 6_738_415_616
    assert rep.value("out").shapes == [(1, 64, 32000)]
    assert grown < 150 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
    layer_rows = [c for c in rep.calls if c.path == "model.layers.0"]
    assert layer_rows and layer_rows[0].repeat == 32
    assert "model" not in ip.user_ns


def test_huge_factory_call_costs_nothing():
    snap = Snapshot.take()
    rep = torchmagic.meta_shape("big = torch.randn(100000, 100000)\nsmall = big @ big[:, :3]",
                                {"torch": torch})
    snap.assert_unchanged()
    assert rep.value("big").shapes == [(100000, 100000)]
    assert rep.value("small").shapes == [(100000, 3)]


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------
def test_shape_bug_in_sequential_names_line_module_op(ip):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(16), nn.Flatten())
    head = nn.Sequential(nn.Linear(512, 10))
    ip.user_ns.update(backbone=backbone, head=head)
    snap = Snapshot.take(backbone, head)
    rec = _ns_record(ip.user_ns)
    cell = ("x = torch.randn(8, 3, 224, 224)\nfeats = backbone(x)\n"
            "logits = head(feats.flatten(1))\n")
    from IPython.utils.capture import capture_output
    with capture_output() as cap, pytest.raises(UsageError) as info:
        ip.run_cell_magic("meta_shape", "-o rep", cell)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("%%meta_shape: line 3: head.0 (Linear, in_features=512")
    assert "got input (8, 2048)" in msg
    assert "mat1 and mat2 shapes cannot be multiplied (8x2048 and 512x10)" in msg
    shown = "".join(o.data.get("text/plain", "") for o in cap.outputs)
    assert "(8, 2048)" in shown and "FAILED" in shown  # the partial report was shown
    rep = ip.user_ns.pop("rep")
    assert [v.name for v in rep.values] == ["x", "feats"] and rep.error_line == 3
    assert rep.error_kind == "shape"
    snap.assert_unchanged()
    _assert_ns_same(ip.user_ns, rec)


@pytest.mark.parametrize("cell, name, shape", [
    ("x = torch.randn(4)\nn = x.sum().item()", "n", None),  # a SymFloat
    ("x = torch.randn(4)\nv = x.tolist()", "v", None),
    ("x = torch.randn(4)\ny = x[x > 0]", "y", "(u0,)"),
    ("x = torch.randn(4)\ni = torch.nonzero(x)", "i", "(u0, 1)"),
    ("x = torch.randn(4)\nu = torch.unique(x)", "u", "(u0,)"),
])
def test_data_dependent_code_continues_on_fake_tensors(ip, cell, name, shape):
    """meta tensors have no values: the cell runs again on fake tensors, says where the meta run
    stopped, and data-dependent sizes are symbols."""
    snap = Snapshot.take()
    run(ip, "meta_shape -o rep", cell)
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert rep.mode == "fake" and rep.error is None
    assert rep.notes[0].startswith("the meta run stopped at line 2: it reads tensor values")
    if shape is not None:
        assert str(rep.value(name).shape) == shape, rep.value(name)


def test_branch_on_a_value_says_why(ip):
    snap = Snapshot.take()
    msg = _user_error(ip, "meta_shape", "x = torch.randn(4)\nif x.sum() > 0:\n    y = 1")
    snap.assert_unchanged()
    for w in ["line 2", "branches on", "real data", "torch._check"]:
        assert w in msg, (w, msg)


def test_fake_mode_symbols_and_branch_message(ip):
    ids = torch.tensor([3, 0, 2, 0])
    ip.user_ns["ids"] = ids
    snap = Snapshot.take(ids=ids)
    cell = ("nz = torch.nonzero(torch.randn(3, 4))\nkeep = ids[ids > 0]\nn = (ids > 0).sum().item()\n"
            "u = torch.unique(ids)\nemb = nn.Embedding(10, 4)(keep)\n")
    _, shown = run(ip, "meta_shape --fake -o rep", cell)
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert rep.mode == "fake"
    nz = rep.value("nz").shapes[0]
    assert str(nz[0]).startswith("u") and nz[1] == 2
    assert rep.value("keep").shape.startswith("(u")
    assert rep.value("n").value.startswith("u")
    emb = rep.value("emb").shapes[0]
    assert emb[1] == 4 and str(emb[0]) == str(rep.value("keep").shapes[0][0])
    assert "fake" in rep.value("keep").device
    assert "(u" in shown
    msg = _user_error(ip, "meta_shape --fake", "n = (ids > 0).sum().item()\nif n > 2:\n    pass")
    assert "line 2 (if n > 2:)" in msg and "branches on" in msg and "u" in msg
    snap.assert_unchanged()


def test_numpy_and_cuda_are_named_not_crashed_on(ip):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    ip.user_ns.update(arr=arr, np=np)
    snap = Snapshot.take()
    run(ip, "meta_shape -o rep",
        "t = torch.as_tensor(arr)\nw = torch.from_numpy(arr) @ torch.randn(4, 2)\n"
        "g = torch.randn(2, 3).to('cuda')\nz = torch.zeros(2, device='cuda')\n")
    rep = ip.user_ns.pop("rep")
    assert rep.value("t").shapes == [(3, 4)] and rep.value("t").device == "meta"
    assert rep.value("w").shapes == [(3, 2)]
    assert rep.value("g").device == "meta" and rep.value("z").device == "meta"
    assert any(p.startswith("arr: numpy array (3, 4)") for p in rep.passed)
    assert any("cuda" in n for n in rep.notes)
    msg = _user_error(ip, "meta_shape", "arr[0, 0] = 100")
    assert "line 1 (arr[0, 0] = 100)" in msg and "read-only" in msg
    msg = _user_error(ip, "meta_shape", "a = torch.randn(3)\nb = np.asarray(a)")
    assert "line 2" in msg and "numpy" in msg
    assert arr[0, 0] == 0 and arr.flags.writeable
    snap.assert_unchanged()


def test_op_without_meta_kernel_is_named(ip):
    @torch.library.custom_op("tmtest_meta::double_it", mutates_args=())
    def double_it(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    ip.user_ns["double_it"] = double_it
    msg = _user_error(ip, "meta_shape", "x = torch.randn(3)\ny = double_it(x)")
    assert "line 2" in msg and "tmtest_meta::double_it" in msg and "register_fake" in msg


def test_names_sharing_modules_share_twins(ip):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ip.user_ns.update(model=model, head=model[1], w=model[1].weight, parts={"enc": model[0]})
    run(ip, "meta_shape -o rep", "same = model[1] is head and head.weight is w and "
        "parts['enc'] is model[0]\ndevice = w.device.type")
    rep = ip.user_ns.pop("rep")
    assert rep.value("same").value == "True" and rep.value("device").value == "'meta'"


def test_object_that_cannot_be_twinned_is_named(ip):
    import threading

    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.lock = threading.Lock()

    ip.user_ns["m"] = Locked()  # a lock is shared by the twin: harmless, the cell runs
    run(ip, "meta_shape -o rep", "y = m.lin(torch.randn(1, 2))")
    assert ip.user_ns.pop("rep").value("y").shapes == [(1, 2)]
    ip.user_ns["m"].batches = (i for i in range(3))  # a generator must not be advanced for real
    msg = _user_error(ip, "meta_shape", "y = m.lin(torch.randn(1, 2))")
    assert "cannot make a meta twin: m.batches (generator) is a generator" in msg
    assert "nothing was run" in msg


def test_objects_reached_indirectly_are_never_written(ip):
    class Holder:
        pass

    h = Holder()
    h.t = torch.ones(3)
    h.bn = nn.BatchNorm1d(3).train()
    ip.user_ns["h"] = h
    snap = Snapshot.take(h.bn, t=h.t, h=h)
    run(ip, "meta_shape -o rep", "h.t.add_(1)\nout = h.bn(torch.randn(4, 3))\nh.flag = 1\n")
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert torch.equal(h.t, torch.ones(3)) and int(h.bn.num_batches_tracked) == 0
    assert rep.value("out").shapes == [(4, 3)] and not hasattr(h, "flag")
    assert any(c.startswith("h: Holder of tensors/modules -> meta copies") for c in rep.converted)
    # a real tensor no name leads to (torch.from_numpy) is still only read, as meta
    run(ip, "meta_shape -o rep", "import numpy as np\nz = torch.from_numpy(np.ones(3)) + 1")
    assert any("read as meta" in n for n in ip.user_ns.pop("rep").notes)


def test_notebook_functions_see_twins(ip):
    ip.user_ns["SmallCNN"] = SmallCNN
    result = ip.run_cell("cnn = SmallCNN().train()\ndef forward():\n"
                         "    return cnn(torch.randn(2, 3, 32, 32))\n", silent=True)
    assert result.success
    cnn = ip.user_ns["cnn"]
    snap = Snapshot.take(cnn)
    run(ip, "meta_shape -o rep", "y = forward()")
    rep = ip.user_ns.pop("rep")
    snap.assert_unchanged()
    assert rep.value("y").shapes == [(2, 10)] and rep.value("y").device == "meta"


# ---------------------------------------------------------------------------------------------
# state invariants
# ---------------------------------------------------------------------------------------------
def test_namespace_byte_for_byte_unchanged(ip):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(5, 4, requires_grad=True)
    items = [1, 2, 3]
    cfg = {"lr": 0.1}
    ip.user_ns.update(model=model, x=x, items=items, cfg=cfg, parts=[model[0], x])
    rec = _ns_record(ip.user_ns)
    snap = Snapshot.take(model, x=x)
    cell = ("x = model(x)\nitems.append(4)\ncfg['lr'] = 1.0\nparts[0].weight.data.zero_()\n"
            "model.eval()\nmodel[0].weight.requires_grad_(False)\nx.sum().backward()\n"
            "del items\nnew_name = 1\nparts\n")
    run(ip, "meta_shape", cell)
    _assert_ns_same(ip.user_ns, rec)
    snap.assert_unchanged()
    assert model.training and model[0].weight.requires_grad and x.grad is None
    assert items == [1, 2, 3] and cfg == {"lr": 0.1}


@pytest.mark.parametrize("calls", [
    "torch.set_default_device('meta')",
    "torch.set_default_device('cpu')",
    "torch.set_default_device('cpu')\ntorch.set_default_device(None)",
    "torch.set_default_device(None)",
])
def test_default_device_stack_unchanged(ip, calls):
    modes = [id(m) for m in _mode_stack()]
    snap = Snapshot.take()
    run(ip, "meta_shape -o rep", calls + "\ny = torch.randn(2)\n")
    rep = ip.user_ns.pop("rep")
    assert rep.value("y").device == "meta"
    assert [id(m) for m in _mode_stack()] == modes
    snap.assert_unchanged()
    assert torch.empty(1).device.type == "cpu"
    # the user's own set_default_device calls afterwards still behave
    torch.set_default_device("cpu")
    torch.set_default_device(None)
    assert _mode_stack() == [] or [id(m) for m in _mode_stack()] == modes
    assert torch.get_default_device().type == "cpu"


def test_user_default_device_context_survives(ip):
    torch.set_default_device("cpu")
    try:
        snap = Snapshot.take()
        stack = [id(m) for m in _mode_stack()]
        run(ip, "meta_shape", "torch.set_default_device(None)\ny = torch.randn(2)")
        assert [id(m) for m in _mode_stack()] == stack
        snap.assert_unchanged()
        assert torch.empty(1).device.type == "cpu"
    finally:
        torch.set_default_device(None)
    assert _mode_stack() == []


def test_state_on_exception_and_keyboard_interrupt(ip):
    cnn = SmallCNN().train()
    ip.user_ns["cnn"] = cnn
    torch.manual_seed(0)
    grad = torch.is_grad_enabled()
    snap = Snapshot.take(cnn)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("meta_shape", "",
                          "torch.manual_seed(1)\ntorch.set_grad_enabled(False)\n"
                          "y = cnn(torch.randn(2, 3, 32, 32))\nraise KeyboardInterrupt\n")
    snap.assert_unchanged()
    _user_error(ip, "meta_shape", "torch.set_default_device('cpu')\ny = cnn(torch.randn(2, 5, 32, 32))")
    snap.assert_unchanged()
    assert torch.is_grad_enabled() == grad
    assert not _mode_stack()


def test_core_keyboard_interrupt_restores_everything():
    cnn = SmallCNN().train()
    snap = Snapshot.take(cnn)

    def interrupted():
        cnn(torch.randn(2, 3, 32, 32))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        torchmagic.meta_shape(interrupted, {})
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------------
# plain Python, bad input, display
# ---------------------------------------------------------------------------------------------
def test_plain_python_string_and_function():
    cnn = SmallCNN().train()
    x = torch.randn(4, 3, 32, 32)
    snap = Snapshot.take(cnn, x=x)
    rep = torchmagic.meta_shape("y = cnn(x)\ny.shape", {"cnn": cnn, "x": x, "torch": torch})
    assert isinstance(rep, torchmagic.MetaShapeReport)
    assert rep.value("y").shapes == [(4, 10)]
    d = rep.to_dict()
    assert d["values"][0]["shapes"] == [[4, 10]] and d["mode"] == "meta"
    assert "y" in str(rep) and "<details" in rep._repr_html_()

    def step():
        h = cnn.features(x)
        return cnn.head(h)

    rep = torchmagic.meta_shape(step)  # closure and globals become twins
    assert rep.value("step()").shapes == [(4, 10)] and rep.value("h").shapes == [(4, 32, 8, 8)]
    rep = torchmagic.meta_shape("z = cnn(x)")  # default: the caller's namespace
    assert rep.value("z").shapes == [(4, 10)]
    snap.assert_unchanged()
    with pytest.raises(ForwardError) as info:
        torchmagic.meta_shape("y = cnn(torch.randn(1, 4, 32, 32))", {"cnn": cnn, "torch": torch})
    assert info.value.partial is not None and info.value.module_path == "cnn.features.0"
    # a value read continues on fake tensors; a branch on it stops, named without magic flags
    rep = torchmagic.meta_shape("x = torch.randn(3)\nn = x.sum().item()", {"torch": torch})
    assert rep.mode == "fake" and rep.value("n").type == "SymFloat"
    with pytest.raises(ForwardError, match=r"torch\._check") as info:
        torchmagic.meta_shape("x = torch.randn(3)\nif x.sum() > 0:\n    y = 1", {"torch": torch})
    assert "--fake" not in str(info.value)
    snap.assert_unchanged()
    assert_released(SmallCNN, lambda m: torchmagic.meta_shape(
        "y = m(torch.randn(1, 3, 32, 32))", {"m": m, "torch": torch}))


@pytest.mark.parametrize("line, cell, expect", [
    ("meta_shape --depth -1", "x = 1", "--depth must be >= 0"),
    ("meta_shape --depth two", "x = 1", "invalid int value"),
    ("meta_shape --bogus", "x = 1", "unknown option"),
    ("meta_shape", "   \n", "the cell is empty"),
    ("meta_shape", "x = (1,", "the cell is not valid Python (line 1: "),
    ("meta_shape -o 1x", "x = 1", "-o needs a variable name"),
    ("meta_shape", "y = undefined_name + 1", "NameError"),
])
def test_bad_input_is_one_line(ip, line, cell, expect):
    msg = _user_error(ip, line, cell)
    assert expect in msg


def test_core_bad_input():
    with pytest.raises(TorchMagicError, match="namespace must be a dict"):
        torchmagic.meta_shape("x = 1", namespace=[1])
    with pytest.raises(TorchMagicError, match="depth must be"):
        torchmagic.meta_shape("x = 1", {}, depth=-2)
    with pytest.raises(TorchMagicError, match="no arguments"):
        torchmagic.meta_shape(lambda a: a, {})


def test_depth_and_fold_options(ip):
    ip.user_ns["gpt"] = GPT()
    run(ip, "meta_shape --depth 0 -o r0", "y = gpt(torch.zeros(1, 8, dtype=torch.long))")
    run(ip, "meta_shape --no-fold -o r1", "y = gpt(torch.zeros(1, 8, dtype=torch.long))")
    r0, r1 = ip.user_ns.pop("r0"), ip.user_ns.pop("r1")
    text0 = str(r0)
    assert "wte" not in text0 and "gpt " in text0
    assert all(c.repeat == 1 for c in r1.calls)
    assert len(r1.calls) == r1.total_calls


def test_display_bundles_and_widget(ip):
    from torchmagic.display import meta as D

    ip.user_ns["gpt"] = GPT()
    out = outputs(ip, "meta_shape", "logits = gpt(torch.zeros(2, 8, dtype=torch.long))")
    assert out and "logits" in out[-1]["text/plain"]
    rep = torchmagic.meta_shape("logits = gpt(torch.zeros(2, 8, dtype=torch.long))",
                                {"gpt": GPT(), "torch": torch}, depth=1)
    html = rep._repr_html_()
    assert "<script" not in html and "<details" in html and "gpt.blocks.0" in html
    w = D.widget(rep)
    slider = w.children[2].children[0]
    tree = w.children[3]
    shallow = tree.value
    slider.value = slider.max
    assert len(tree.value) > len(shallow) and "qkv" in tree.value
    w.children[2].children[2].click()  # collapse all
    assert "<details open" not in tree.value


@pytest.mark.cuda
@requires_cuda
def test_cuda_model_and_tensors():
    cnn = SmallCNN().cuda().train()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    snap = Snapshot.take(cnn, x=x)
    allocated = torch.cuda.memory_allocated()
    rep = torchmagic.meta_shape("y = cnn(x.to('cuda'))\nz = torch.zeros(3, device='cuda')",
                                {"cnn": cnn, "x": x, "torch": torch})
    assert rep.value("y").shapes == [(2, 10)] and rep.value("y").device == "meta"
    rep = torchmagic.meta_shape("y = cnn(x)", {"cnn": cnn, "x": x}, fake=True)
    assert rep.value("y").device.startswith("cuda") and "fake" in rep.value("y").device
    assert torch.cuda.memory_allocated() == allocated
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------------
# reviewer's additions
# ---------------------------------------------------------------------------------------------
def test_packed_sequence_from_the_namespace(ip):
    """A PackedSequence's batch_sizes must stay on the CPU (PackedSequence refuses a meta one and
    the recurrent kernels read them): its data becomes meta, batch_sizes are shared read-only."""
    from torch.nn.utils.rnn import pack_padded_sequence

    gru = nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    packed = pack_padded_sequence(torch.randn(3, 5, 8), [5, 3, 2], batch_first=True)
    ip.user_ns.update(gru=gru, packed=packed)
    rec = _ns_record(ip.user_ns)
    snap = Snapshot.take(gru, data=packed.data, batch_sizes=packed.batch_sizes)
    _, shown = run(ip, "meta_shape -o rep", "out, h = gru(packed)\nn = int(packed.batch_sizes[0])")
    rep = ip.user_ns.pop("rep")
    assert rep.ok, rep.error
    assert rep.value("h").shapes == [(4, 3, 16)] and rep.value("h").device == "meta"
    assert rep.value("out").shapes[0] == (10, 32)
    assert rep.value("n").value == "3"
    _assert_ns_same(ip.user_ns, rec)
    snap.assert_unchanged()


def test_packing_inside_the_cell_is_explained(ip):
    ip.user_ns["gru"] = nn.GRU(8, 16, batch_first=True)
    msg = _user_error(ip, "meta_shape", "from torch.nn.utils.rnn import pack_padded_sequence\n"
                                        "p = pack_padded_sequence(torch.randn(3, 5, 8), [5, 3, 2], "
                                        "batch_first=True)\nout, h = gru(p)")
    assert msg.startswith("%%meta_shape: line 2") and "values of their lengths" in msg


def test_in_place_write_to_kept_batch_sizes_is_not_done_for_real(ip):
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(torch.randn(3, 5, 8), [5, 3, 2], batch_first=True)
    ip.user_ns["packed"] = packed
    before = packed.batch_sizes.clone()
    run(ip, "meta_shape", "packed.batch_sizes.add_(1)\npacked.batch_sizes[0] = 7")
    assert torch.equal(packed.batch_sizes, before)


def test_line_magics_in_the_cell_write_nothing_back(ip):
    """IPython line magics run in the shell's real namespace (``%timeit`` copies the cell's names
    into it, ``%time x = ...`` may bind there): whatever they write is undone afterwards."""
    w = torch.ones(2)
    ip.user_ns.update(w=w, cnn=SmallCNN())
    rec = _ns_record(ip.user_ns)
    cell = ("%time w = torch.zeros(4)\nq = 5\nfeats = cnn.features(torch.randn(1, 3, 32, 32))\n"
            "%timeit -n1 -r1 torch.zeros(3)\nlast = torch.zeros(2)\n")
    run(ip, "meta_shape -o rep", cell)
    rep = ip.user_ns.pop("rep")
    _assert_ns_same(ip.user_ns, rec)
    assert ip.user_ns["w"] is w and torch.equal(w, torch.ones(2))
    assert "q" not in ip.user_ns and "feats" not in ip.user_ns
    assert rep.value("feats").shapes == [(1, 32, 8, 8)] and rep.value("last").device == "meta"
    assert any("were undone" in n and "q" in n for n in rep.notes)
    # the same guard holds when the cell stops at an error
    with pytest.raises(UsageError):
        run(ip, "meta_shape", "%timeit -n1 -r1 torch.zeros(3)\nr = 1\n"
                              "if torch.randn(2).sum() > 0:\n    r = 2")
    _assert_ns_same(ip.user_ns, rec)


def test_meta_run_that_reads_values_continues_on_fake_tensors() -> None:
    """Boolean-mask selection has no meta kernel (its size comes from the values): the cell runs
    again on fake tensors, where the size is a symbol, and says so; a Python branch on a value
    stops the fake run too, with the explanation of the branch."""
    lin, x = nn.Linear(4, 3), torch.randn(5, 4)
    mask = torch.tensor([True, False, True, True, False])
    ns = {"lin": lin, "x": x, "mask": mask}
    snap = Snapshot.take(lin)
    r = torchmagic.meta_shape("y = lin(x[mask])\nz = y.sum()", ns)
    snap.assert_unchanged()
    assert r.mode == "fake" and "ran again on fake tensors" in r.notes[0]
    assert [(v.name, str(v.shape)) for v in r.values] == [("y", "(u0, 3)"), ("z", "()")]
    assert set(ns) == {"lin", "x", "mask"}  # nothing written back
    with pytest.raises(ForwardError) as info:
        torchmagic.meta_shape("y = lin(x) if mask.all() else lin(x) * 2", ns)
    assert "branches on" in str(info.value) and "torch._check" in str(info.value)
    assert "stopped at the branch below" in info.value.partial.notes[0]
