"""Display modes: widget only where a widget front end exists; %config TorchMagic.display forces one."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import outputs

from torchmagic import display
from torchmagic.models import SmallCNN

WIDGET = "application/vnd.jupyter.widget-view+json"


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


def test_kernel_modes(tmp_path: Any) -> None:
    """In a real kernel: auto -> widget + html + text; html -> no widget; text -> text only."""
    import nbformat
    from jupyter_harness import execute_notebook

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        "%load_ext torchmagic\nfrom torchmagic.models import SmallCNN\ncnn = SmallCNN()",
        "%params cnn",
        "%config TorchMagic.display = 'html'\n%params cnn",
        "%config TorchMagic.display = 'text'\n%params cnn",
        "import torchmagic\ntorchmagic.params(cnn)",
    )]
    path = tmp_path / "modes.ipynb"
    nbformat.write(nb, path)
    ran = execute_notebook(path)
    keys = [set(ran.cells[i].outputs[-1]["data"]) for i in range(1, 5)]
    assert keys[0] == {WIDGET, "text/html", "text/plain"}
    assert keys[1] == {"text/html", "text/plain"}
    assert keys[2] == {"text/plain"}
    assert keys[3] == {"text/plain"}  # a result object shown by IPython follows the same setting
