"""%tensor and %tensors: values against torch computed directly, storage sharing against
untyped_storage().data_ptr(), meta/fake tensors, bad input, and state invariants."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

import torchmagic
import torchmagic.core.tensor_stats as tensor_stats_mod
from torchmagic.core.tensor import relation, tensor_info, tensor_stats, tensors


def reference_stats(t: torch.Tensor) -> dict:
    """Statistics computed the obvious way, in float64 on the host."""
    x = t.detach().cpu()
    v = x.abs() if x.is_complex() else x
    v = v.double()
    fin = v[torch.isfinite(v)]
    return {
        "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()),
        "zeros": int((x == 0).sum()), "finite": fin.numel(),
        "min": float(fin.min()), "max": float(fin.max()), "mean": float(fin.mean()),
        "std": float(fin.std()),
    }


def assert_stats(t: torch.Tensor) -> None:
    s = tensor_stats(t)
    ref = reference_stats(t)
    assert s is not None
    for k in ("nan", "inf", "zeros", "finite"):
        assert getattr(s, k) == ref[k], k
    for k in ("min", "max", "mean", "std"):
        assert math.isclose(getattr(s, k), ref[k], rel_tol=1e-9, abs_tol=1e-12), k


def with_specials(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    flat[0] = float("nan")
    flat[3] = float("inf")
    flat[5] = float("-inf")
    flat[7] = 0.0
    flat[11] = float("nan")
    return t


# -- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_stats_match_torch(dtype: torch.dtype) -> None:
    t = with_specials(torch.randn(37, 29).to(dtype))
    assert_stats(t)
    s = tensor_stats(t)
    assert s.neg_inf == 1 and s.kind == "float"


def test_stats_chunked_and_non_contiguous_match_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_stats_mod, "CHUNK_ELEMENTS", 50)
    t = with_specials(torch.randn(23, 41, 3))
    assert_stats(t)  # contiguous: flat chunks
    assert_stats(t.permute(2, 0, 1))  # non-contiguous: split along dim 0 / per row
    assert_stats(t[:, ::2, 1])  # strided slice
    assert_stats(torch.randn(1, 7, 200).transpose(1, 2))  # one row bigger than a chunk


def test_int_bool_complex_empty_scalar() -> None:
    i = torch.randint(-1000, 1000, (300,))
    s = tensor_stats(i)
    assert (s.min, s.max) == (int(i.min()), int(i.max()))
    assert isinstance(s.min, int)
    assert s.zeros == int((i == 0).sum())
    assert math.isclose(s.mean, float(i.double().mean()), rel_tol=1e-12)
    assert math.isclose(s.std, float(i.double().std()), rel_tol=1e-12)
    big = torch.tensor([2**62 + 1, -(2**62) - 3])
    s = tensor_stats(big)
    assert (s.min, s.max) == (-(2**62) - 3, 2**62 + 1)  # exact, not via float64

    b = torch.tensor([True, False, True, True])
    s = tensor_stats(b)
    assert (s.true, s.zeros) == (3, 1)

    c = torch.randn(50, dtype=torch.complex64)
    c[3] = complex(float("nan"), 0)
    assert_stats(c)

    e = tensor_stats(torch.empty(0, 3))
    assert e.numel == 0 and e.min is None and e.mean is None
    z = tensor_stats(torch.tensor(2.5))
    assert (z.min, z.max, z.mean, z.std) == (2.5, 2.5, 2.5, None)
    allnan = tensor_stats(torch.full((4,), float("nan")))
    assert allnan.nan == 4 and allnan.finite == 0 and allnan.min is None


def test_stats_one_host_copy_and_no_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statistic and every chunk goes to the host in one copy; nothing calls .item()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(tensor_stats_mod, "CHUNK_ELEMENTS", 64)
    calls = {"cpu": 0}
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *a, **k):  # noqa: ANN202
        calls["cpu"] += 1
        return real_cpu(self, *a, **k)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    t = with_specials(torch.randn(40, 30))
    with Ops() as ops:
        tensor_stats(t)
    assert calls["cpu"] == 1
    assert "_local_scalar_dense" not in ops.names  # what .item()/float(t) dispatch to
    assert ops.names.count("isnan") == math.ceil(t.numel() / 64)


@requires_cuda
def test_cuda_stats_single_sync() -> None:
    t = with_specials(torch.randn(1000, 300, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            s = tensor_stats(t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in rec if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1
    ref = reference_stats(t)
    assert s.nan == ref["nan"] and s.finite == ref["finite"]
    assert math.isclose(s.mean, ref["mean"], rel_tol=1e-9)
    info = tensor_info(t, "t")
    assert info.device == "cuda:0"


# -- metadata and storage sharing ----------------------------------------------------------------
def test_metadata_matches_torch() -> None:
    w = torch.randn(6, 4, requires_grad=True)
    (w * 2).sum().backward()
    y = w.t()[1:]
    i = tensor_info(y, "y")
    assert i.shape == tuple(y.shape) and i.stride == y.stride()
    assert i.storage_offset == y.storage_offset() == 1
    assert i.contiguous is False and i.is_view
    assert i.storage_bytes == w.untyped_storage().nbytes() == 96
    assert i.nbytes == y.numel() * 4
    assert i.grad_fn == type(y.grad_fn).__name__ and not i.is_leaf and i.requires_grad
    iw = tensor_info(w, "w")
    assert iw.grad == "float32[6, 4] on cpu" and iw.is_leaf and iw.grad_fn is None
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert tensor_info(cl, "cl").memory_format == "channels_last"


def _ground_truth_shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_view_reshape_clone_sharing() -> None:
    x = torch.randn(4, 6)
    ns = {"x": x, "v": x.view(3, 8), "r": x.reshape(24), "c": x.clone(),
          "n": x.t().reshape(-1), "s": x[1:3], "d": x.detach()}
    for name, t in ns.items():
        if name != "x":
            shared = relation(t, x) is not None
            assert shared == _ground_truth_shares(t, x), name
    assert relation(ns["v"], x) == "view of"
    assert relation(ns["r"], x) == "view of"  # contiguous reshape is a view
    assert relation(ns["s"], x) == "view of"
    assert relation(ns["c"], x) is None  # clone copies
    assert relation(ns["n"], x) is None  # non-contiguous reshape copies
    assert relation(ns["d"], x) == "alias of"
    assert relation(x, ns["v"]) == "viewed by"
    links = {lk.name: lk.relation for lk in tensor_info(x, "x", ns).links}
    assert links == {"v": "viewed by", "r": "viewed by", "s": "viewed by", "d": "alias of"}
    # siblings of the same named tensor are not listed against each other
    assert [lk.name for lk in tensor_info(ns["v"], "v", ns).links] == ["x", "d"]


def test_siblings_and_module_parameters() -> None:
    base = torch.arange(12.0)
    a, b, c = base[:4], base[4:], base[2:6]
    assert relation(a, b) == "shares storage (disjoint bytes) with"
    assert relation(a, c) == "shares storage with"
    lin = nn.Linear(3, 2)
    wt = lin.weight.t()
    links = tensor_info(wt, "wt", {"lin": lin, "wt": wt}).links
    assert [(lk.relation, lk.name) for lk in links] == [("view of", "lin.weight")]


def test_meta_and_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = torch.empty(1000, 4096, device="meta", dtype=torch.bfloat16)
    i = tensor_info(m, "m", {"m": m, "mv": m.view(-1)})
    assert i.unknown == "meta tensor" and i.stats is None
    assert i.nbytes == 1000 * 4096 * 2
    assert [(lk.relation, lk.name) for lk in i.links] == [("viewed by", "mv")]
    assert "values unknown (meta tensor)" in str(i)
    f = FakeTensorMode().from_tensor(torch.randn(3, 4))
    fi = tensor_info(f, "f")
    assert fi.unknown == "fake tensor" and fi.stats is None and fi.shape == (3, 4)


def test_sparse_tensor_no_stats() -> None:
    sp = torch.randn(3, 3).to_sparse()
    i = tensor_info(sp, "sp")
    assert i.unknown == "sparse_coo layout" and i.stride is None
    assert "sp" in str(i)


# -- %tensors ------------------------------------------------------------------------------------
def test_tensors_table_reference() -> None:
    x = torch.randn(100, 10)
    bad = torch.tensor([1.0, float("nan")])
    inf = torch.tensor([float("inf"), 1.0])
    model = nn.Linear(50, 50)
    ns = {"x": x, "v": x.view(-1), "bad": bad, "inf": inf, "model": model,
          "w": model.weight, "m": torch.empty(10**6, device="meta"), "_hidden": torch.randn(999),
          "n": 3}
    r = tensors(ns)
    names = [row.name for row in r.rows]
    assert names == ["m", "w", "v", "x", "bad", "inf"]  # by bytes; ties by name; no _hidden
    assert "model.bias" not in names  # parameters inside modules are not rows
    flags = {row.name: row.flag for row in r.rows}
    for name in ("x", "bad", "inf", "w"):
        t = ns[name]
        expect_nan, expect_inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
        assert (flags[name] or "") == ("NaN" if expect_nan else "Inf" if expect_inf else "")
    assert flags["m"] == "?"
    # allocated bytes: each storage once (v shares x), meta excluded
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (x, bad, inf, model.weight)}
    assert r.total_bytes == sum(storages.values())
    assert r.by_device["meta"] == 4 * 10**6
    links = {row.name: [(lk.relation, lk.name) for lk in row.links] for row in r.rows}
    assert links["v"] == [("view of", "x")]
    assert links["w"] == [("same object as", "model.weight")]


# -- the magics ----------------------------------------------------------------------------------
def test_magic_tensor_text(ip) -> None:
    ip.user_ns["x"] = x = torch.randn(4, 6)
    ip.user_ns["v"] = x.view(3, 8)
    _, shown = run(ip, "tensor x v x.t().reshape(-1)")
    assert "view of x" in shown and "viewed by v" in shown and "own memory" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    _, shown = run(ip, "tensor x + 1")  # spaces inside one expression
    assert "tensor x + 1" in shown
    run(ip, "tensor x -o res")
    res = ip.user_ns["res"]
    assert res.items[0].shape == (4, 6)
    assert res.to_dict()["items"][0]["stats"]["numel"] == 24
    ip.user_ns.update({f"t{k}": torch.randn(3) for k in range(7)})
    _, shown = run(ip, "tensor " + " ".join(f"t{k}" for k in range(7)))
    assert all(len(line) <= 100 for line in shown.splitlines())


def test_magic_tensors_and_displays(ip) -> None:
    from torchmagic.display import mimebundle
    from torchmagic.display.tensor import widget

    ip.user_ns["a"] = torch.randn(1000)
    ip.user_ns["b"] = torch.tensor([float("nan")])
    _, shown = run(ip, "tensors")
    rows = [line.split()[0] for line in shown.splitlines() if line.startswith(("a ", "b "))]
    assert rows == ["a", "b"]  # largest first
    assert "NaN" in shown and "total:" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    run(ip, "tensors -o tab")
    tab = ip.user_ns["tab"]
    assert "<table" in tab._repr_html_()
    bundle = mimebundle(tab, "html")
    assert "text/html" in bundle and "text/plain" in bundle
    report = tensor_info(ip.user_ns["b"], "b")
    w = widget(torchmagic.tensor_report({"b": ip.user_ns["b"]}))
    assert len(w.children) == 2 and "NaN" in w.children[1].value
    assert "<table" in report._repr_html_()


def test_magic_tensors_empty(ip) -> None:
    _, shown = run(ip, "tensors")
    assert "no tensors" in shown


@pytest.mark.parametrize("line, message", [
    ("tensor nope", "%tensor: name 'nope' is not defined"),
    ("tensor model", "%tensor: model is a Linear, not a tensor"),
    ("tensor 3", "%tensor: 3 is an int, not a tensor"),
    ("tensor [1]", "%tensor: [1] is a list, not a tensor"),
    ("tensor w.grad", "%tensor: w.grad is None, not a tensor (no gradient yet"),
    ("tensor 1/0", "%tensor: evaluating tensor expression '1/0' raised ZeroDivisionError"),
    ("tensor x[", "unclosed bracket in: x["),
])
def test_bad_input_one_line(ip, line: str, message: str) -> None:
    ip.user_ns["model"] = nn.Linear(2, 2)
    ip.user_ns["w"] = torch.randn(2, requires_grad=True)
    ip.user_ns["x"] = torch.randn(2)
    with pytest.raises(UsageError) as exc:
        run(ip, line)
    assert str(exc.value).startswith(message) or message in str(exc.value)
    assert "\n" not in str(exc.value)


def _state(ip):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].eval()
    w = torch.randn(5, 4, requires_grad=True)
    (w ** 2).sum().backward()
    y = w * 3  # non-leaf with a graph
    y.retain_grad()
    ip.user_ns.update({"model": model, "w": w, "y": y, "x": torch.randn(8, 3)})
    return Snapshot.take(model, w=w, y=y, x=ip.user_ns["x"]), (w._version, y._version)


def test_invariants_success(ip) -> None:
    snap, versions = _state(ip)
    torch.manual_seed(0)
    snap = Snapshot.take(**snap.objects)
    grad_fn = ip.user_ns["y"].grad_fn
    run(ip, "tensor w y x w.t()")
    run(ip, "tensors")
    snap.assert_unchanged()
    assert (ip.user_ns["w"]._version, ip.user_ns["y"]._version) == versions
    assert ip.user_ns["y"].grad_fn is grad_fn
    assert torch.is_grad_enabled()


def test_invariants_on_exception_and_keyboard_interrupt(ip) -> None:
    snap, _ = _state(ip)

    def boom():
        raise KeyboardInterrupt

    def fail():
        raise ValueError("bad")

    ip.user_ns.update({"boom": boom, "fail": fail})
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("tensor", "w boom()")
    with pytest.raises(UsageError):
        run(ip, "tensor w fail()")
    snap.assert_unchanged()


def test_keyboard_interrupt_inside_statistics(ip, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-statistics: grad mode and every global setting are restored, the tensor is
    untouched."""
    real = torch.isfinite

    def interrupting(*args, **kwargs):  # noqa: ANN002, ANN003
        if not torch.is_grad_enabled():  # inside the statistics (they run under no_grad)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    t = torch.randn(10)
    ip.user_ns["t"] = t
    snap = Snapshot.take(t=t)
    monkeypatch.setattr(torch, "isfinite", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("tensor", "t")
    monkeypatch.undo()
    snap.assert_unchanged()
    assert torch.is_grad_enabled()


def test_subclass_torch_function_is_not_run_by_reading(ip) -> None:
    """Reading a tensor subclass's values never runs the subclass's own __torch_function__ (its
    metadata may be read through it, as torch itself does)."""
    calls = []

    class Counting(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    t = torch.tensor([1.0, float("nan"), 3.0]).as_subclass(Counting)
    ip.user_ns["t"] = t
    calls.clear()
    run(ip, "tensor t -o r")
    run(ip, "tensors -o table")
    stats = ip.user_ns["r"].items[0].stats
    assert (stats.nan, stats.finite, stats.min, stats.max) == (1, 2, 1.0, 3.0)
    assert {r.name: r.flag for r in ip.user_ns["table"].rows}["t"] == "NaN"
    value_ops = {"isnan", "isinf", "isfinite", "sum", "amin", "amax", "where", "any", "eq",
                 "__eq__", "to", "abs", "detach", "reshape", "view", "split"}
    assert not [c for c in calls if getattr(c, "__name__", "") in value_ops]


def test_plain_python_use() -> None:
    x = torch.randn(3, 4)
    v = x.view(12)
    info = torchmagic.tensor_info(v, "v", {"x": x, "v": v})
    assert info.links[0].name == "x"
    d = info.to_dict()
    assert d["shape"] == [3, 4][:0] + [12] and d["stats"]["finite"] == 12
    assert "tensor v" in str(info)
    assert "x" in str(torchmagic.tensors({"x": x, "v": v}))


def test_nested_float8_and_sparse_tensors(ip):
    """Tensors that used to crash %tensor / %tensors with torch's internal errors: nested
    (strided and jagged), float8 (no isnan kernel), and sparse (bytes are indices + values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype: torch warns
        n = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
        j = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    f8 = torch.tensor([1.0, -2.0, 0.0, 448.0]).to(torch.float8_e4m3fn)
    f8n = torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)
    sp = torch.eye(10).to_sparse()
    ip.user_ns.update(n=n, j=j, f8=f8, f8n=f8n, sp=sp)
    _, shown = run(ip, "tensor n j -o nj")
    assert "(2, ragged)" in shown and re.search(r"\(2, j\d+, 4\)", shown) and "nested" in shown
    # statistics over every element of the components (from the values buffer)
    for info, parts in zip(ip.user_ns["nj"].items, (n.unbind(), j.unbind())):
        ref = torch.cat([p.reshape(-1) for p in parts])
        assert info.stats.numel == ref.numel() and info.stats.min == pytest.approx(float(ref.min()))
        assert info.stats.mean == pytest.approx(float(ref.mean()))
        assert info.stats.std == pytest.approx(float(ref.std()))
    run(ip, "tensor f8 f8n -o r")
    a, b = ip.user_ns["r"].items
    ref = f8.float()
    assert (a.stats.min, a.stats.max, a.stats.zeros) == (-2.0, 448.0, 1)
    assert a.stats.mean == pytest.approx(float(ref.mean()))
    assert b.stats.nan == 1 and b.stats.finite == 1
    run(ip, "tensor sp -o s")
    assert ip.user_ns["s"].items[0].nbytes == sp._indices().nbytes + sp._values().nbytes
    _, shown = run(ip, "tensors -o t")
    rows = {r.name: r for r in ip.user_ns["t"].rows}
    assert rows["n"].flag is None and rows["f8n"].flag == "NaN" and rows["f8"].flag is None
    assert rows["sp"].flag is None  # its stored values are read: all finite
    assert all(len(line) <= 100 for line in shown.splitlines())
    r = ip.run_cell("%tensor torch.randn(2).to(torch.float8_e4m3fn)")
    assert r.error_in_exec is None


# -- issue 11: unusual layouts, broadcast views, a bounded %tensors ------------------------------
def test_broadcast_view_statistics_from_its_real_memory(ip) -> None:
    """``zeros(1).expand(10**10)`` holds 4 bytes: %tensor and %tensors read those, not 40 GB."""
    big = torch.zeros(1).expand(10**10)
    row = torch.tensor([1.0, float("nan"), -3.0, 5.0])
    grid = row.expand(1000, 4)  # stride 0 along dim 0: 4 distinct elements, each 1000 times
    ip.user_ns.update(big=big, grid=grid)
    # what is read: the distinct elements (1 and 4), not 10**10 (which took minutes)
    assert tensor_stats_mod.readable(big)[0].numel() == 1
    assert tensor_stats_mod.readable(grid)[:2][0].numel() == 4
    run(ip, "tensor big grid -o r")
    _, shown = run(ip, "tensors -o table")
    b, g = ip.user_ns["r"].items
    assert (b.stats.numel, b.stats.zeros, b.stats.mean, b.stats.std) == (10**10, 10**10, 0.0, 0.0)
    ref = grid.contiguous()  # the independent reference: a real copy of the 4000 elements
    fin = ref[torch.isfinite(ref)]
    assert (g.stats.numel, g.stats.nan, g.stats.finite) == (4000, 1000, 3000)
    assert g.stats.mean == pytest.approx(float(fin.double().mean()))
    assert g.stats.std == pytest.approx(float(fin.double().std()))
    assert any("broadcast view" in n for n in g.notes)
    rows = {r.name: r for r in ip.user_ns["table"].rows}
    assert rows["big"].nbytes == 4 and rows["grid"].flag == "NaN"


def test_overlapping_view_is_not_read_element_by_element() -> None:
    base = torch.zeros(10**6)
    win = base.unfold(0, 10**5, 1)  # 9e10 elements over 1e6 of memory
    info = tensor_info(win, "win")
    assert info.stats is None and any("overlapping view" in n for n in info.notes)
    assert tensors({"win": win}).rows[0].flag == "?"


def test_tensors_flag_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_stats_mod, "FLAG_BUDGET_BYTES", 1000)
    ns = {"small": torch.tensor([float("nan")]), "large": torch.full((1000,), float("nan"))}
    table = tensors(ns)
    flags = {r.name: r.flag for r in table.rows}
    assert flags == {"small": "NaN", "large": "not checked"}
    assert any("not checked for 1 tensor (large)" in n for n in table.notes)
    assert "not checked for 1 tensor" in str(table)


def test_tensors_on_a_big_namespace_compares_no_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of names on one storage and modules with thousands of parameters: the storage
    index finds links without comparing every pair (it compared names x members: minutes).
    The time goal (under a second) is in benchmarks/bench_tensors.py."""
    import torchmagic.core.tensor as core_tensor

    pairs = []
    real = core_tensor.relation
    monkeypatch.setattr(core_tensor, "relation", lambda a, b: pairs.append(1) or real(a, b))
    models = {f"m{i}": nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)]) for i in range(20)}
    base = torch.zeros(3000)
    ns = {**models, **{f"t{i}": base[i:i + 1] for i in range(2000)}, "whole": base}
    table = tensors(ns)
    assert len(pairs) == 0
    assert len(table.rows) == 2001 and table.total_bytes == 3000 * 4
    rows = {r.name: r for r in table.rows}
    assert ("view of", "whole") in [(lk.relation, lk.name) for lk in rows["t7"].links]
    assert rows["t7"].links[-1].name == "1,999 other named tensors"
    small = tensors({"a": base[:2], "b": base[1:3], "whole": base})  # few: exact pairwise links
    assert [(lk.relation, lk.name) for lk in {r.name: r for r in small.rows}["whole"].links] \
        == [("viewed by", "a"), ("viewed by", "b")]


