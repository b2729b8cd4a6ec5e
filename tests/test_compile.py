"""``torchmagic.explain_compile``: graph breaks and recompiles known by construction, each checked
against ``torch._dynamo.explain`` on the same code (computed here), exact lines and kinds.

dynamo runs with the ``eager`` backend here: AOT autograd (``aot_eager``, inductor) leaves
tensors alive for the rest of the process (``PhiloxStateTracker``), which tests counting live
tensors would see; the inductor tests run in subprocesses (``test_compile_inductor.py``, slow).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn as nn

from torchmagic.core.compile import explain_compile
from torchmagic.core.errors import ForwardError, TorchMagicError


def _line_of(fn, needle: str) -> int:
    """The file line number of the first source line of ``fn`` that contains ``needle``."""
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if needle in text:
            return start + i
    raise AssertionError(f"{needle!r} not in {fn}")


def _explain(fn, *args, modules=()):
    """dynamo's own answer. ``explain`` resets dynamo (fine in a test) but leaves its compiled
    functions in the globals of the code it compiled, keeping fake tensors alive that later
    tests (``%gpumem --top``) would count: it runs in the magic's sandbox, which removes them
    and puts dynamo's counters back (the counts are explain's own)."""
    from torchmagic.core.compile_run import _scopes
    from torchmagic.core.compile_sandbox import DynamoSandbox

    mods = [fn, *modules] if isinstance(fn, nn.Module) else list(modules)
    with DynamoSandbox() as sandbox:
        for scope in _scopes(mods, getattr(fn, "__globals__", None)):
            sandbox.watch_scope(scope)
        return torch._dynamo.explain(fn)(*args)


# -- code whose graph breaks are known by construction ----------------------------------------
def with_print(x):
    y = x.sin()
    print("tracing is here")
    return y.cos()


def item_in_branch(x):
    y = x * 2
    if y.sum().item() > 0:
        return y + 1
    return y - 1


def data_dependent_if(x):
    y = x.relu()
    if y.sum() > 0:
        y = y * 3
    return y.exp()


def unsupported_builtin(x):
    y = x.sin()
    names = globals()
    return y.cos() + len(names) * 0


CASES = [
    (with_print, 'print("tracing', ["print"]),
    (item_in_branch, "if y.sum().item()", ["item"]),
    (data_dependent_if, "if y.sum() > 0", ["data-dependent branch"]),
    (unsupported_builtin, "names = globals()", ["unsupported builtin"]),
]


@pytest.mark.parametrize("fn,needle,kinds", CASES, ids=[c[0].__name__ for c in CASES])
def test_break_counts_lines_and_kinds_match_explain(fn, needle, kinds, capsys):
    x = torch.randn(4, 3) + 1  # positive: data_dependent_if takes its branch
    ref = _explain(fn, x)
    report = explain_compile(fn, x, backend="eager")
    assert report.graph_count == ref.graph_count
    assert report.graph_break_count == len(ref.break_reasons) == ref.graph_break_count
    assert [b.reason for b in report.graph_breaks] == [r.reason for r in ref.break_reasons]
    line = _line_of(fn, needle)
    assert [b.kind for b in report.graph_breaks] == kinds * len(kinds)
    for b in report.graph_breaks:
        assert b.place is not None and b.place.line == line
        assert b.place.filename == __file__ and b.place.function == fn.__name__
        assert b.place.code.startswith(needle.split("(")[0])
        assert b.explanation and b.run == 1
    assert report.kind == "function" and report.runs == 1
    json.dumps(report.to_dict())


def test_item_break_names_torch_hint_and_site():
    report = explain_compile(item_in_branch, torch.randn(3), backend="eager")
    b = report.graph_breaks[0]
    assert b.kind == "item"
    assert any("capture_scalar_outputs" in h for h in b.hints)
    assert b.gb_id and b.gb_id.startswith("GB") and b.url.endswith(b.gb_id.lower() + ".html")


def test_clean_function_is_one_graph_and_its_ops_are_counted():
    def clean(x):
        return torch.relu(x @ x.T) + x.sum()

    x = torch.randn(4, 4)
    report = explain_compile(clean, x, backend="eager")
    ref = _explain(clean, x)
    assert report.graph_count == ref.graph_count == 1 and report.clean
    assert report.graph_breaks == [] and report.recompiles == []
    # explain's op_count counts call_function nodes; ours also call_method/call_module nodes
    names = dict(report.graphs[0].op_names)
    assert names["matmul"] == names["relu"] == names["add"] == 1
    assert report.graphs[0].ops >= ref.op_count
    assert report.op_count == report.graphs[0].ops


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = self.fc(x)
        print("inner forward")
        return x.relu()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Inner(), Inner()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_module_breaks_name_the_module_path_and_match_explain():
    model = Outer()
    x = torch.randn(2, 8)
    ref = _explain(model, x)
    report = explain_compile(model, x, backend="eager", name="net")
    assert report.graph_count == ref.graph_count
    assert report.graph_break_count == len(ref.break_reasons)
    line = _line_of(Inner.forward, 'print("inner forward")')
    prints = [b for b in report.graph_breaks if b.kind == "print"]
    assert prints and all(b.place.line == line for b in prints)
    place = prints[0].place
    assert place.module_class == "Inner"
    assert place.modules == ["net.blocks.0"]  # the caller (Outer.forward's loop) tells which
    assert "Inner.forward" in place.where() and "net.blocks.0" in place.where()
    assert report.kind == "module" and report.target == "net"


def test_module_with_a_python_counter_recompiles_with_torch_hint():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x) * self.calls

    model = Counter()
    x = torch.randn(2, 4)
    report = explain_compile(model, x, runs=4, backend="eager")
    assert model.calls == 0  # ran on a private copy
    assert report.runs == 4 and len(report.recompiles) == 3  # calls 2, 3 and 4
    assert [rc.run for rc in report.recompiles] == [2, 3, 4]
    first = report.recompiles[0]
    assert first.kind == "value" and first.guard == "self.calls == 0"
    assert first.place.line == _line_of(Counter.forward, "self.calls += 1")
    assert first.code == "torch._dynamo.config.allow_unspec_int_on_nn_module = True"
    assert "allow_unspec_int_on_nn_module" in first.hint
    # the advice, applied: the counter stops being a constant after one recompile
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        advised = explain_compile(model, x, runs=4, backend="eager")
    assert len(advised.recompiles) == 1 < len(report.recompiles)


def shape_user(x):
    return torch.tanh(x) * x.shape[0]


def test_shape_change_is_one_recompile_and_mark_dynamic_removes_it():
    a, b, c = torch.randn(4, 3), torch.randn(8, 3), torch.randn(16, 3)
    report = explain_compile(shape_user, a, calls=[b, c], backend="eager")
    assert report.runs == 3
    assert len(report.recompiles) == 1  # automatic dynamic shapes: 8 recompiles, 16 reuses it
    rc = report.recompiles[0]
    assert rc.kind == "shape" and rc.run == 2
    assert rc.guard == "tensor 'x' size mismatch at index 0. expected 4, actual 8"
    assert rc.code == "torch._dynamo.mark_dynamic(x, 0)"
    assert rc.place.function == "shape_user"
    # the advice, applied to the tensor passed as x: no recompile at all
    marked = torch.randn(4, 3)
    torch._dynamo.mark_dynamic(marked, 0)
    assert explain_compile(shape_user, marked, calls=[b, c], backend="eager").recompiles == []
    # and --dynamic (dynamic=True) from the start: none either
    assert explain_compile(shape_user, a, calls=[b, c], backend="eager",
                           dynamic=True).recompiles == []


def test_dtype_change_is_a_dtype_recompile():
    report = explain_compile(shape_user, torch.randn(3), calls=[torch.randn(3).double()],
                             backend="eager")
    assert [rc.kind for rc in report.recompiles] == ["dtype"]
    assert "dtype mismatch" in report.recompiles[0].guard


def test_fullgraph_reports_where_it_fails_and_nothing_runs(capsys):
    report = explain_compile(with_print, torch.randn(3), backend="eager", fullgraph=True)
    assert "tracing is here" not in capsys.readouterr().out
    err = report.fullgraph_error
    assert err is not None and err.kind == "print"
    assert err.place.line == _line_of(with_print, 'print("tracing')
    assert report.graph_count == 0 and any("fullgraph=True" in n for n in report.notes)
    # fullgraph on clean code: no error
    clean = explain_compile(torch.sin, torch.randn(3), backend="eager", fullgraph=True)
    assert clean.fullgraph_error is None and clean.graph_count == 1


def test_explain_mode_traces_without_code_generation():
    report = explain_compile(with_print, torch.randn(3), explain=True)
    assert report.explain_only and report.codegen_seconds is None
    assert report.graph_count == 2 and report.compile_seconds > 0


def test_check_compares_outputs_per_leaf():
    def two(x):
        return {"a": x.sin(), "b": (x.cos(), 3)}

    report = explain_compile(two, torch.randn(5), backend="eager", check=True)
    names = [d.name for d in report.check]
    assert names == ["out['a']", "out['b'][0]", "out['b'][1]"]
    assert all(d.close for d in report.check)
    assert report.check[0].shape == (5,) and report.check[0].dtype == "float32"
    assert report.check[0].max_abs == pytest.approx(0.0, abs=1e-6)


def test_check_matches_random_ops_by_replaying_the_rng():
    def noisy(x):
        return x + torch.randn_like(x)

    report = explain_compile(noisy, torch.zeros(6), backend="eager", check=True)
    assert report.check[0].equal  # eager rerun from the same RNG state: same numbers


def test_compare_outputs_reference_numbers():
    from torchmagic.core.compile_timing import compare_outputs

    eager = torch.tensor([1.0, 2.0, 4.0])
    compiled = torch.tensor([1.0, 2.5, 4.0])
    (d,) = compare_outputs(eager, compiled)
    assert d.max_abs == pytest.approx(0.5) and d.max_rel == pytest.approx(0.25)
    assert not d.equal and not d.close
    (same,) = compare_outputs(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    assert same.equal and same.close


def test_bench_times_both_sides_the_same_way():
    def mm(x):
        return (x @ x).relu().sum()

    report = explain_compile(mm, torch.randn(32, 32), backend="eager", bench=True,
                             min_time=0.02)
    t = report.timing
    assert t.eager_median > 0 and t.compiled_median > 0 and t.threads == torch.get_num_threads()
    assert t.speedup == pytest.approx(t.eager_median / t.compiled_median)
    assert t.first_call_seconds == report.first_call_seconds > t.compiled_median
    if t.eager_median > t.compiled_median:
        expect = (t.first_call_seconds - t.compiled_median) / (t.eager_median - t.compiled_median)
        assert t.break_even_calls == pytest.approx(expect)
    else:
        assert t.break_even_calls is None


def test_logs_are_captured_for_this_run_only(capfd):
    import logging

    from torch._logging import _internal

    dynamo_log = logging.getLogger("torch._dynamo")
    before = (dict(_internal.log_state.log_qname_to_level), set(_internal.log_state.artifact_names),
              list(dynamo_log.handlers), dynamo_log.level, dynamo_log.propagate)
    report = explain_compile(shape_user, torch.randn(2), calls=[torch.randn(5)], backend="eager",
                             logs="graph_breaks,recompiles")
    out, err = capfd.readouterr()
    assert err == ""  # nothing spilled on stderr
    assert "Recompiling function shape_user" in "\n".join(report.logs["recompiles"])
    after = (dict(_internal.log_state.log_qname_to_level), set(_internal.log_state.artifact_names),
             list(dynamo_log.handlers), dynamo_log.level, dynamo_log.propagate)
    assert after == before
    # a warning torch logs (the .item() hint) is captured, not printed
    explain_compile(item_in_branch, torch.randn(3), backend="eager")
    assert capfd.readouterr().err == ""


def test_bad_log_names_and_options_are_one_line_errors():
    x = torch.randn(2)
    bad = [
        (dict(logs="graph_breaks,nonsense"), "unknown TORCH_LOGS name 'nonsense'"),
        (dict(logs="+graph_breaks"), "take no prefix"),
        (dict(backend="nope"), "not a torch.compile backend"),
        (dict(backend="eager", mode="max-autotune"), "inductor backend only"),
        (dict(mode="fastest"), "not an inductor mode"),
        (dict(runs=0), "at least 1"),
        (dict(explain=True, bench=True), "--explain traces only"),
        (dict(fullgraph=True, check=True), "without it"),
        (dict(bench=True, min_time=0), "positive"),
    ]
    for kwargs, message in bad:
        with pytest.raises(TorchMagicError, match=message.replace("+", r"\+")) as info:
            explain_compile(torch.sin, x, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(TorchMagicError, match="give the inputs"):
        explain_compile(nn.Linear(2, 2))
    with pytest.raises(TorchMagicError, match="takes a cell"):
        explain_compile(42)


def test_torch_logs_in_the_environment_refuses_logs(monkeypatch):
    monkeypatch.setenv("TORCH_LOGS", "dynamo")
    with pytest.raises(TorchMagicError, match="TORCH_LOGS="):
        explain_compile(torch.sin, torch.randn(2), backend="eager", logs="graph_breaks")


def test_missing_cpp_compiler_suggests_aot_eager():
    from torch._inductor import config

    with config.patch({"cpp.cxx": ("no-such-compiler-here++",)}):
        with pytest.raises(TorchMagicError, match="--backend aot_eager") as info:
            explain_compile(torch.sin, torch.randn(2))
    assert "no-such-compiler-here++" in str(info.value)
    # the same with --explain works: no code generation
    assert explain_compile(torch.sin, torch.randn(2), explain=True).graph_count == 1


def test_meta_model_is_one_line_and_explain_still_works():
    with torch.device("meta"):
        model = Outer()
    x = torch.randn(2, 8, device="meta")
    with pytest.raises(TorchMagicError, match="meta device") as info:
        explain_compile(model, x, backend="eager")
    assert "--explain" in str(info.value)
    report = explain_compile(model, x, explain=True)
    assert report.graph_count == _explain(model, x).graph_count


def test_failing_forward_names_the_module_and_input_shapes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ForwardError) as info:
        explain_compile(model, torch.randn(3, 4), backend="eager", name="mlp")
    msg = str(info.value)
    assert "mlp.2 (Linear" in msg and "got input (3, 8)" in msg and "\n" not in msg
    assert isinstance(info.value.original, RuntimeError)


def test_gpt_decoder_compiles_in_one_graph_like_explain():
    from torchmagic.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, d_model=16))
    ids = torch.randint(0, 100, (2, 8))
    report = explain_compile(model, input_size=(2, 8), dtypes="long", explain=True)
    ref = _explain(model, ids)
    assert report.graph_count == ref.graph_count == 1 and report.graph_breaks == []


SCALE = 1


def bump_global(x):
    global SCALE
    SCALE += 1
    return x * SCALE


def test_a_changed_global_is_a_global_recompile():
    global SCALE
    SCALE = 1
    report = explain_compile(bump_global, torch.ones(2), runs=2, backend="eager")
    assert [rc.kind for rc in report.recompiles] == ["global"]
    assert report.recompiles[0].guard.startswith("SCALE == ")
    assert "pass it as an argument" in report.recompiles[0].suggestion
    SCALE = 1


def test_to_dict_carries_the_derived_numbers():
    report = explain_compile(with_print, torch.randn(3), backend="eager", bench=True,
                             min_time=0.01)
    d = report.to_dict()
    assert d["graph_count"] == 2 and d["graph_break_count"] == 1
    assert d["explain_graph_break_count"] == 1
    assert d["tracing_seconds"] == pytest.approx(report.tracing_seconds)
    assert d["timing"]["speedup"] == pytest.approx(report.timing.speedup)
    assert d["graph_breaks"][0]["place"]["line"] == _line_of(with_print, 'print("tracing')
    json.dumps(d)


def test_cell_function_refusals_and_names():
    from torchmagic.core.compile_cell import cell_function

    cf = cell_function("import math as m\nx = x + 1\nfor i in range(2):\n    y = i\ndef f():\n"
                       "    return x\n")
    assert cf.names == ["m", "x", "i", "y", "f"]
    with pytest.raises(TorchMagicError, match="global x"):
        cell_function("global x\nx = 1")
    with pytest.raises(TorchMagicError, match="import \\*"):
        cell_function("from math import *")
    with pytest.raises(TorchMagicError, match="not valid Python"):
        cell_function("x = (")


def test_busy_machine_warning_for_threaded_timings(monkeypatch):
    import os

    from torchmagic.core.compile_timing import _load_warning

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    (w,) = _load_warning(2)
    assert "load average 7.5 on 2 cores" in w and "torch.set_num_threads(1)" in w
    assert _load_warning(1) == []
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert _load_warning(2) == []


# -- the header, the graph table and the recompile list tell one story, counted as torch does ----
def peak(x):
    y = torch.tanh(x)
    print("peak", round(y.abs().max().item(), 2))  # an .item() and a print: graph breaks
    return y * 2


def split_by_print(x):
    y = x.sin()
    print("split")
    return y + x  # x lives on after the break: the resumed frame guards on its size too


def torch_per_call(fn, calls, modules=()):
    """torch's own numbers, call by call, for ``fn`` under ``torch.compile`` from a fresh
    dynamo (``reset()``, as ``torch._dynamo.explain`` starts): graphs and break reasons of its
    explain bookkeeping (``ExplainWithBackend``), ``counters["stats"]["unique_graphs"]``, and the
    frame compiles dynamo recorded (``get_compilation_metrics``): recompiles are those with a
    ``recompile_reason``. Run in the magic's sandbox, like ``_explain``."""
    import torch._dynamo.utils as dutils
    from torch._dynamo.backends.debugging import ExplainWithBackend

    from torchmagic.core.compile_run import _scopes
    from torchmagic.core.compile_sandbox import DynamoSandbox

    mods = [fn, *modules] if isinstance(fn, nn.Module) else list(modules)
    out = []
    with DynamoSandbox() as sandbox:
        for scope in _scopes(mods, getattr(fn, "__globals__", None)):
            sandbox.watch_scope(scope)
        torch._dynamo.reset()
        eb = ExplainWithBackend("eager")
        compiled = torch.compile(fn, backend=eb)
        for args in calls:
            graphs, breaks = len(eb.graphs), len(eb.break_reasons)
            unique = dutils.counters["stats"]["unique_graphs"]
            dutils.clear_compilation_metrics()
            compiled(*args)
            metrics = dutils.get_compilation_metrics()
            out.append({"graphs": len(eb.graphs) - graphs,
                        "breaks": len(eb.break_reasons) - breaks,
                        "unique_graphs": dutils.counters["stats"]["unique_graphs"] - unique,
                        "recompiles": sum(1 for m in metrics if m.recompile_reason)})
        torch._dynamo.reset()
    return out


