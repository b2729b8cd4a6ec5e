"""Loading the extension: %load_ext twice, %reload_ext and %unload_ext register every magic, the
configurable and the callbacks exactly once (and remove them on unload); importing is cheap."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

import torchmagic
from torchmagic.magics import magic_modules


def our_magics(ip: Any) -> dict[str, list[str]]:
    """Magic names registered by torchmagic's instances, by kind."""
    out: dict[str, list[str]] = {}
    for kind, table in ip.magics_manager.magics.items():
        out[kind] = sorted(name for name, fn in table.items()
                           if type(getattr(fn, "__self__", None)).__module__.startswith(
                               "torchmagic."))
    return out


def expected_magics() -> dict[str, list[str]]:
    import importlib

    out: dict[str, list[str]] = {"line": [], "cell": []}
    for name in magic_modules():
        module = importlib.import_module(f"torchmagic.magics.{name}")
        for cls in module.MAGICS:
            for kind, table in cls.magics.items():
                out[kind].extend(table)
    return {k: sorted(v) for k, v in out.items()}


def configurables(ip: Any) -> int:
    return sum(type(c).__name__ == "TorchMagic" for c in ip.configurables)


def callbacks(ip: Any) -> Counter:
    return Counter({event: len(fns) for event, fns in ip.events.callbacks.items()})


def check_loaded_once(ip: Any) -> None:
    assert our_magics(ip) == expected_magics()
    assert "summary" in our_magics(ip)["line"] and "params" in our_magics(ip)["line"]
    assert configurables(ip) == 1
    state = ip._torchmagic_state
    kinds = Counter(type(i).__name__ for i in state["instances"])
    assert all(n == 1 for n in kinds.values())
    # every registered magic is bound to the current instance
    instances = {id(i) for i in state["instances"]}
    for table in ip.magics_manager.magics.values():
        for fn in table.values():
            owner = getattr(fn, "__self__", None)
            if type(owner).__module__.startswith("torchmagic."):
                assert id(owner) in instances


def test_load_twice_reload_unload(ip) -> None:
    check_loaded_once(ip)
    loaded_callbacks = callbacks(ip)
    ip.run_line_magic("load_ext", "torchmagic")  # IPython: already loaded
    check_loaded_once(ip)
    torchmagic.load_ipython_extension(ip)  # calling the hook itself again replaces, never doubles
    check_loaded_once(ip)
    assert callbacks(ip) == loaded_callbacks
    ip.run_line_magic("reload_ext", "torchmagic")
    check_loaded_once(ip)
    assert callbacks(ip) == loaded_callbacks

    ip.run_line_magic("unload_ext", "torchmagic")
    assert our_magics(ip) == {k: [] for k in ip.magics_manager.magics}
    assert "summary" not in ip.magics_manager.magics["line"]
    assert "params" not in ip.magics_manager.magics["line"]
    assert configurables(ip) == 0
    assert ip._torchmagic_state is None
    unloaded_callbacks = callbacks(ip)
    assert all(unloaded_callbacks[e] <= loaded_callbacks[e] for e in loaded_callbacks)
    torchmagic.unload_ipython_extension(ip)  # unloading twice is harmless

    ip.run_line_magic("load_ext", "torchmagic")
    check_loaded_once(ip)
    assert callbacks(ip) == loaded_callbacks
    ip.run_line_magic("summary", "nn.Linear(2, 2)")  # works after the round trip


def test_import_and_load_are_lazy() -> None:
    code = (
        "import sys, torchmagic\n"
        "heavy = [m for m in ('torch', 'IPython', 'ipywidgets', 'torchinfo') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'torchmagic')\n"
        "assert 'summary' in ip.magics_manager.magics['line']\n"
        "late = [m for m in ('ipywidgets', 'torchinfo') if m in sys.modules]\n"
        "assert not late, late\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_option_errors_name_the_magic_and_show_usage(ip: Any) -> None:
    from IPython.core.error import UsageError

    cases = [("summary", "m --frob", None, "%summary: unknown option --frob (usage: %summary "),
             ("meta_shape", "--nope", "x = 1", "%%meta_shape: unknown option --nope "
              "(usage: %%meta_shape "),
             ("tensor", "", None, "%tensor: the following arguments are required: EXPR")]
    for name, line, cell, start in cases:
        with pytest.raises(UsageError) as info:
            if cell is None:
                ip.run_line_magic(name, line)
            else:
                ip.run_cell_magic(name, line, cell)
        msg = str(info.value)
        assert msg.startswith(start), msg
        assert "\n" not in msg
