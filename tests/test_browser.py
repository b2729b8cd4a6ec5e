"""JupyterLab + Debian Chromium (Playwright): every torchmagic output survives the notebook.

One notebook with every magic (the quickstart's cells, the 70B model's %params and %summary, a
failing %summary, %%gpumem, --top, --watch, %amp on/off, a long %%benchmark with its live panel)
runs in JupyterLab. Then:

1. every magic cell shows its HTML output, no widget view at all (no "Loading widget", no
   "Error displaying widget"), nothing requested outside 127.0.0.1; the 70B trees are folded and
   opening a folded block is timed (printed; asserted only against a generous bound);
2. the notebook is saved, its kernel shut down, and it is opened again with a new kernel: every
   output is there; the page is reloaded (dark theme): every output is there again;
3. a copy that JupyterLab does not trust (its sanitizer strips ``<style>`` and ``var()``) still
   shows every tree with its columns lined up across depths and 28 px rows;
4. text contrast of every torchmagic output is at least 4.5:1 in the light and the dark theme;
5. nbconvert's HTML export of the saved notebook shows every output with the network blocked.

Screenshots of each output at 1280 px (file browser open) and 1440 px, light and dark, and of the
untrusted copy and the export, go to ``test-output/browser/`` (or ``$TORCHMAGIC_TEST_OUTPUT``).
Skipped only where Chromium or Playwright is missing and not in CI (CI installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

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

from torchmagic.models import Llama, SmallCNN

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SETUP = ("%load_ext torchmagic\nimport torch, torch.nn as nn, torch.nn.functional as F\n"
         "import torchmagic\nfrom torchmagic.models import SmallCNN, GPT, GPTConfig, Llama\n"
         "_ = torch.manual_seed(0)")
EXTRA = [
    "with torch.device('meta'):\n    llama70b = Llama(Llama.config_70b())",
    "%params llama70b",
    "%summary llama70b (1,2048) --dtypes long --meta",
    "broken = SmallCNN()\nbroken.head[3] = nn.Linear(32, 10)  # a shape bug\n"
    "torchmagic.summary(broken, input_size=(1, 3, 32, 32), raise_on_error=False)",
    "%%gpumem\nbig = torch.ones(1024, 1024)",
    "%gpumem --top 3",
    "%gpumem --watch",
    "tmp = torch.ones(512, 512) * 2",
    "%gpumem --unwatch",
    "%amp on --dtype bf16 --device cpu",
    "gpt.lm_head(torch.randn(2, 64)).dtype",
    "%amp off",
    "%%benchmark --min-time 1.5\ncnn(x)",
]
# cells that print a line (no HTML result): the rest of the magic cells show a torchmagic result
TEXT_ONLY = ("%load_ext", "%gpumem --unwatch", "%amp on", "%amp off")
MIN_RATIO = 4.5

CONTRAST_JS = """
(min) => {
  const parse = (c) => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const over = (top, under) => { const a = top[3];
    return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]); };
  const background = (el) => { const layers = [];
    for (let e = el; e; e = e.parentElement) { const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; } }
    let bg = [255, 255, 255, 1];
    for (let i = layers.length - 1; i >= 0; i--) bg = over(layers[i], bg);
    return bg; };
  const opacity = (el) => { let o = 1;
    for (let e = el; e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity);
    return o; };
  const bad = []; let checked = 0;
  for (const root of document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .tm-result')) {
    for (const el of root.querySelectorAll('*')) {
      const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
      if (!own || el.getClientRects().length === 0) continue;
      const style = getComputedStyle(el);
      if (style.visibility === 'hidden' || style.display === 'none' ||
          parseFloat(style.fontSize) === 0) continue;
      const bg = background(el);
      let fg = parse(style.color); fg = [fg[0], fg[1], fg[2], fg[3] * opacity(el)];
      const text = over(fg, bg);
      const [a, b] = [lum(text), lum(bg)];
      const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
      checked++;
      if (ratio < min) bad.push([el.textContent.trim().slice(0, 40), ratio.toFixed(2),
                                 style.color, el.className]);
    }
  }
  return {checked, bad};
}
"""

OUTPUTS_JS = """
() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')].map(c => ({
  source: (c.querySelector('.jp-InputArea .cm-content') || {}).innerText || '',
  tm: c.querySelectorAll('.jp-OutputArea-output .tm-result').length,
  text: (c.querySelector('.jp-OutputArea') || {}).innerText || ''}))
