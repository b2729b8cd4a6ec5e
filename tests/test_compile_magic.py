"""``%%compile`` and ``%compile``: the cell as one compiled function, its lines, its namespace,
reruns for --bench/--check, errors, and the text/HTML display."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn as nn
from conftest import outputs, run
from IPython.core.error import UsageError
from test_compile import _explain, check_one_story, torch_per_call


class HereNet(nn.Module):
    """A small model with a graph break (the print). Defined here for explain's reference run
    (its compiled code then lands in this module's globals: the test shell's namespace is
    emptied after each test, which dynamo's cleanup hooks dislike); ``_setup`` defines the same
    class in the notebook."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        print("in forward")
        return x.relu()


@pytest.fixture
def html_mode(ip):
    """HTML output for this test only (%config persists on the shell across tests)."""
    ip.run_line_magic("config", "TorchMagic.display = 'html'")
    yield ip
    ip.run_line_magic("config", "TorchMagic.display = 'auto'")


def _setup(ip):
    """``model`` of the class above, defined in the notebook (its forward lives in an IPython
    input, its globals are the namespace), and ``x``."""
    torch.manual_seed(0)
    ip.run_cell(inspect.getsource(HereNet))
    ip.user_ns.update(model=ip.user_ns["HereNet"](), x=torch.randn(2, 4))


CELL = "y = model(x)\nz = y.sin()\nw = z.sum().item()\nz.cos()"


def test_cell_lines_assignments_and_value(ip):
    _setup(ip)
    ref_x = ip.user_ns["x"].clone()
    value, shown = run(ip, "compile --backend eager -o rep", CELL)
    ns = ip.user_ns
    rep = ns["rep"]
    # assignments land as a normal cell's would; the last expression is the cell's value
    expect_y = ns["model"](ref_x)
    assert torch.allclose(ns["y"], expect_y) and torch.allclose(ns["z"], expect_y.sin())
    assert ns["w"] == pytest.approx(float(expect_y.sin().sum().detach()))
    assert torch.allclose(value, expect_y.sin().cos())
    # dynamo's own count for the same cell, as a function
    kinds = [(b.kind, b.cell_line) for b in rep.graph_breaks]
    assert ("print", 1) in kinds and ("item", 3) in kinds
    forward_line = [b for b in rep.graph_breaks if b.kind == "print"][0].place
    assert forward_line.code == 'print("in forward")' and forward_line.modules == ["model"]
    assert "cell line 1 -> " in shown and "cell line 3" in shown
    assert shown.count("in forward") >= 1  # the cell's own print ran


def test_cell_count_equals_explain_of_the_same_function(ip):
    from torchmagic.core.compile_cell import cell_function

    torch.manual_seed(0)
    ip.user_ns.update(model=HereNet(), x=torch.randn(2, 4))  # this module's class
    ns = ip.user_ns
    cf = cell_function(CELL)
    fn = cf.function(dict(ns))  # explain installs its globals there (and resets dynamo)
    ref = _explain(fn, *cf.arguments(ns), modules=[ns["model"]])
    _, _ = run(ip, "compile --backend eager -o rep", CELL)
    rep = ns["rep"]
    assert rep.graph_count == ref.graph_count
    assert rep.graph_break_count == len(ref.break_reasons)
    assert [b.title for b in rep.graph_breaks] == [r.reason.splitlines()[0]
                                                  for r in ref.break_reasons]


def test_cell_semantics_read_modify_write_and_del(ip):
    ip.user_ns.update(a=torch.ones(3), gone=1)
    value, _ = run(ip, "compile --backend eager", "a = a * 2\nb = a + 1\ndel gone\nb.sum()")
    ns = ip.user_ns
    assert torch.equal(ns["a"], torch.full((3,), 2.0)) and torch.equal(ns["b"], torch.full((3,), 3.0))
    assert "gone" not in ns and float(value) == 9.0
    assert not [k for k in ns if k.startswith(("__compiled_fn", "__resume_at", "__builtins_dict"))]


def test_runs_repeat_the_cell_and_report_recompiles(ip):
    ip.run_cell("class Counter(nn.Module):\n"
                "    def __init__(self):\n"
                "        super().__init__()\n"
                "        self.n = 0\n"
                "    def forward(self, x):\n"
                "        self.n += 1\n"
                "        return x * self.n\n")
    ip.user_ns.update(counter=ip.user_ns["Counter"](), x=torch.ones(2))
    _, shown = run(ip, "compile --backend eager --runs 3 -o rep", "out = counter(x)")
    rep = ip.user_ns["rep"]
    assert ip.user_ns["counter"].n == 3  # the cell ran 3 times, as asked
    assert torch.equal(ip.user_ns["out"], torch.full((2,), 3.0))
    assert rep.runs == 3 and len(rep.recompiles) == 2
    assert {rc.kind for rc in rep.recompiles} == {"value"}
    assert "allow_unspec_int_on_nn_module" in shown


def test_user_error_in_the_cell_is_reraised_unchanged(ip):
    _setup(ip)
    with pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("compile", "--backend eager", "k = 1\nq = k / 0")
    assert "k" not in ip.user_ns and "q" not in ip.user_ns  # nothing half-done


def test_bench_and_check_rerun_on_copies(ip):
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ip.user_ns.update(bn=bn, x=torch.randn(8, 4))
    stats = bn[1].running_mean.clone()
    _, shown = run(ip, "compile --backend eager --bench --check --min-time 0.02 -o rep",
                   "y = bn(x)\nnoise = torch.randn(3)\ny.sum()")
    rep = ip.user_ns["rep"]
    # the real run updated the statistics once (train mode), the reruns on copies did not
    assert bn[1].num_batches_tracked.item() == 1 and not torch.equal(bn[1].running_mean, stats)
    assert rep.timing is not None and rep.check is not None and rep.skipped is None
    assert {d.name for d in rep.check} == {"out", "y", "noise"}
    assert all(d.close for d in rep.check)  # randn: the eager rerun replays the same RNG
    assert "Eager vs compiled" in shown and "Check: eager vs compiled" in shown


def test_bench_refuses_a_cell_that_changes_tensors_in_place(ip):
    ip.user_ns.update(t=torch.zeros(3))
    _, shown = run(ip, "compile --backend eager --bench -o rep", "t.add_(1)\nt.sum()")
    rep = ip.user_ns["rep"]
    assert torch.equal(ip.user_ns["t"], torch.ones(3))  # once: the cell's own run, no reruns
    assert rep.timing is None and "--bench/--check skipped" in rep.skipped
    assert "t: values" in rep.skipped


def test_line_magic_on_a_model_with_shape_inputs_and_then(ip):
    _setup(ip)
    model = ip.user_ns["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    value, shown = run(ip, "compile model (2,4) --then (5,4) --backend eager -o rep")
    rep = ip.user_ns["rep"]
    assert value is None and rep.kind == "module" and rep.target == "model"
    assert rep.runs == 2 and [rc.kind for rc in rep.recompiles] == ["shape"]
    assert rep.recompiles[0].guard.endswith("expected 2, actual 5")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "torch._dynamo.mark_dynamic(x, 0)" in shown


def test_line_magic_takes_tensors_and_functions(ip):
    ip.user_ns.update(x=torch.randn(3), f=lambda t: t.sin() * 2)
    _, shown = run(ip, "compile f x --backend eager -o rep")
    rep = ip.user_ns["rep"]
    assert rep.kind == "function" and rep.graph_count == 1 and rep.clean
    assert "compiles cleanly" in shown


@pytest.mark.parametrize("line,cell,message", [
    ("compile --backend nope", "y = 1", "not a torch.compile backend"),
    ("compile --backend eager --mode max-autotune", "y = 1", "inductor backend only"),
    ("compile --runs 0 --backend eager", "y = 1", "at least 1"),
    ("compile --explain --bench", "y = 1", "--explain traces only"),
    ("compile --logs bogus --backend eager", "y = 1", "unknown TORCH_LOGS name"),
    ("compile --dynamic maybe", "y = 1", "--dynamic takes true or false"),
    ("compile model x", "y = 1", "takes only options"),
    ("compile --then (2,4)", "y = 1", "--then belong to %compile MODEL INPUTS"),
    ("compile --dtypes long", "y = 1", "--dtypes belong to %compile MODEL INPUTS"),
    ("compile --backend eager", "# only a comment", "only comments"),
    ("compile --backend eager", "y = (", "not valid Python"),
    ("compile --backend eager", "from math import *", "import \\*"),
    ("compile", None, "give a model and its inputs"),
    ("compile model", None, "give the inputs"),
    ("compile missing (2,4)", None, "name 'missing' is not defined"),
    ("compile model (2,4) --dtypes long,float --backend eager", None, "dtypes for 1 input"),
    ("compile model x --dtypes long --backend eager", None, "--dtypes applies to shape"),
    ("compile model (2,4) -o 1bad --backend eager", None, "-o needs a variable name"),
])
def test_bad_input_is_one_line(ip, line, cell, message):
    _setup(ip)
    with pytest.raises(UsageError, match=message) as info:
        name, _, rest = line.partition(" ")
        if cell is None:
            ip.run_line_magic(name, rest)
        else:
            ip.run_cell_magic(name, rest, cell)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(("%%compile: ", "%compile: "))


def test_missing_compiler_through_the_magic(ip):
    from torch._inductor import config

    _setup(ip)
    with config.patch({"cpp.cxx": ("no-such-compiler-here++",)}):
        with pytest.raises(UsageError, match="use --backend aot_eager"):
            ip.run_cell_magic("compile", "", "y = model(x)")
    assert "y" not in ip.user_ns


def test_meta_model_in_a_cell_is_one_line(ip):
    with torch.device("meta"):
        ip.user_ns["big"] = nn.Linear(4, 4)
    ip.user_ns["x"] = torch.randn(2, 4, device="meta")
    with pytest.raises(UsageError, match="big live\\(s\\) on the meta device"):
        ip.run_cell_magic("compile", "--backend eager", "y = big(x)")
    value, _ = run(ip, "compile --explain", "big(x).shape")
    assert value == (2, 4)


def test_fullgraph_in_a_cell_reports_and_does_not_run(ip):
    _setup(ip)
    _, shown = run(ip, "compile --fullgraph --backend eager -o rep", "y = model(x)")
    rep = ip.user_ns["rep"]
    assert "y" not in ip.user_ns and "in forward\n" not in shown.split("torch.compile")[0]
    assert rep.fullgraph_error.kind == "print" and rep.fullgraph_error.cell_line is None or \
        rep.fullgraph_error.place.code == 'print("in forward")'
    assert "fullgraph=True FAILS at" in shown


def test_text_fits_the_width_and_html_is_self_contained(html_mode, monkeypatch):
    ip = html_mode
    _setup(ip)
    monkeypatch.setenv("COLUMNS", "72")
    bundles = outputs(ip, "compile --backend eager --logs graph_breaks", CELL)
    text, html = bundles[-1]["text/plain"], bundles[-1]["text/html"]
    long = [ln for ln in text.splitlines() if len(ln) > 72 and " " in ln.strip()]
    assert not long, long
    assert "<script" not in html and "<details" in html
    anchors = re.findall(r'href="#(tm-compile-\d+-L\d+)"', html)
    assert anchors and all(f'id="{a}"' in html for a in anchors)  # each break links to its line
    assert "log <b>graph_breaks</b>" in html


def test_reload_keeps_one_magic(ip):
    ip.run_line_magic("reload_ext", "torchmagic")
    assert "compile" in ip.magics_manager.magics["cell"]
    assert "compile" in ip.magics_manager.magics["line"]


def test_model_must_be_callable(ip):
    ip.user_ns["s"] = "y = 1"
    with pytest.raises(UsageError, match="s is a str: MODEL must be an nn.Module or a function"):
        ip.run_line_magic("compile", "s (2,2)")


def test_html_lists_recompiles_and_fullgraph_failure(html_mode):
    ip = html_mode
    _setup(ip)
    bundles = outputs(ip, "compile model (2,4) --then (3,4) --backend eager")
    html = bundles[-1]["text/html"]
    # x's size fails the guards of forward and of its part after the print: two frames
    # recompiled (torch's count), one failed guard listed
    ref = torch_per_call(HereNet(), [(torch.randn(2, 4),), (torch.randn(3, 4),)])
    assert ref[1]["recompiles"] == 2
    assert "Recompiles (2, 1 listed" in html and "size mismatch at index 0" in html
    assert "torch._dynamo.mark_dynamic(x, 0)" in html
    bundles = outputs(ip, "compile model (2,4) --fullgraph --backend eager")
    html, text = bundles[-1]["text/html"], bundles[-1]["text/plain"]
    assert "Where fullgraph=True fails" in html and "fullgraph=True FAILS at" in text


def test_a_cell_without_tensor_work_says_nothing_was_captured(ip):
    value, shown = run(ip, "compile --backend eager -o rep", "a = 1 + 2\na * 2")
    assert value == 6 and ip.user_ns["a"] == 3
    rep = ip.user_ns["rep"]
    assert rep.graph_count == 0 and "dynamo captured no graph" in rep.notes[-1]
    assert "everything ran eagerly" in shown


def test_public_names_are_lazy_exports():
    import subprocess
    import sys

    code = ("import sys, torchmagic; assert 'torch' not in sys.modules; "
            "from torchmagic import explain_compile, CompileReport; "
            "print(explain_compile.__module__, CompileReport.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torchmagic.core.compile", "CompileReport"]


PEAK_CELL = "out = peak(torch.randn(4, 8))\nout.shape"


def _html_text(html):
    """The words of an HTML report, tags dropped and entities decoded."""
    import html as html_lib

    return html_lib.unescape(re.sub(r"<[^>]+>", "\n", html))


def test_cell_runs_header_table_and_html_count_like_torch(html_mode, monkeypatch):
    """%%compile --runs 3 on a cell whose .item() value changes every call: the header's counts
    of call 1 and calls 2-3 are torch's, the text table and the HTML table have the rows they
    add up to, and the HTML says what the text says."""
    from test_compile import peak

    from torchmagic.core.compile_cell import cell_function

    ip = html_mode
    monkeypatch.setenv("COLUMNS", "100")
    ip.user_ns["peak"] = peak
    torch.manual_seed(0)
    ns = dict(ip.user_ns)
    cf = cell_function(PEAK_CELL)
    ref = torch_per_call(cf.function(ns), [cf.arguments(ns)] * 3)
    assert ref[1]["recompiles"] >= 1 and sum(r["graphs"] for r in ref[1:]) >= 1  # can differ
    torch.manual_seed(0)
    bundles = outputs(ip, "compile --backend eager --runs 3 -o rep", PEAK_CELL)
    rep = ip.user_ns["rep"]
    text, html = bundles[-1]["text/plain"], bundles[-1]["text/html"]
    check_one_story(rep, text, ref)
    assert text.splitlines()[1].startswith("call 1: ") and "calls 2-3: " in text
    # the HTML: the same header lines and titles, and one table row per graph
    words = _html_text(html)
    for line in text.splitlines()[1:3]:
        assert line in words
    assert f"Graphs ({len(rep.graphs)}: {rep.graph_count} in call 1, " in words
    assert f"Recompiles ({rep.recompile_count}" in words
    table = html.split("Graphs (", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") - 1 == len(rep.graphs)  # the header row, then one per graph
