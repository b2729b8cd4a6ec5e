"""``%%detect_anomaly`` and ``torchmagic.find_anomaly``: forward origin, spread, backward node."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot
from torch.utils._python_dispatch import TorchDispatchMode

from torchmagic.core.anomaly import find_anomaly

SETUP = """
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
with torch.no_grad():
    mlp[0].weight.mul_(1e10)
    mlp[2].weight.mul_(1e30)
x = torch.randn(4, 8)
"""


def overflow_mlp() -> tuple[nn.Module, torch.Tensor]:
    ns: dict = {"torch": torch, "nn": nn}
    exec(SETUP, ns)  # noqa: S102
    return ns["mlp"], ns["x"]


def first_bad_layer(mlp: nn.Sequential, x: torch.Tensor) -> int:
    """Independent reference: run the layers one by one and find the first non-finite output."""
    h = x
    with torch.no_grad():
        for i, layer in enumerate(mlp):
            assert torch.isfinite(h).all()
            h = layer(h)
            if not torch.isfinite(h).all():
                return i
    raise AssertionError("no overflow")


# -- forward origin ---------------------------------------------------------------------------------
def test_mlp_overflow_origin_and_spread(ip):
    ip.run_cell(SETUP)
    bad = first_bad_layer(ip.user_ns["mlp"], ip.user_ns["x"])
    value, shown = run(ip, "detect_anomaly", "h = mlp(x)\nloss = h.sum()\nloss")
    assert torch.isnan(value) and value is ip.user_ns["loss"]
    assert "h" in ip.user_ns  # the cell's assignments land in the namespace
    assert shown.startswith(f"NaN/Inf found: forward Inf born in aten.addmm in mlp.{bad} at cell line 1")
    assert f"module   mlp.{bad} (Linear)" in shown
    assert "line     cell line 1: h = mlp(x)" in shown
    expected_inf = int(torch.isinf(ip.user_ns["mlp"][: bad + 1](ip.user_ns["x"])).sum())
    assert f"output   (4, 16): 0 NaN, {expected_inf} Inf" in shown
    spread = shown.split("Spread:")[1]
    for path in (f"mlp.{bad}", f"mlp.{bad + 1}", "mlp "):
        assert path in spread
    assert all(len(line) <= 100 for line in shown.splitlines())


def test_core_report_matches_reference():
    mlp, x = overflow_mlp()
    bad = first_bad_layer(mlp, x)
    rep = find_anomaly(lambda: mlp(x), namespace={"mlp": mlp})
    assert rep.origin_kind == "born"
    o = rep.origin
    assert (o.op, o.module_path, o.module_class) == ("aten.addmm", f"mlp.{bad}", "Linear")
    with torch.no_grad():
        ref = mlp[: bad + 1](x)
    assert o.nan == int(torch.isnan(ref).sum()) and o.inf == int(torch.isinf(ref).sum())
    assert o.output_shapes == [tuple(ref.shape)]
    assert [s.module_path for s in rep.spread][:2] == [f"mlp.{bad}", f"mlp.{bad + 1}"]
    assert rep.spread[-1].module_path == "mlp"
    json.dumps(rep.to_dict())
    assert "mlp." in rep._repr_html_() and "<script" not in rep._repr_html_()


def test_functional_code_outside_modules(ip):
    ip.user_ns["z"] = torch.tensor([1.0, 2.0, 3.0])
    _, shown = run(ip, "detect_anomaly", "a = z * 2\nb = torch.log(-a)\nc = b + 1")
    assert "forward NaN born in aten.log at cell line 2" in shown
    assert "module   none (functional code outside any module)" in shown
    assert "output   (3,): 3 NaN, 0 Inf" in shown


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = Branch()

    def forward(self, x):
        h = self.body(x)
        return self.head(h)


class Branch(nn.Module):
    def forward(self, h):
        return h * 2, torch.sqrt(h - 100.0)


def test_model_with_tuple_outputs(ip):
    ip.user_ns.update(net=TwoHeads(), x=torch.ones(2, 4))
    value, shown = run(ip, "detect_anomaly", "a, b = net(x)\na.shape")
    assert value == (2, 4)
    assert "forward NaN born in aten.sqrt in net.head at cell line 1" in shown
    assert "module   net.head (Branch)" in shown
    rep = find_anomaly(lambda: ip.user_ns["net"](torch.ones(2, 4)), namespace=ip.user_ns)
    # sub before sqrt is finite; sqrt is the birth
    assert rep.origin.op == "aten.sqrt" and rep.origin.module_path == "net.head"
    assert [s.module_path for s in rep.spread] == ["net.head", "net"]


def test_module_created_in_the_cell_is_named(ip):
    _, shown = run(ip, "detect_anomaly",
                   "m = nn.Sequential(nn.Identity(), nn.Linear(2, 2))\n"
                   "with torch.no_grad():\n    m[1].weight.fill_(1e38)\n"
                   "m(torch.full((1, 2), 1e38))")
    assert "forward Inf born in aten.addmm in m.1 at cell line 4" in shown
    assert "module   m.1 (Linear)" in shown


def test_log_of_negative_caught_in_forward_where_torch_misses_it(ip):
    # Reference: torch's own anomaly mode lets this pass (finite gradient).
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly(check_nan=True):
            torch.log(-x).sum().backward()
    ip.user_ns["x"] = torch.tensor([1.0, 2.0], requires_grad=True)
    _, shown = run(ip, "detect_anomaly", "loss = torch.log(-x).sum()\nloss.backward()")
    assert shown.startswith("NaN/Inf found: forward NaN born in aten.log at cell line 1")
    assert ip.user_ns["x"].grad is not None  # the cell really ran


def test_first_n_lists_births(ip):
    ip.user_ns["z"] = torch.tensor([1.0, 0.0])
    _, shown = run(ip, "detect_anomaly --first 3", "a = torch.log(-z)\nb = 1 / z\nc = torch.sqrt(-z - 1)")
    assert "Births: first 3 of 3" in shown
    table = shown.split("Births:")[1]
    ops = [ln.split()[1] for ln in table.splitlines() if ln.strip()[:1].isdigit()]
    assert ops == ["aten.log", "aten.reciprocal", "aten.sqrt"]
    assert "cell line 1" in table and "cell line 2" in table and "cell line 3" in table


def test_attention_mask_is_not_an_anomaly_but_fully_masked_row_is(ip):
    ip.user_ns["att"] = torch.randn(4, 4)
    _, shown = run(ip, "detect_anomaly",
                   "mask = torch.full((4, 4), float('-inf')).triu(1)\np = torch.softmax(att + mask, -1)")
    assert shown.startswith("no NaN/Inf in forward or backward")
    assert "1 ±inf mask ignored" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    _, shown = run(ip, "detect_anomaly",
                   "m = att.masked_fill(torch.ones(4, 4, dtype=torch.bool), float('-inf'))\n"
                   "p = torch.softmax(m, -1)")
    assert "forward NaN born in aten._softmax from inputs holding Inf at cell line 2" in shown


def test_input_that_already_holds_nan(ip):
    ip.user_ns["v"] = torch.tensor([1.0, float("nan")])
    _, shown = run(ip, "detect_anomaly", "w = v * 2")
    assert "entered through aten.mul" in shown
    assert "a tensor given to the code already held NaN" in shown


# -- backward ----------------------------------------------------------------------------------------
def test_backward_nan_from_sqrt_of_zero(ip):
    ip.user_ns["x"] = torch.zeros(3, requires_grad=True)
    value, shown = run(ip, "detect_anomaly",
                       "y = torch.where(x > 0, torch.sqrt(x), 0.0)\nloss = y.sum()\nloss.backward()\n7")
    # torch's anomaly mode raised inside backward: that is the finding, not an error
    assert value is None
    assert "backward NaN in SqrtBackward0" in shown
    assert "forward line cell line 1: y = torch.where(x > 0, torch.sqrt(x), 0.0)" in shown
    assert "Function 'SqrtBackward0' returned nan values in its 0th output." in shown
    assert "torch/" not in shown  # trimmed to user code
    assert not torch.is_anomaly_enabled()


def test_backward_inf_gradient_which_anomaly_mode_does_not_check(ip):
    ip.user_ns["x"] = torch.zeros(3, requires_grad=True)
    _, shown = run(ip, "detect_anomaly", "loss = torch.sqrt(x).sum()\nloss.backward()")
    assert "backward Inf in SqrtBackward0 (from cell line 1)" in shown
    assert torch.isinf(ip.user_ns["x"].grad).all()  # independent reference: the grads are inf


def test_backward_in_user_function_names_user_file_line():
    x = torch.zeros(2, requires_grad=True)

    def step():
        y = torch.where(x > 0, x.sqrt(), 0.0)
        y.sum().backward()

    rep = find_anomaly(step)
    assert rep.backward.node == "SqrtBackward0" and rep.backward.raised
    fl = rep.backward.forward_line
    assert fl.filename == __file__ and fl.source == "y = torch.where(x > 0, x.sqrt(), 0.0)"
    assert "SqrtBackward0" in str(rep)


def test_no_backward_flag_skips_backward(ip):
    ip.user_ns["x"] = torch.zeros(3, requires_grad=True)
    _, shown = run(ip, "detect_anomaly --no-backward",
                   "y = torch.where(x > 0, torch.sqrt(x), 0.0)\ny.sum().backward()")
    assert shown.strip() == "no NaN/Inf in forward (checked 5 forward ops; backward not checked)"
    assert ip.user_ns["x"].grad is not None and torch.isnan(ip.user_ns["x"].grad).all()


# -- clean run, errors, passthrough ------------------------------------------------------------------
def test_clean_run_is_one_line(ip):
    ip.user_ns.update(m=nn.Linear(3, 2), x=torch.ones(4, 3))
    value, shown = run(ip, "detect_anomaly", "out = m(x)\nout.sum().backward()\nout.shape")
    assert value == (4, 2)
    assert shown.strip().count("\n") == 0
    assert shown.startswith("no NaN/Inf in forward or backward (checked ")


def test_user_exception_reraised_unchanged_after_report(ip):
    ip.user_ns["z"] = torch.ones(2)
    with pytest.raises(ValueError) as info:
        run(ip, "detect_anomaly", "b = torch.log(-z)\nerr = ValueError('mine')\nraise err")
    assert info.value is ip.user_ns["err"]
    assert "b" in ip.user_ns


def test_user_exception_report_is_shown(ip):
    from IPython.utils.capture import capture_output

    with capture_output() as cap, pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("detect_anomaly", "", "q = 1 / 0")
    text = cap.stdout + "".join(o.data["text/plain"] for o in cap.outputs)
    assert "The cell raised ZeroDivisionError: division by zero at cell line 1" in text


def test_user_warnings_are_given_back(ip):
    with pytest.warns(UserWarning, match="careful"):
        run(ip, "detect_anomaly", "import warnings\nwarnings.warn('careful')")


@pytest.mark.parametrize("line,cell,msg", [
    ("detect_anomaly --first 0", "1", "--first must be 1 or more"),
    ("detect_anomaly --no-forward --no-backward", "1", "nothing to check"),
    ("detect_anomaly", "x = (", "not valid Python"),
    ("detect_anomaly", "   ", "the cell is empty"),
    ("detect_anomaly --bogus", "1", "unknown option"),
])
def test_bad_input_is_one_line(ip, line, cell, msg):
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    assert msg in str(info.value) and "\n" not in str(info.value)


# -- state invariants --------------------------------------------------------------------------------
def _snap(ip):
    ip.user_ns.update(m=nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), x=torch.ones(4, 3))
    ip.user_ns["m"].eval()
    torch.autograd.set_detect_anomaly(True, check_nan=False)  # the user's own setting
    return Snapshot.take(m=ip.user_ns["m"], x=ip.user_ns["x"]), list(warnings.filters)


def _check(snap, filters):
    try:
        snap.assert_unchanged()
        assert warnings.filters == filters
        assert torch.is_anomaly_enabled() and not torch.is_anomaly_check_nan_enabled()
    finally:
        torch.autograd.set_detect_anomaly(False)


def test_state_on_success(ip):
    snap, filters = _snap(ip)
    run(ip, "detect_anomaly", "with torch.no_grad():\n    y = m(x)\ny.log()")
    _check(snap, filters)


def test_state_on_exception(ip):
    snap, filters = _snap(ip)
    with pytest.raises(RuntimeError, match="shapes"):
        run(ip, "detect_anomaly", "with torch.no_grad():\n    y = m(torch.ones(2, 5))")
    _check(snap, filters)


def test_state_on_keyboard_interrupt(ip):
    snap, filters = _snap(ip)
    with pytest.raises(KeyboardInterrupt):
        run(ip, "detect_anomaly", "with torch.no_grad():\n    y = m(x).log()\nraise KeyboardInterrupt")
    _check(snap, filters)


def test_state_after_backward_anomaly(ip):
    ip.user_ns["w"] = torch.zeros(2, requires_grad=True)
    snap, filters = _snap(ip)
    run(ip, "detect_anomaly", "torch.where(w > 0, w.sqrt(), 0.0).sum().backward()")
    _check(snap, filters)


# -- plain Python -------------------------------------------------------------------------------------
def test_context_manager_and_exception_keep_report():
    z = torch.ones(2)
    with find_anomaly() as found:
        torch.log(-z)
    assert found.report.origin.op == "aten.log"
    with pytest.raises(KeyError):
        with find_anomaly() as found:
            torch.log(-z)
            raise KeyError("k")
    assert found.report.origin.op == "aten.log" and found.report.error == "KeyError: 'k'"


def test_find_anomaly_names_closure_modules_and_reraises():
    mlp, x = overflow_mlp()

    def fn():
        return mlp(x)

    rep = find_anomaly(fn)
    assert rep.origin.module_path.startswith("mlp.")
    with pytest.raises(TypeError):
        find_anomaly(lambda: mlp("not a tensor"))
    with pytest.raises(ValueError, match="function to call"):
        find_anomaly(3)  # type: ignore[call-overload]


def test_clean_report_and_widget():
    rep = find_anomaly(lambda: torch.ones(3).sum())
    assert rep.clean and str(rep).startswith("no NaN/Inf in forward or backward")
    widget = rep._renderer().widget(rep)
    assert widget is not None
    mlp, x = overflow_mlp()
    bad = find_anomaly(lambda: mlp(x), namespace={"mlp": mlp})
    w = bad._renderer().widget(bad)
    assert '<div class="tm-error" ' in w.children[1].value  # the origin, in the error box


@requires_cuda
def test_cuda_forward_origin_is_found(ip):
    mlp, x = overflow_mlp()
    ip.user_ns.update(mlp=mlp.cuda(), x=x.cuda())
    _, shown = run(ip, "detect_anomaly", "h = mlp(x)\nh.sum().backward()")
    assert "in mlp.2 at cell line 1" in shown
    rep = find_anomaly(lambda: ip.user_ns["mlp"](ip.user_ns["x"]), namespace=ip.user_ns)
    assert rep.origin.module_path == "mlp.2" and rep.device == "cuda"


def test_clean_verdict_fits_100_columns_with_masks_and_backward(ip):
    """The one-line verdict of a realistic masked-attention training step stays within 100
    columns and counts in the singular where it should."""
    ip.user_ns["q"] = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, shown = run(ip, "detect_anomaly",
                   "att = q @ q.transpose(-1, -2)\n"
                   "att = att.masked_fill(~torch.tril(torch.ones(8, 8)).bool(), float('-inf'))\n"
                   "att.softmax(-1).sum().backward()")
    assert shown.startswith("no NaN/Inf in forward or backward (checked ")
    assert "1 ±inf mask ignored" in shown
    assert all(len(line) <= 100 for line in shown.splitlines()), shown
    ip.user_ns["x"] = torch.ones(3)
    _, shown = run(ip, "detect_anomaly", "y = x + 1")
    assert "checked 1 forward op;" in shown


def test_device_deferred_path_on_cpu(monkeypatch):
    """The CUDA path (counts kept on the device, read once at the end) run on CPU tensors: same
    origin as the independent layer-by-layer reference, no per-op host read, and an in-place op on
    a tensor that already held NaN is not taken for the NaN's birth."""
    from torchmagic.core import anomaly_check as core

    monkeypatch.setattr(core._Checker, "_deferred", staticmethod(lambda t: True))

    def no_host_read(t):
        raise AssertionError("per-op host read on the deferred path")

    monkeypatch.setattr(core, "_host_bad", no_host_read)
    mlp, x = overflow_mlp()
    rep = find_anomaly(lambda: mlp(x).sum(), namespace={"mlp": mlp})
    assert rep.origin.module_path == f"mlp.{first_bad_layer(mlp, x)}" and rep.origin_kind == "born"
    assert rep.origin.op == "aten.addmm" and rep.spread

    data = torch.tensor([float("nan"), 1.0, 2.0])
    rep = find_anomaly(lambda: data.mul_(2), namespace={})
    assert rep.origin is not None and rep.origin.op == "aten.mul_" and rep.origin_kind == "input"
    assert rep.births_total == 0
    clean = torch.ones(3)
    rep = find_anomaly(lambda: clean.div_(0), namespace={})
    assert rep.origin.op == "aten.div_" and rep.origin_kind == "born" and rep.origin.inf == 3