def table_rows(text):
    """The graph table's rows in a report's text: (graph, call, compile, the line) of each."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("graph  call  compile"))
    rows = []
    for ln in lines[start + 2:]:
        if ln.startswith("="):
            break
        graph, call, compile_id = ln.split()[:3]
        rows.append((int(graph), int(call), compile_id, ln))
    return rows


def check_one_story(report, text, ref):
    """The header's counts, the table's rows and the recompile list agree with each other and
    with torch's numbers ``ref`` (``torch_per_call``)."""
    import re

    first, later = ref[0], ref[1:]
    rows = table_rows(text)
    # torch: first call as explain counts it, the later calls' graphs, breaks and recompiles
    assert report.graph_count == first["graphs"] == first["unique_graphs"]
    assert report.graph_break_count == first["breaks"]
    assert report.first_call_recompile_count == first["recompiles"]
    assert report.later_graph_count == sum(r["graphs"] for r in later) \
        == sum(r["unique_graphs"] for r in later)
    assert report.later_graph_break_count == sum(r["breaks"] for r in later)
    assert report.later_recompile_count == sum(r["recompiles"] for r in later)
    # the header says those numbers ...
    n1, b1, r1 = map(int, re.search(r"^call 1: (\d+) graphs?, (\d+) graph breaks?, (\d+) "
                                    r"recompiles?,", text, re.M).groups())
    r2, g2, b2, total = map(int, re.search(
        r"^calls? 2(?:-\d+)?: (\d+) recompiles?, (\d+) more graphs?, (\d+) more graph breaks? "
        r"\((\d+) graphs? in all\)", text, re.M).groups())
    assert (n1, b1, r1) == (first["graphs"], first["breaks"], first["recompiles"])
    assert (r2, g2, b2) == (report.later_recompile_count, report.later_graph_count,
                            report.later_graph_break_count)
    # ... and the table has those rows: call 1's, then the later calls', numbered in order
    assert total == len(rows) == n1 + g2 == len(report.graphs)
    assert [row[0] for row in rows] == list(range(1, total + 1))
    assert sum(1 for row in rows if row[1] == 1) == n1
    assert f"Graphs ({total}: {n1} in call 1, {g2} in call" in text
    # the recompile list: its total is the header's, and the rows it names are the starred ones
    recompiled = re.findall(r"^\d+\. call \d+ \(graphs? ([\d, ]+)[;,] compiles? ", text, re.M)
    named = sorted(int(g) for found in recompiled for g in found.split(", "))
    assert named == [g for g, _, cid, _ in rows if cid.endswith("*")]
    assert f"Recompiles ({r1 + r2}" in text
    # call 1's breaks are the table's numbered "break #n" rows, the later calls' its "break:" rows
    assert sum(1 for row in rows if " break #" in row[3]) == b1
    assert sum(1 for row in rows if " break: " in row[3]) == b2
    assert all(row[1] > 1 for row in rows if " break: " in row[3])


