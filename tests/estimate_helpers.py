"""Test helpers shared by the estimate tests (not a test module)."""

from __future__ import annotations

import gc
import types


def free_reference_cycles() -> None:
    """Collect what the tests leave in reference cycles: fake twins and exception tracebacks,
    and the graphs a *plain* ``MemTracker`` (the tests' reference) keeps alive for good: its
    ``ModTracker`` registers ``register_multi_grad_hook`` closures that hold the ``grad_fn``
    nodes which hold them (a cycle through C++ the collector cannot see). Emptying those closures'
    ``grad_fns`` lists breaks it (torchmagic's own tracker does this itself)."""
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__name__ == "inner_hook" and \
                obj.__module__ == "torch.autograd.graph":
            for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                if var == "grad_fns" and isinstance(cell.cell_contents, list):
                    cell.cell_contents.clear()
    gc.collect()