@pytest.mark.parametrize("make", [
    lambda: torch.quantize_per_tensor(torch.tensor([0.0, 0.5]), 0.1, 0, torch.quint8),
    lambda: torch.quantize_per_channel(torch.zeros(2, 3), torch.tensor([0.1, 0.2]),
                                       torch.tensor([0, 0]), 0, torch.qint8),
    lambda: torch.eye(3).to_sparse_csr(),
    lambda: torch.eye(4).to_sparse_bsr((2, 2)),
    lambda: torch.zeros(2, 3).to_mkldnn(),
    lambda: torch._to_functional_tensor(torch.tensor([1.0, float("inf")])),
    lambda: nn.UninitializedParameter(),
    lambda: __import__("torch.testing._internal.two_tensor",
                       fromlist=["TwoTensor"]).TwoTensor(torch.zeros(3), torch.ones(3)),
], ids=["quantized", "per-channel", "csr", "bsr", "mkldnn", "functional", "uninitialized",
        "wrapper-subclass"])
def test_every_layout_is_described_never_crashed_on(ip, make) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make()
    ip.user_ns["t"] = t
    _, shown = run(ip, "tensor t")
    assert "tensor t" in shown
    _, shown = run(ip, "tensors")
    assert "t " in shown


def test_functional_wrapper_values_are_read_through_it() -> None:
    t = torch._to_functional_tensor(torch.tensor([1.0, float("inf"), 3.0]))
    info = tensor_info(t, "t")
    assert info.stats.inf == 1 and (info.stats.min, info.stats.max) == (1.0, 3.0)
    assert tensors({"t": t}).rows[0].flag == "Inf"