def test_in_place_op_on_a_nan_tensor_is_not_the_birth():
    """Host path: the old content of an in-place op's target counts as its input."""
    data = torch.tensor([float("nan"), 1.0, 2.0])
    rep = find_anomaly(lambda: data.mul_(2), namespace={})
    assert rep.origin.op == "aten.mul_" and rep.origin_kind == "input" and rep.births_total == 0


# -- issue 11: the detector never blames itself and says what the inputs held -----------------------
class _FirstNaN(TorchDispatchMode):
    """Independent reference: every op whose output holds a NaN its inputs did not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        flat = [t for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point()]
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if any(bool(torch.isnan(t).any()) for t in flat) and \
                not any(bool(torch.isnan(t).any()) for t in ins):
            self.ops.append(f"aten.{func.overloadpacket.__name__}")
        return out


def test_inf_in_a_llama_weight_blames_the_real_first_nan_not_the_detector(ip):
    from torchmagic.models import Llama, LlamaConfig

    torch.manual_seed(0)
    llama = Llama(LlamaConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, n_kv_head=2,
                              d_ff=32))
    with torch.no_grad():
        llama.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    ids = torch.randint(0, 50, (1, 6))
    with _FirstNaN() as ref, torch.no_grad():
        llama(ids)
    assert ref.ops, "the planted Inf must produce a NaN somewhere"
    def forward():
        with torch.no_grad():
            return llama(ids)

    rep = find_anomaly(forward, namespace={"llama": llama}, first=8, backward=False)
    nan_births = [e.op for e in rep.births if e.nan]
    assert nan_births == ref.ops[: len(nan_births)]  # the same ops, in the same order
    assert rep.origin.op == rep.births[0].op and "aten.sum" not in nan_births
    ip.user_ns.update(llama=llama, ids=ids)
    _, shown = run(ip, "detect_anomaly", "with torch.no_grad():\n    out = llama(ids)")
    assert f"born in {rep.origin.op}" in shown and "born in aten.sum" not in shown


def test_nan_from_an_inf_input_says_so(ip):
    x = torch.tensor([0.0, float("inf")], requires_grad=True)
    ip.user_ns["x"] = x
    _, shown = run(ip, "detect_anomaly --no-backward", "y = torch.where(x < 1, torch.cos(x), 0)")
    rep = find_anomaly(lambda: torch.where(x < 1, torch.cos(x), 0), backward=False)
    assert rep.origin.op == "aten.cos" and rep.origin.input_inf and not rep.origin.input_nan
    assert "from inputs holding Inf" in rep.summary and "from finite inputs" not in shown
    assert "first op to produce NaN from inputs holding Inf" in shown


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("cell", [
    "torch.autograd.set_detect_anomaly(True)",
    "torch.autograd.set_detect_anomaly(True, check_nan=False)",
    "with torch.autograd.detect_anomaly():\n    pass",
    "torch.autograd.set_detect_anomaly(False)",
    "flag = torch.is_anomaly_enabled()",
])
@pytest.mark.parametrize("start", [False, True])
def test_anomaly_mode_the_cell_sets_is_kept_like_a_plain_cell(ip, cell, start):
    try:
        torch.autograd.set_detect_anomaly(start)
        ip.run_cell(cell)  # the plain cell: the reference
        expected = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled(),
                    ip.user_ns.get("flag"))
        torch.autograd.set_detect_anomaly(start)
        run(ip, "detect_anomaly", cell)
        got = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled(),
               ip.user_ns.get("flag"))
        assert got == expected
        assert torch.is_anomaly_enabled is torch._C.is_anomaly_enabled  # routing undone
    finally:
        torch.autograd.set_detect_anomaly(False)


def test_cell_producing_a_nested_tensor(ip):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, shown = run(ip, "detect_anomaly",
                       "nt = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])\n"
                       "y = nt * 2")
    assert shown.startswith("no NaN/Inf")
