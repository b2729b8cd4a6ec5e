"""Displays: what each mode publishes, text that fits the terminal, the shared module tree, live
panels that leave HTML behind, and self-contained HTML from every renderer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from conftest import outputs, run

import torchmagic
from torchmagic import display
from torchmagic.display.format import percent_of, shorten_path, text_width, wrap_text
from torchmagic.display.table import Table
from torchmagic.models import GPT, Llama, SmallCNN

WIDGET = "application/vnd.jupyter.widget-view+json"
ROOT = Path(__file__).resolve().parents[1]


# -- modes ---------------------------------------------------------------------------------------
def test_terminal_shell_gets_text_and_creates_no_widget(ip: Any, monkeypatch: Any) -> None:
    from ipywidgets import Widget

    created: list[Any] = []
    original = Widget.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        created.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Widget, "__init__", counting_init)
    ip.user_ns["cnn"] = SmallCNN()
    for line in ("summary cnn (1,3,32,32)", "params cnn", "gpumem", "device cnn"):
        bundles = outputs(ip, line)
        assert bundles and all(set(b) == {"text/plain"} for b in bundles), line
    assert created == []
    assert display.choose_mode() == "text"


@pytest.mark.parametrize("mode,keys", [("text", {"text/plain"}),
                                       ("html", {"text/plain", "text/html"}),
                                       # no widget front end in this shell: widget falls back
                                       ("widget", {"text/plain"})])
def test_config_display_forces_a_rendering(ip: Any, mode: str, keys: set[str]) -> None:
    ip.user_ns["cnn"] = SmallCNN()
    ip.run_line_magic("config", f"TorchMagic.display = '{mode}'")
    try:
        bundles = outputs(ip, "params cnn")
        assert bundles and set(bundles[0]) == keys
    finally:
        ip.run_line_magic("config", "TorchMagic.display = 'auto'")
    assert display.settings.mode == "auto"


def test_bad_display_mode_is_refused(ip: Any) -> None:
    from traitlets import TraitError

    with pytest.raises(TraitError):
        ip.extension_manager.shell.configurables[-1].display = "fancy"
    with pytest.raises(ValueError, match="display mode must be one of"):
        display.set_mode("fancy")


def test_unload_restores_auto_and_touches_no_global_state(ip: Any) -> None:
    """Unloading drops a forced display mode (the %config setting belongs to the extension) and
    changes no torch state; loading again applies the session's %config setting again."""
    from statecheck import Snapshot

    snap = Snapshot.take()
    ip.run_line_magic("config", "TorchMagic.display = 'text'")
    assert display.settings.mode == "text"
    ip.run_line_magic("unload_ext", "torchmagic")
    assert display.settings.mode == "auto"
    ip.run_line_magic("load_ext", "torchmagic")
    try:
        assert display.settings.mode == "text"  # the session's config still says text
    finally:
        ip.run_line_magic("config", "TorchMagic.display = 'auto'")
    assert display.settings.mode == "auto"
    snap.assert_unchanged()


def _notebook(tmp_path: Path, cells: list[str]) -> Any:
    import nbformat
    from jupyter_harness import execute_notebook

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in cells]
    path = tmp_path / "display.ipynb"
    nbformat.write(nb, path)
    return execute_notebook(path)


def _data(cell: Any) -> list[dict[str, Any]]:
    return [o["data"] for o in cell.outputs if o["output_type"] in ("display_data",
                                                                     "execute_result")]


