"""JupyterLab + Debian Chromium (Playwright): the quickstart notebook renders its widgets.

Starts JupyterLab on 127.0.0.1 (token, temp config/data/runtime dirs), opens a copy of
``examples/quickstart.ipynb`` with its outputs cleared, runs all cells from the Run menu, waits for the
widgets, asserts on the rendered DOM (summary tree rows and totals, no widget errors), expands a module
and sees its children appear, checks that no request left 127.0.0.1, and saves screenshots under the
test output directory (``test-output/`` or ``$TORCHMAGIC_TEST_OUTPUT``). The server is stopped by its
process group at the end, also on failure.

Skipped only where Chromium or Playwright is missing and not in CI (CI installs both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EXAMPLES,
    jupyterlab,
    output_dir,
    run_all_in_lab,
    wait_all_executed,
)

from torchmagic.models import SmallCNN

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _need_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("python playwright")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {', '.join(missing)} (scripts/dev.sh installs them)")
        pytest.skip(f"needs {', '.join(missing)}")


def test_quickstart_renders_widgets_in_jupyterlab(tmp_path: Path) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    work = tmp_path / "nb"
    work.mkdir()
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, work / "quickstart.ipynb")
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    shots = output_dir() / "browser"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    total_params = f"{sum(p.numel() for p in SmallCNN().parameters()):,}"

    with jupyterlab(work, tmp_path / "jupyter") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            run_all_in_lab(page, url, "quickstart.ipynb")
            wait_all_executed(page, n_code)
            summary = page.locator(".jp-NotebookPanel .tm-summary").first
            summary.wait_for(timeout=120_000)
            summary.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "quickstart-summary.png"))

            panel_text = page.inner_text(".jp-NotebookPanel")
            assert "Error displaying widget" not in panel_text
            assert "Loading widget" not in panel_text

            # Totals header: exact parameter count on hover, and the tree's rows.
            assert summary.locator(f".tm-totals [title='{total_params}']").count() >= 1  # total, trainable
            rows = summary.locator(".tm-tree-row")
            before = rows.count()
            assert before >= 3, "root, features and head rows expected"
            assert "features" in summary.inner_text() and "head" in summary.inner_text()
            assert "Conv2d" not in summary.locator(".tm-tree").inner_text()

            # Expand `features`: its children (Conv2d, BatchNorm2d, ...) appear.
            summary.locator("button[title='expand/collapse features']").click()
            page.wait_for_function(
                "(n) => document.querySelector('.tm-summary').querySelectorAll("
                "'.tm-tree-row').length > n", arg=before, timeout=30_000)
            tree_text = summary.locator(".tm-tree").inner_text()
            assert "Conv2d" in tree_text and "BatchNorm2d" in tree_text
            assert rows.count() == before + 8
            summary.screenshot(path=str(shots / "quickstart-summary-expanded.png"))

            # Every magic in the notebook produced a widget, none failed to render.
            for cls in ("tm-params", "tm-meta-shape"):
                assert page.locator(f".jp-NotebookPanel .{cls}").count() >= 1, cls
            page.screenshot(path=str(shots / "quickstart-full.png"), full_page=True)
            outside = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:",
                                                                 "blob:", "about:"))]
            assert not outside, f"requests left 127.0.0.1: {outside[:5]}"
        finally:
            browser.close()
    assert torch.get_default_dtype() == torch.float32
