"""Shared fixtures: an IPython shell with torchmagic loaded, and helpers to run magics."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="session")
def _shell() -> Any:
    from IPython.testing.globalipapp import start_ipython

    return start_ipython()


@pytest.fixture
def ip(_shell: Any) -> Any:
    """The test shell with torchmagic loaded, a clean user namespace, and torch imported in it."""
    _shell.run_line_magic("load_ext", "torchmagic")
    keep = set(_shell.user_ns)
    _shell.user_ns.update({"torch": torch, "nn": torch.nn})
    yield _shell
    _shell.run_line_magic("unload_ext", "torchmagic")
    for name in list(_shell.user_ns):
        if name not in keep:
            del _shell.user_ns[name]


def run(ip: Any, line: str, cell: str | None = None) -> tuple[Any, str]:
    """Run ``%line`` (or ``%%line`` with ``cell``) and return (return value, everything shown).

    What is shown: stdout plus the ``text/plain`` of every display output.
    """
    from IPython.utils.capture import capture_output

    name, _, rest = line.partition(" ")
    with capture_output() as cap:
        if cell is None:
            value = ip.run_line_magic(name, rest)
        else:
            value = ip.run_cell_magic(name, rest, cell)
    shown = cap.stdout + "".join(o.data.get("text/plain", "") + "\n" for o in cap.outputs)
    return value, shown


def outputs(ip: Any, line: str, cell: str | None = None) -> list[dict[str, Any]]:
    """The display bundles a magic publishes (mime type -> data)."""
    from IPython.utils.capture import capture_output

    name, _, rest = line.partition(" ")
    with capture_output() as cap:
        if cell is None:
            ip.run_line_magic(name, rest)
        else:
            ip.run_cell_magic(name, rest, cell)
    return [o.data for o in cap.outputs]


# -- test files whose optional test-only packages are missing skip, saying which ------------------
# The notebook and browser tests import nbformat & co. at the top; where those are not installed
# (the GPU machine of scripts/gpu_check.sh has only torch, pytest and the carried wheels) the file
# is reported as skipped with the missing names instead of failing the collection.
OPTIONAL_TEST_PACKAGES = frozenset({"nbformat", "nbclient", "nbconvert", "ipykernel", "jupyterlab",
                                    "playwright"})


def missing_optional_packages(path: Path) -> list[str]:
    """The optional test packages that ``path`` imports at module level and that are missing."""
    import ast
    import importlib.util

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return []  # let pytest report it as usual
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names & OPTIONAL_TEST_PACKAGES if importlib.util.find_spec(n) is None)


class _MissingPackagesModule(pytest.Module):
    """A test file that cannot be imported here: collected as one skip naming what is missing."""

    missing: list[str] = []

    def collect(self) -> Any:
        pytest.skip(f"needs {', '.join(self.missing)} (optional test packages, not installed here)")


def pytest_pycollect_makemodule(module_path: Path, parent: Any) -> Any:
    missing = missing_optional_packages(Path(module_path))
    if not missing:
        return None
    module = _MissingPackagesModule.from_parent(parent, path=Path(module_path))
    module.missing = missing
    return module