"""


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


def _notebook() -> Any:
    """The quickstart's code cells (examples/build.py) plus the cells above."""
    src = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    code = [c.source for c in src.cells if c.cell_type == "code"]
    code[0] = SETUP
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in code + EXTRA]
    return nb


def _magic(source: str) -> bool:
    """A cell that shows a torchmagic result."""
    s = source.lstrip()
    return (s.startswith("%") and not s.startswith(TEXT_ONLY)) or "raise_on_error" in s


def _api(url: str, method: str, path: str, body: Any = None) -> Any:
    base, token = url.split("|")
    req = urllib.request.Request(f"{base}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
    return json.loads(data) if data else None


def _check_outputs(page: Any, expected: list[str], when: str) -> list[dict[str, Any]]:
    cells = page.evaluate(OUTPUTS_JS)
    assert len(cells) == len(expected), when
    for cell, source in zip(cells, expected):
        first = source.splitlines()[0]
        if _magic(source):
            assert cell["tm"] >= 1, f"{when}: no torchmagic output for {first!r}"
        assert "Error displaying widget" not in cell["text"], (when, first)
        assert "Loading widget" not in cell["text"], (when, first)
        assert "model not found" not in cell["text"], (when, first)
    widgets = page.evaluate(
        "document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jupyter-widgets, .jp-NotebookPanel:not(.lm-mod-hidden) "
        "[data-mime-type=\"application/vnd.jupyter.widget-view+json\"]').length")
    assert widgets == 0, f"{when}: {widgets} widget views"
    return cells


def _wait_outputs(page: Any, n_magic: int, timeout_ms: int = 120_000) -> None:
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", timeout=timeout_ms)
    page.wait_for_function(
        "(n) => document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output "
        ".tm-result').length >= n", arg=n_magic, timeout=timeout_ms)


def _screenshots(page: Any, shots: Path, tag: str) -> str:
    t0 = time.monotonic()
    outs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output:has(.tm-result)")
    n = outs.count()
    for i in range(n):
        outs.nth(i).screenshot(path=str(shots / f"{i:02d}-{tag}.png"), animations="disabled")
    return f"{n} in {time.monotonic() - t0:.1f} s"


def _contrast(page: Any, theme: str) -> str:
    t0 = time.monotonic()
    got = page.evaluate(CONTRAST_JS, MIN_RATIO)
    assert got["checked"] > 200, got
    assert not got["bad"], f"{theme}: text below {MIN_RATIO}:1: {got['bad'][:10]}"
    return f"{got['checked']} texts in {time.monotonic() - t0:.1f} s"


def _open_block_ms(page: Any, cell_text: str) -> dict[str, float]:
    """Open the folded 70B block (layers.0-79 ×80), its "79 more" list and layers.17: the time
    from the click to the second animation frame after it, in the browser."""
    return page.evaluate("""(start) => new Promise(async (done) => {
      const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')];
      const cell = cells.find(c => (c.querySelector('.cm-content') || {}).innerText
                                   ?.startsWith(start));
      const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
      const time = async (el) => { const t0 = performance.now(); el.click(); await frame();
                                   return performance.now() - t0; };
      const group = [...cell.querySelectorAll('summary')].find(s => s.querySelector('.tm-fold'));
      const out = {group: await time(group)};
      const more = [...group.parentElement.querySelectorAll(':scope > details > summary')]
                     .find(s => s.querySelector('.tm-more'));
      out.more = await time(more);
      const block = [...more.parentElement.querySelectorAll('summary')]
                      .find(s => s.querySelector('.tm-c0[title="layers.17"]'));
      out.layer17 = await time(block);
      out.open = group.parentElement.open && more.parentElement.open && block.parentElement.open;
      more.click();  // closed again: the output fits the screen for its screenshot
      await frame();
      done(out);
    })""", cell_text)


def _aligned(page: Any) -> list[str]:
    """Trees whose second column does not start at the same x in every visible row, or whose
    rows are not about 28 px high."""
    return page.evaluate("""() => {
      const bad = [];
      for (const tree of document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .tm-tree')) {
        const xs = new Set(); const hs = new Set();
        for (const row of tree.querySelectorAll('.tm-row')) {
          if (!row.getClientRects().length) continue;
          const cells = [...row.children].filter(e => e.tagName === 'SPAN');
          if (cells.length > 1) xs.add(Math.round(cells[1].getBoundingClientRect().left));
          hs.add(Math.round(row.getBoundingClientRect().height));
        }
        const h = [...hs];
        if (xs.size > 1 || h.some(v => v < 26 || v > 30)) bad.push(JSON.stringify([...xs, h]));
      }
      return bad;
    }""")


def _set_theme(url: str, theme: str) -> None:
    raw = json.dumps({"theme": theme})
    _api(url, "PUT", "/lab/api/settings/@jupyterlab/apputils-extension:themes", {"raw": raw})


def test_every_output_survives_save_reopen_reload_and_export(tmp_path: Path) -> None:
    _need_browser()
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    work = tmp_path / "nb"
    work.mkdir()
    nb = _notebook()
    nbformat.write(nb, work / "every_magic.ipynb")
    sources = [c.source for c in nb.cells]
    n_magic = sum(_magic(s) for s in sources)
    shots = output_dir() / "browser"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with torch.device("meta"):
        total_70b = f"{sum(p.numel() for p in Llama(Llama.config_70b()).parameters()):,}"
    cnn_params = f"{sum(p.numel() for p in SmallCNN().parameters()):,}"
    timings: dict[str, Any] = {}

    with jupyterlab(work, tmp_path / "jupyter") as url, sync_playwright() as p:
        base, token = url.split("|")
        nb_url = f"{base}/lab/tree/every_magic.ipynb?token={token}"
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))

            # 1. run everything, check every output, time the folded 70B block
            t0 = time.monotonic()
            run_all_in_lab(page, url, "every_magic.ipynb")
            wait_all_executed(page, len(sources))
            timings["run all (s)"] = round(time.monotonic() - t0, 1)
            assert page.locator("#filebrowser").is_visible()  # 1280 px with the file browser
            cells = _check_outputs(page, sources, "after run all")
            summary70 = next(c for c in cells if c["source"].startswith("%summary llama70b"))
            assert "layers.0-79 ×80" in summary70["text"] and total_70b in summary70["text"]
            params70 = next(c for c in cells if c["source"].startswith("%params llama70b"))
            assert "layers.0-79 ×80" in params70["text"] and total_70b in params70["text"]
            assert "layers.1.mlp" not in summary70["text"]  # folded: layer 1 not shown yet
            assert _aligned(page) == []
            timings["light 1280 screenshots"] = _screenshots(page, shots, "light-1280")
            timings["light contrast checks"] = _contrast(page, "light")
            for start in ("%summary llama70b", "%params llama70b"):
                ms = _open_block_ms(page, start)
                assert ms.pop("open") is True
                timings[f"open {start.split()[0]} 70B block (ms)"] = {
                    k: round(v, 1) for k, v in ms.items()}
                assert max(ms.values()) < 2000, ms  # generous: the goal is < 500 ms
                opened = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell",
                                      has_text=start).locator(".jp-OutputArea-output")
                opened.screenshot(path=str(shots / f"{start.split()[0][1:]}-70b-opened.png"))
            page.set_viewport_size({"width": 1440, "height": 1000})
            timings["light 1440 screenshots"] = _screenshots(page, shots, "light-1440")
            page.screenshot(path=str(shots / "notebook-light-1440.png"))

            # 2. save, shut the kernel down, reopen with a new kernel
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                saved = _api(url, "GET", "/api/contents/every_magic.ipynb?content=1")
                if sum(bool(c["outputs"]) for c in saved["content"]["cells"]) >= n_magic:
                    break
                time.sleep(0.5)
            old = [k["id"] for k in _api(url, "GET", "/api/kernels")]
            for s in _api(url, "GET", "/api/sessions"):
                _api(url, "DELETE", f"/api/sessions/{s['id']}")
            assert _api(url, "GET", "/api/kernels") == []
            page.goto(nb_url)
            _wait_outputs(page, n_magic)
            # the indicator reads "idle" before the new kernel exists: poll the server for it
            deadline = time.monotonic() + 120
            new: list[str] = []
            while time.monotonic() < deadline and not new:
                new = [k["id"] for k in _api(url, "GET", "/api/kernels")]
                time.sleep(0.5)
            assert new and not set(new) & set(old), "a new kernel"
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=120_000)
            _check_outputs(page, sources, "reopened with a new kernel")
            assert cnn_params in page.inner_text(".jp-NotebookPanel:not(.lm-mod-hidden)")

            # reload the page, in the dark theme
            _set_theme(url, "JupyterLab Dark")
            page.set_viewport_size({"width": 1280, "height": 1000})
            page.reload()
            _wait_outputs(page, n_magic)
            page.wait_for_function("document.body.dataset.jpThemeLight === 'false'",
                                   timeout=60_000)
            _check_outputs(page, sources, "after a reload (dark theme)")
            assert _aligned(page) == []
            timings["dark contrast checks"] = _contrast(page, "dark")
            timings["dark 1280 screenshots"] = _screenshots(page, shots, "dark-1280")
            page.set_viewport_size({"width": 1440, "height": 1000})
            timings["dark 1440 screenshots"] = _screenshots(page, shots, "dark-1440")
            page.screenshot(path=str(shots / "notebook-dark-1440.png"))

            # 3. a copy JupyterLab does not trust: <style> stripped, layout still there
            _set_theme(url, "JupyterLab Light")
            copy = nbformat.read(work / "every_magic.ipynb", as_version=4)
            copy.metadata["shared_by"] = "someone else"  # the signature no longer matches
            nbformat.write(copy, work / "shared.ipynb")
            page.goto(f"{base}/lab/tree/shared.ipynb?reset&token={token}")
            _wait_outputs(page, n_magic)
            assert page.evaluate("document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) "
                                 ".jp-OutputArea-output style').length") == 0, "sanitized"
            _check_outputs(page, sources, "untrusted copy")
            assert _aligned(page) == []
            timings["untrusted screenshots"] = _screenshots(page, shots, "untrusted-1440")

            outside = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:",
                                                                 "blob:", "about:"))]
            assert not outside, f"requests left 127.0.0.1: {outside[:5]}"

            # 5. nbconvert's export, offline
            body, _ = HTMLExporter().from_filename(str(work / "every_magic.ipynb"))
            export = shots / "every_magic.nbconvert.html"
            export.write_text(body)
            offline = browser.new_page(viewport={"width": 1280, "height": 1000})
            blocked: list[str] = []

            def block(route: Any) -> None:
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            offline.route("**/*", block)
            offline.goto(export.as_uri())
            shown = offline.locator(".tm-result")
            assert shown.count() >= n_magic
            text = offline.inner_text("body")
            assert total_70b in text and cnn_params in text and "layers.0-79 ×80" in text
            assert all(shown.nth(i).is_visible() for i in range(shown.count()))
            offline.screenshot(path=str(shots / "nbconvert-export.png"), full_page=True)
        finally:
            browser.close()
    print("\n[browser] " + json.dumps(timings))
    (shots / "timings.json").write_text(json.dumps(timings, indent=1))