@pytest.mark.slow
def test_kernel_outputs_are_html_and_live_panels_leave_html(tmp_path: Path) -> None:
    """In a real kernel: auto -> HTML + text (no widget view); widget mode -> one widget with the
    HTML beside it; html; text. A live panel (progress widget, then the result) ends as HTML and
    text with its widgets closed, also when Ctrl-C stops the work; a long %%benchmark and
    %gpumem --watch leave HTML only. nbclient applies display updates like a front end does."""
    nb = _notebook(tmp_path, [
        "%load_ext torchmagic\nimport time, torch, ipywidgets\nfrom torchmagic.models import "
        "SmallCNN\nfrom torchmagic.display.live import live\ncnn = SmallCNN()",
        "%params cnn",
        "%config TorchMagic.display = 'widget'\n%params cnn",
        "%config TorchMagic.display = 'html'\n%params cnn",
        "%config TorchMagic.display = 'text'\n%params cnn",
        "%config TorchMagic.display = 'auto'\nimport torchmagic\ntorchmagic.params(cnn)",
        # a live panel: progress widget while working, replaced by the result
        "from ipywidgets.widgets.widget import _instances\nn0 = len(_instances)\n"
        "with live('work') as panel:\n    for i in range(5):\n"
        "        panel.update((i + 1) / 5, f'step {i}'); time.sleep(0.12)\n"
        "    shown = len(panel.widgets)\n    panel.finish(torchmagic.params(cnn))",
        "shown, len(_instances) - n0",
        # Ctrl-C in the middle: a static line replaces the panel, the interrupt propagates
        "try:\n    with live('search') as panel:\n        panel.update(0.4, 'batch 64')\n"
        "        raise KeyboardInterrupt\nexcept KeyboardInterrupt:\n    pass",
        "%%benchmark --min-time 1.6\ntorch.ones(64).sum()",
        "%gpumem --watch",
        "x = torch.ones(1000)",
        "%gpumem --unwatch",
        "len(_instances) - n0",
    ])
    keys = [set().union(*_data(nb.cells[i])) for i in range(1, 6)]
    assert keys[0] == {"text/html", "text/plain"}
    assert keys[1] == {WIDGET, "text/html", "text/plain"}
    assert keys[2] == {"text/html", "text/plain"}
    assert keys[3] == {"text/plain"}
    assert keys[4] == {"text/html", "text/plain"}  # a result object in auto mode
    assert _data(nb.cells[2])[0]["text/html"] == _data(nb.cells[3])[0]["text/html"]

    live_cell = _data(nb.cells[6])
    assert len(live_cell) == 1 and set(live_cell[0]) == {"text/html", "text/plain"}
    assert live_cell[0]["text/plain"].startswith("model (SmallCNN) parameters")
    assert _data(nb.cells[7])[0]["text/plain"] == "(4, 0)"  # 4 widgets shown, all closed
    stopped = _data(nb.cells[8])
    assert stopped and stopped[0]["text/plain"] == "search: interrupted at 40%"
    assert WIDGET not in stopped[0]

    bench = _data(nb.cells[9])
    assert len(bench) == 1 and set(bench[0]) == {"text/html", "text/plain"}
    assert "median" in bench[0]["text/plain"]
    watch = _data(nb.cells[10])
    assert len(watch) == 1 and WIDGET not in watch[0]
    assert watch[0]["text/plain"].startswith("[gpumem In [")  # the last cell's line
    assert "CPU" in watch[0]["text/html"]
    assert _data(nb.cells[13])[0]["text/plain"] == "0"  # no widget left in the kernel
    for cell in nb.cells:
        for data in _data(cell):
            assert WIDGET not in data or "widget" in cell.source, cell.source


def test_live_panel_without_a_kernel_prints_only_the_result(capsys: Any) -> None:
    """In a script (or a terminal that is not a TTY) a panel shows nothing until the result."""
    from torchmagic.display.live import live

    with live("work") as panel:
        for i in range(3):
            panel.update(i / 3, "step")
        panel.finish(torchmagic.params(nn.Linear(2, 2)))
    out = capsys.readouterr().out
    assert out.startswith("model (Linear) parameters") and "step" not in out
    with pytest.raises(ValueError), live("work") as panel:
        panel.update(0.5)
        raise ValueError("boom")
    assert capsys.readouterr().out == ""  # nothing was shown, nothing to replace


def test_live_panel_on_a_terminal_rewrites_one_line(ip: Any, monkeypatch: Any,
                                                    capsys: Any) -> None:
    from torchmagic.display import live as L

    monkeypatch.setattr(L, "_where", lambda: "terminal")
    with L.live("work") as panel:
        panel.update(0.5, "half")
        panel.finish(torchmagic.params(nn.Linear(2, 2)))
    out = capsys.readouterr().out
    assert "\rwork: [##########..........]  50% half" in out
    status = out.index("half")
    erased = out.index("\r", status)
    assert out[erased:].lstrip("\r ").startswith("model (Linear) parameters")
    with pytest.raises(KeyboardInterrupt), L.live("search") as panel:
        panel.update(0.25, "batch 8")
        raise KeyboardInterrupt
    assert capsys.readouterr().out.rstrip().endswith("search: interrupted at 25%")


# -- text that fits --------------------------------------------------------------------------
def test_text_width_follows_columns(monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "83")
    assert text_width() == 83
    monkeypatch.setenv("COLUMNS", "20")
    assert text_width() == 60  # never narrower than 60
    monkeypatch.delenv("COLUMNS")
    assert text_width() == 100  # not a terminal (pytest captures stdout)