def test_header_table_and_recompiles_count_like_torch_across_calls(capsys):
    from torchmagic.display.compile import text as report_text

    small, big = torch.randn(4, 8), torch.randn(16, 8)
    ref = torch_per_call(peak, [(small,), (big,)])
    report = explain_compile(peak, small, calls=[big], backend="eager", logs="recompiles")
    text = report_text(report)
    check_one_story(report, text, ref)
    # the case the tour shows: the later call recompiles every frame and breaks again
    assert ref[1]["recompiles"] == 3 and ref[1]["breaks"] == 2
    assert report.recompile_count == 3 == len(report.logs["recompiles"])  # torch's log records
    # explain on the first call: the header's first numbers
    ref_explain = _explain(peak, small)
    assert report.graph_count == ref_explain.graph_count
    assert report.graph_break_count == len(ref_explain.break_reasons)


def test_one_guard_failing_in_two_frames_counts_two_recompiles(capsys):
    from torchmagic.display.compile import text as report_text

    a, b = torch.randn(4), torch.randn(8)
    ref = torch_per_call(split_by_print, [(a,), (b,)])
    report = explain_compile(split_by_print, a, calls=[b], backend="eager", logs="recompiles")
    text = report_text(report)
    check_one_story(report, text, ref)
    assert ref[1]["recompiles"] == 2 == len(report.logs["recompiles"])
    (rc,) = report.recompiles  # listed once: one failed guard (x's size) ...
    assert rc.count == 2 and len(rc.compile_ids) == 2  # ... that recompiled both frames
    assert "Recompiles (2, 1 listed" in text


def test_the_users_earlier_compile_does_not_change_the_counts(capsys):
    """A function the user compiled (and recompiled) before: dynamo's compile ids count on
    (0/2), and its automatic-dynamic state must not reach our run: the report is explain's."""
    import torch._dynamo.utils as dutils

    from torchmagic.core.compile_sandbox import DynamoSandbox
    from torchmagic.display.compile import text as report_text

    small, big = torch.randn(4, 8), torch.randn(16, 8)
    ref = torch_per_call(peak, [(small,), (big,)])
    with DynamoSandbox():  # the user's compile, dropped afterwards
        user = torch.compile(peak, backend="eager")
        user(small)
        user(big)
        dutils.clear_compilation_metrics()
        report = explain_compile(peak, small, calls=[big], backend="eager")
        ids = [m.compile_id for m in dutils.get_compilation_metrics()]
    assert any(not i.endswith("/0") and not i.endswith("/1") for i in ids)  # counted on
    check_one_story(report, report_text(report), ref)
    assert not any(g.recompile for g in report.graphs if g.run == 1)