@pytest.mark.cuda
@requires_cuda
def test_cuda_broadcast_and_layouts() -> None:
    big = torch.tensor([1.0, float("nan")], device="cuda").expand(10**9, 2)
    info = tensor_info(big, "big")
    assert (info.stats.numel, info.stats.nan, info.stats.finite) == (2 * 10**9, 10**9, 10**9)
    ns = {"big": big, "sp": torch.eye(3, device="cuda").to_sparse(),
          "nt": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], device="cuda")}
    flags = {r.name: r.flag for r in tensors(ns).rows}
    assert flags["big"] == "NaN" and flags["sp"] == "?" and flags["nt"] is None


@pytest.mark.parametrize("layout", ["coo", "csr", "csc", "bsr"])
def test_sparse_tensors_are_flagged_from_their_stored_values(ip, layout: str) -> None:
    """A NaN or Inf stored in a sparse tensor's values is flagged; the implicit zeros are finite.
    The reference: the dense tensor's own isnan / isinf."""
    dense = torch.zeros(4, 4)
    dense[0, 1], dense[2, 3] = float("nan"), float("inf")
    make = {"coo": lambda d: d.to_sparse(), "csr": lambda d: d.to_sparse_csr(),
            "csc": lambda d: d.to_sparse_csc(), "bsr": lambda d: d.to_sparse_bsr((2, 2))}[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: sparse CSR & co. are beta
        bad, ok = make(dense), make(torch.eye(4))
    want = ("NaN+Inf" if bool(dense.isnan().any()) and bool(dense.isinf().any()) else None)
    ip.user_ns.update(bad=bad, ok=ok)
    run(ip, "tensors -o t")
    rows = {r.name: r for r in ip.user_ns["t"].rows}
    assert rows["bad"].flag == want and rows["ok"].flag is None