def test_wrap_never_splits_a_word_or_number() -> None:
    line = "Forward FLOPs: 17.6 TFLOPs (17,633,525,104,640); MACs 8.8 T " * 3
    for width in (20, 33, 60):
        lines = wrap_text(line, width)
        assert lines[0].startswith("Forward")
        assert line.split() == " ".join(lines).split()  # every word whole, in order
        assert all(len(x) <= width for x in lines if " " in x.strip())
    code = "    for p in model.parameters():"
    assert wrap_text(code, 20)[0].startswith("    for")  # indentation kept


def test_percent_never_rounds_to_the_ends() -> None:
    assert percent_of(49_151, 49_152) == "99.998%"
    assert percent_of(1, 49_152) == "0.00203%"
    assert percent_of(1, 3) == "33.3%" and percent_of(5, 5) == "100%" and percent_of(0, 5) == "0%"
    assert percent_of(1, 0) == "-"
    for n in (1, 7, 10**6 - 1):
        shown = float(percent_of(n, 10**6).rstrip("%"))
        assert 0 < shown < 100


def test_shortened_paths_keep_what_tells_rows_apart() -> None:
    rows = [f"model.layers.{i}.{name}" for i in (7, 17, 71)
            for name in ("post_attention_layernorm", "input_layernorm", "self_attn.o_proj")]
    for width in (14, 20, 26, 34):
        short = [shorten_path(r, width) for r in rows]
        assert all(len(s) <= width for s in short)
        assert len(set(short)) == len(rows), short  # still one name per row
        for r, s in zip(rows, short):
            assert f".{r.split('.')[2]}." in s, s  # the layer number survives
    assert shorten_path("encoder.layers.3.self_attn.out_proj", 26).startswith("encoder.")
    assert shorten_path("a.b", 10) == "a.b"


def _numbers_whole(text: str, width: int | None = None) -> None:
    """No number is cut ('…' next to a digit) or split over two lines. With ``width``, only a
    line that came near the width can have been wrapped (a table row ending in a number above
    an indented row starting with one is no split)."""
    lines = text.splitlines()
    assert not re.search(r"\d…|…\d", text), text
    for a, b in zip(lines, lines[1:]):
        if width is not None and len(a) + len(b.split()[0] if b.split() else "") + 1 <= width:
            continue  # the next word would have fitted on line a: not a wrap
        if b.startswith(" ") and b.strip():  # a continuation line
            split = (re.search(r"\d$", a) and re.match(r"\s*\d", b)) or \
                (re.search(r"\d,$", a) and re.match(r"\s*\d{3}\b", b))
            assert not split, (a, b)


def test_table_drops_and_narrows_columns_in_order() -> None:
    rows = [[f"encoder.layers.{i}.self_attention.output_projection", "TransformerEncoderLayer",
             "(8,512,1024)", f"{i * 1234567:,}", "3x3", "note"] for i in range(4)]
    t = Table(["module", "type", "output", "params", "kernel", "note"], rows,
              align=["l", "l", "l", "r", "l", "l"], title="a title " * 20, clip_middle=[0],
              drop=[5, 4], fixed=[2], keep_whole=[1], notes=["a note " * 30])
    for width in (60, 80, 100, 120, 200):
        out = t.text(width)
        assert max(len(x) for x in out.splitlines()) <= width, out
        _numbers_whole(out)
        body = out.splitlines()
        header = next(x for x in body if x.startswith("module"))
        assert "params" in header and "output" in header  # never dropped
        names = [x.split("  ")[0] for x in body if x.startswith(("enc", "…"))]
        assert len(set(names)) == 4, names
        assert all(f"{i * 1234567:,}" in out for i in range(4))  # numbers whole
        if width >= 120:
            assert "TransformerEncoderLayer" in out and "not shown" not in out
    out = t.text(80)
    assert "(not shown at 80 columns: note" in out
    assert "TransformerEncoderLayer" in out  # a whole class name before any is cut


# -- the module tree -------------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(self.attn(x)))


