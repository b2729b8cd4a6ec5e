"""Helpers to run notebooks in a real kernel (nbclient) and in JupyterLab + Chromium (Playwright).

JupyterLab runs on 127.0.0.1 with a token, its config/data/runtime dirs in a temp dir, and is stopped by
its own process group at the end, also on failure. Chromium is Debian's (/usr/bin/chromium), never a
browser downloaded by Playwright.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]


def output_dir() -> Path:
    """Where tests leave screenshots and executed notebooks (``TORCHMAGIC_TEST_OUTPUT``)."""
    out = Path(os.environ.get("TORCHMAGIC_TEST_OUTPUT", ROOT / "test-output"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def execute_notebook(path: Path, timeout: int = 300) -> Any:
    """Execute a notebook with a real ipykernel; returns the executed nbformat node."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def error_outputs(nb: Any) -> list[str]:
    errs = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errs.append(f"{out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and out.get("name") == "stderr" and \
                    "Traceback" in out.get("text", ""):
                errs.append(out["text"])
    return errs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root_dir: Path, tmp: Path) -> Iterator[str]:
    """Start JupyterLab serving ``root_dir``; yields the base URL with ``?token=`` appended."""
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    settings = tmp / "config/lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # every cell in the DOM (the default windowing attaches off-screen cells later, or never)
    nb_settings = tmp / "config/lab/user-settings/@jupyterlab/notebook-extension"
    nb_settings.mkdir(parents=True, exist_ok=True)
    (nb_settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    # The kernel must be this interpreter (the one with torchmagic installed).
    kdir = tmp / "data/kernels/python3"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    log = open(tmp / "jupyterlab.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root_dir}", "--LabApp.news_url=None",
         "--ServerApp.open_browser=False", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError("JupyterLab exited: " + (tmp / "jupyterlab.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not start in 90 s")
            time.sleep(0.5)
        yield f"{base}|{token}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def run_all_in_lab(page: Any, url: str, notebook: str, timeout_ms: int = 240_000) -> None:
    """Open ``notebook`` in JupyterLab, wait for the kernel, and run all cells from the Run menu."""
    base, token = url.split("|")
    page.goto(f"{base}/lab/tree/{notebook}?token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_ms)
    page.wait_for_selector(".jp-DebuggerBugButton[aria-disabled='false']", timeout=timeout_ms)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=timeout_ms)
    page.click(".lm-MenuBar-itemLabel >> text='Run'")
    page.click("li[data-command='runmenu:run-all']")


def wait_all_executed(page: Any, n_cells: int, timeout_ms: int = 240_000) -> None:
    """Wait until every code cell shows an execution count and the kernel is idle again."""
    page.wait_for_function(
        """(n) => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            const done = prompts.filter(p => /\\[\\d+\\]/.test(p.textContent)).length;
            const idle = document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']");
            return done >= n && idle !== null;
        }""",
        arg=n_cells, timeout=timeout_ms,
    )
