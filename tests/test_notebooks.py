"""Every example notebook runs in a real ipykernel (nbclient) and shows what users should see.

Each notebook is copied (outputs cleared) into a temp dir and executed fresh. Any error output fails
the test. Magic outputs must be the self-contained HTML and the plain text in one bundle, with no
widget view (a widget needs the kernel that made it: a reopened notebook would show "model not
found"), and the key numbers (computed here independently) must be in the HTML and the text. The
executed quickstart is then exported with ``nbconvert --to html``: the static page must contain the
HTML rendering, readable without a kernel or JavaScript. The committed notebooks hold the same.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_harness import EXAMPLES, error_outputs, execute_notebook, output_dir

from torchmagic.models import GPT, GPTConfig, SmallCNN

pytestmark = pytest.mark.slow

WIDGET = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = ["quickstart", "debugging_nans", "big_models_on_meta", "mixed_precision"]


def _run(name: str, tmp: Path) -> Any:
    src = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    for cell in src.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    path = tmp / f"{name}.ipynb"
    nbformat.write(src, path)
    nb = execute_notebook(path)
    nbformat.write(nb, path)
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    tmp = tmp_path_factory.mktemp("notebooks")
    out = {}
    for name in NOTEBOOKS:
        out[name] = (_run(name, tmp), tmp / f"{name}.ipynb")
    return out


def _cell(nb: Any, startswith: str) -> Any:
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith(startswith):
            return cell
    raise AssertionError(f"no cell starting with {startswith!r}")


def _bundles(cell: Any) -> list[dict[str, Any]]:
    return [o["data"] for o in cell.outputs if o.get("output_type") in
            ("display_data", "execute_result")]


def _magic_bundle(cell: Any) -> dict[str, Any]:
    for data in _bundles(cell):
        if "text/html" in data:
            return data
    raise AssertionError(f"no HTML output for {cell.source.splitlines()[0]!r}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_errors(executed: dict[str, Any], name: str) -> None:
    nb, _ = executed[name]
    assert error_outputs(nb) == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)


@pytest.mark.parametrize("source", ["executed", "committed"])
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_magic_output_is_html_and_text(executed: dict[str, Any], name: str,
                                             source: str) -> None:
    nb = executed[name][0] if source == "executed" else \
        nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    assert "widgets" not in nb.metadata, "no saved widget state"
    magic_cells = [c for c in nb.cells if c.cell_type == "code"
                   and c.source.lstrip().startswith("%") and "load_ext" not in c.source
                   and not re.match(r"%amp (on|off)", c.source)]
    assert magic_cells
    for cell in magic_cells:
        data = _magic_bundle(cell)
        first = cell.source.splitlines()[0]
        assert all(WIDGET not in d for d in _bundles(cell)), first
        assert data["text/plain"].strip(), first
        assert '<div class="tm-result"' in data["text/html"], first
        html = data["text/html"]
        assert "<script" not in html, first
        # self-contained: no external asset, no event handler (no JavaScript at all)
        assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", html), first
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", html), first


def test_quickstart_numbers(executed: dict[str, Any]) -> None:
    nb, _ = executed["quickstart"]
    cnn_params = sum(p.numel() for p in SmallCNN().parameters())
    data = _magic_bundle(_cell(nb, "%summary cnn"))
    assert f"{cnn_params:,}" in data["text/plain"]
    assert f"{cnn_params:,}" in data["text/html"]
    # GPT with tied lm_head: parameters() counts the shared weight once.
    gpt = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=64))
    gpt_params = sum(p.numel() for p in gpt.parameters())
    for start in ("%summary gpt", "%params gpt"):
        data = _magic_bundle(_cell(nb, start))
        assert f"{gpt_params:,}" in data["text/plain"], start
        assert "tied" in data["text/plain"], start
    anomaly = _magic_bundle(_cell(nb, "%%detect_anomaly"))["text/plain"]
    assert "aten.log" in anomaly
    amp = _magic_bundle(_cell(nb, "%%amp"))["text/plain"]
    assert "bfloat16" in amp


def test_mixed_precision_amp_on_off(executed: dict[str, Any]) -> None:
    nb, _ = executed["mixed_precision"]
    dtypes = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("gpt.lm_head")]
    assert [_bundles(c)[0]["text/plain"] for c in dtypes] == ["torch.bfloat16", "torch.float32"]


@pytest.mark.parametrize("source", ["committed", "executed"])
def test_static_html_export_contains_the_html_rendering(executed: dict[str, Any],
                                                        source: str) -> None:
    """``nbconvert --to html`` of the quickstart (as committed, and freshly executed) shows the HTML
    rendering of every magic: readable without a kernel or JavaScript."""
    from nbconvert import HTMLExporter

    if source == "committed":
        nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
        assert "widgets" not in nb.metadata, "saved widget state would hide the HTML"
        assert all(c.outputs for c in nb.cells if c.cell_type == "code" and
                   c.source.lstrip().startswith("%") and "load_ext" not in c.source)
    else:
        nb, path = executed["quickstart"]
        shutil.copy(path, output_dir() / "quickstart.executed.ipynb")
    body, _ = HTMLExporter().from_notebook_node(nb)
    (output_dir() / f"quickstart.{source}.html").write_text(body)
    cnn_params = sum(p.numel() for p in SmallCNN().parameters())
    magic_cells = sum(1 for c in nb.cells if c.cell_type == "code" and
                      c.source.lstrip().startswith("%") and "load_ext" not in c.source)
    assert body.count('<div class="tm-result"') >= magic_cells
    assert f"{cnn_params:,}" in body
    assert re.search(r'title="features\.0">features\.0</span>', body)  # a tree row


def test_debugging_nans_names_each_origin(executed: dict[str, Any]) -> None:
    """Each section of the NaN notebook shows what its heading promises, in text and HTML."""
    nb, _ = executed["debugging_nans"]
    cells = [c for c in nb.cells if c.cell_type == "code" and
             c.source.startswith("%%detect_anomaly")]
    bundles = [_magic_bundle(c) for c in cells]
    want = [("forward Inf born in aten.addmm in mlp.2", "mlp.2 (Linear)"),  # the overflow
            ("forward NaN born in aten.log", "h = torch.log(h)"),
            ("backward NaN in SqrtBackward0", "SqrtBackward0"),
            ("no NaN/Inf in forward or backward", "no NaN/Inf")]
    assert len(bundles) == len(want)
    for data, (headline, detail) in zip(bundles, want):
        assert data["text/plain"].startswith("NaN/Inf found: " + headline) or \
            data["text/plain"].startswith(headline), (headline, data["text/plain"][:200])
        assert detail in data["text/plain"]
        assert detail.replace(">", "&gt;") in data["text/html"]


def test_big_models_numbers(executed: dict[str, Any]) -> None:
    """The 70B notebook's parameter count comes from parameters() on a meta copy built here, its
    FLOPs from the analytic Llama formula, its shapes from the config."""
    import torch
    from test_summary import llama_forward_flops

    from torchmagic.models import Llama

    nb, _ = executed["big_models_on_meta"]
    cfg = Llama.config_70b()
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters())
    for start in ("%params llama70b", "%summary llama70b"):
        data = _magic_bundle(_cell(nb, start))
        assert f"{n:,}" in data["text/plain"] and f"{n:,}" in data["text/html"], start
        # the 80 decoder layers folded, every one still in the HTML
        assert "layers.0-79 ×80" in data["text/plain"] and "layers.0-79 ×80" in data["text/html"]
        assert 'title="layers.79.mlp"' in data["text/html"]
    text = _magic_bundle(_cell(nb, "%summary llama70b"))["text/plain"]
    got = int(re.search(r"Forward FLOPs: [^(]*\(([\d,]+)\)", text).group(1).replace(",", ""))
    want = llama_forward_flops(cfg, 1, 2048)
    assert abs(got - want) <= 0.01 * want, (got, want)
    shapes = _magic_bundle(_cell(nb, "%%meta_shape --depth 1\nids"))
    assert f"(1, 4096, {cfg.vocab_size})" in shapes["text/plain"]
    assert f"(1, 4096, {cfg.vocab_size})" in shapes["text/html"]