class Stack(nn.Module):
    def __init__(self, n: int = 6, bad: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(Layer() for _ in range(n))
        if bad is not None:
            self.layers[bad].mlp[2] = nn.Linear(3, 8)  # a shape bug in one block
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_summary_and_params_fold_identical_blocks() -> None:
    m = Stack()
    s = torchmagic.summary(m, input_size=(2, 4))
    text = str(s)
    assert "layers.0-5 ×6  Layer" in text
    group = next(x for x in text.splitlines() if x.startswith("layers.0-5 ×6"))
    per_block = sum(p.numel() for p in m.layers[0].parameters())
    assert f" {6 * per_block:,} " in group  # the run's total, from parameters()
    assert "layers.0.mlp" in text and "layers.3.mlp" not in text  # one block's rows
    html = s._repr_html_()
    for i in range(6):  # every block can still be opened
        assert f'title="layers.{i}.mlp"' in html
    assert html.count("<details") == html.count("</details>")
    p = torchmagic.params(m)
    assert "layers.0-5 ×6" in str(p) and 'title="layers.5.norm"' in p._repr_html_()
    # the folded row's numbers are the sums over the blocks (from parameters(), not our rows)
    rows = {r.path: r for r in p.rows}
    assert sum(rows[f"layers.{i}"].params for i in range(6)) == \
        sum(t.numel() for t in m.layers.parameters())


def test_a_failed_block_is_never_folded_and_shows_open() -> None:
    s = torchmagic.summary(Stack(bad=3), input_size=(2, 4), raise_on_error=False)
    assert s.error
    text = str(s)
    assert "layers.0-2 ×3" in text and "layers.3.mlp.2" in text
    assert "failed inside" in text and text.count("FORWARD FAILED") == 1
    assert text.count("in_features=3,") == 1  # the error text once
    html = s._repr_html_()
    failed_row = html.index("failed inside</span>", html.index('title="layers.3.mlp"'))
    # every <details> around the failed row is open
    stack: list[bool] = []
    for m in re.finditer(r"<details( open)?>|</details>", html[:failed_row]):
        if m.group(0) == "</details>":
            stack.pop()
        else:
            stack.append(bool(m.group(1)))
    assert stack and all(stack), "the failed row sits inside closed <details>"
    assert html.count("in_features=3,") == 1
    assert "up to the failure" in html


def test_meta_shape_tree_folds_and_every_block_opens() -> None:
    rep = torchmagic.meta_shape("y = m(torch.zeros(2, 4))", {"m": Stack(), "torch": torch},
                                depth=3)
    html = rep._repr_html_()
    assert "layers.0-5 ×6" in html
    for i in range(6):
        assert f'title="m.layers.{i}.mlp"' in html
    text = str(rep)
    assert "layers.0-5 ×6" in text and "mlp" in text


def test_llama_70b_summary_and_params_are_folded_and_small() -> None:
    with torch.device("meta"):
        llama = Llama(Llama.config_70b())
    s = torchmagic.summary(llama, input_size=(1, 16), dtypes="long", meta=True)
    p = torchmagic.params(llama, name="llama70b")
    for r in (s, p):
        text = str(r)
        assert "layers.0-79 ×80" in text and len(text.splitlines()) < 40
        html = r._repr_html_()
        assert "layers.0-79 ×80" in html and 'title="layers.79.mlp"' in html
        assert len(html) < 400_000  # 80 blocks with their rows, not megabytes
    assert f"{sum(t.numel() for t in llama.parameters()):,}" in str(p)


# -- every renderer ----------------------------------------------------------------------------
def _results(ip: Any, monkeypatch: Any) -> dict[str, Any]:
    """The result object every magic shows (captured where the magics show it)."""
    ip.user_ns.update(cnn=SmallCNN(), gpt=GPT(), x=torch.randn(4, 6), torch=torch, nn=nn)
    ip.user_ns["x"][0, 0] = float("nan")
    shown: list[Any] = []
    monkeypatch.setattr(display, "show", lambda result, mode=None: shown.append(result))
    lines = [("summary cnn (1,3,32,32)", None), ("params gpt", None),
             ("meta_shape", "y = gpt(torch.zeros(1, 8, dtype=torch.long))"),
             ("detect_anomaly", "z = torch.log(-torch.ones(3))   # a comment"),
             ("amp --dtype bf16 --report", "y = gpt(torch.zeros(1, 8, dtype=torch.long))"),
             ("gpumem", None), ("tensor x", None), ("tensors", None),
             ("device cnn", None), ("freeze cnn.features", None),
             ("benchmark -n 3", "cnn(torch.randn(1, 3, 32, 32))"),
             ("profile --rows 3", "cnn(torch.randn(1, 3, 32, 32))")]
    out = {}
    for line, cell in lines:
        run(ip, line, cell)
        out[line.split()[0]] = shown.pop()
    return out


def test_every_renderer_gives_self_contained_html_and_text_that_fits(ip: Any,
                                                                   monkeypatch: Any) -> None:
    results = _results(ip, monkeypatch)
    for name, r in results.items():
        html = r._repr_html_()
        assert html.startswith('<div class="tm-result" style="'), name
        assert "<script" not in html and not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(",
                                                       html), name
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", html), name
        assert "#d97706" not in html and "#dc2626" not in html, name  # theme variables only
        # what JupyterLab's sanitizer would drop from an untrusted notebook is never needed
        # inline: no var(), no custom property, no ch in a padding
        for style in re.findall(r' style="([^"]*)"', html):
            assert "var(" not in style and "--" not in style, (name, style)
            assert not re.search(r"padding[^;]*\dch", style), (name, style)
        for width in (60, 80, 120):
            monkeypatch.setenv("COLUMNS", str(width))
            text = str(r)
            assert max(len(x) for x in text.splitlines()) <= width, (name, width, text)
            _numbers_whole(text)
    # item 5: spaces before a comment kept in the quoted line; a NaN does not make 100% finite
    assert "torch.ones(3))   # a comment" in results["detect_anomaly"]._repr_html_()
    assert "white-space:pre-wrap" in results["detect_anomaly"]._repr_html_()
    tensor_html = results["tensor"]._repr_html_()
    assert re.search(r'class="[^"]*tm-bad', tensor_html) and "23 (95.8%)" in str(results["tensor"])


def test_tensor_finite_share_with_one_nan_is_not_100_percent() -> None:
    t = torch.randn(49_152)
    t[7] = float("nan")
    text = str(torchmagic.tensor_info(t, "t"))
    assert "49,151 (99.998%)" in text and "(100%)" not in text


def test_amp_never_calls_integer_ops_floating_point() -> None:
    g = GPT()
    with torchmagic.amp("cpu", torch.bfloat16) as run_:
        g(torch.zeros(1, 8, dtype=torch.long))
    rep = run_.report
    text = str(rep)
    table = text[text.index("floating-point op"):text.index("by dtype")]
    assert "int64" not in table and "arange" not in table
    assert "not floating point (not counted): arange (1, int64)" in text
    assert "int64" not in rep._repr_html_().split("<tbody>")[1].split("</tbody>")[0]


def test_gpumem_widget_details_do_not_repeat_on_cpu() -> None:
    import ipywidgets

    rep = torchmagic.gpumem()
    if rep.devices:
        pytest.skip("a CUDA device is visible")
    w = rep._renderer().widget(rep)
    assert not any(isinstance(c, ipywidgets.Accordion) for c in w.children)
    html = rep._repr_html_()
    assert html.count("RSS") == 1 or html.count("peak RSS") == 1


# -- the terminal tour at 80 and 120 columns --------------------------------------------------
def tour_fits(out: str, width: int) -> None:
    """The tour's output within ``width`` columns: no line longer, no number cut or split.
    (Echoed input lines are what the user typed; UsageErrors are IPython's one-line errors on
    stderr.)"""
    shown = [x for x in out.splitlines() if not x.startswith(("In [", "   ...:"))]
    too_long = [x for x in shown if len(x) > width]
    assert not too_long, (width, too_long)
    _numbers_whole("\n".join(shown), width)
    assert "layers.0-31 ×32" in out  # the folded 7B blocks of %%meta_shape


@pytest.mark.slow
def test_terminal_tour_fits_80_columns() -> None:
    """The tour (every magic, terminal IPython) at COLUMNS=80; tests/test_examples.py runs it
    at 120 with the same check."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/tour.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    tour_fits(proc.stdout, 80)


def test_shape_lists_are_cut_between_whole_shapes() -> None:
    from torchmagic.display.format import clip_items
    from torchmagic.display.table import Table

    shapes = "(2, 16, 64), (2, 1, 16, 16), (1, 16, 16), (1, 16, 16), (1, 16)"
    assert clip_items(shapes, 100) == shapes
    assert clip_items(shapes, 31) == "(2, 16, 64), (2, 1, 16, 16), +3"  # 31 characters
    assert clip_items(shapes, 30) == "(2, 16, 64), +4"
    assert clip_items(shapes, 20) == "(2, 16, 64), +4"
    assert clip_items("(2, 16, 64, 128, 256)", 10) == "(2, 16, 6…"  # one shape: cut at the end
    t = Table(headers=["module", "input"], rows=[["layers.0", shapes]], fixed=[1])
    assert max(len(line) for line in t.text(40).splitlines()) <= 40
    assert "(2, 16, 64), +4" in t.text(40) or "(2, 16, 64), (2, 1, 16, 16), +3" in t.text(40)
    assert shapes in t.text(100)  # cut only when nothing else fits
