"""torchmagic: IPython magics that answer the questions people ask about PyTorch models.

In a notebook: ``%load_ext torchmagic``. In a script, the same answers come from plain functions
(``torchmagic.summary``, ``torchmagic.params``, ...), each returning a result object with text, HTML
and ``to_dict()``.

Importing this package is cheap and has no side effects: torch, IPython and ipywidgets are imported
only when a function or the extension is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torchmagic._version import __version__

# Public name -> module that defines it (imported on first access).
_API: dict[str, str] = {
    "TorchMagicError": "torchmagic.core.errors",
    "ForwardError": "torchmagic.core.errors",
    "meta_twin": "torchmagic.core.twin",
    "summary": "torchmagic.core.summary",
    "ModelSummary": "torchmagic.core.summary",
    "params": "torchmagic.core.params",
    "ParamReport": "torchmagic.core.params",
    "meta_shape": "torchmagic.core.meta",
    "MetaShapeReport": "torchmagic.core.meta",
    "find_anomaly": "torchmagic.core.anomaly",
    "AnomalyDetector": "torchmagic.core.anomaly",
    "amp": "torchmagic.core.amp",
    "tensor_info": "torchmagic.core.tensor",
    "tensor_report": "torchmagic.core.tensor",
    "tensor_stats": "torchmagic.core.tensor",
    "tensors": "torchmagic.core.tensor",
    "device_report": "torchmagic.core.device",
    "freeze": "torchmagic.core.freeze",
    "unfreeze": "torchmagic.core.freeze",
    "save_checkpoint": "torchmagic.core.checkpoint",
    "load_checkpoint": "torchmagic.core.checkpoint",
    "benchmark": "torchmagic.core.bench",
    "compare_benchmarks": "torchmagic.core.bench",
    "profile": "torchmagic.core.profile",
    "gpumem": "torchmagic.core.memory",
    "measure_memory": "torchmagic.core.memory",
    "memory_meter": "torchmagic.core.memory",
    "top_tensors": "torchmagic.core.memory",
    "record_memory_history": "torchmagic.core.memory",
    "estimate_memory": "torchmagic.core.estimate",
    "MemoryEstimate": "torchmagic.core.estimate",
    "explain_compile": "torchmagic.core.compile",
    "CompileReport": "torchmagic.core.compile",
}

if TYPE_CHECKING:  # pragma: no cover
    from torchmagic.core.amp import amp  # noqa: F401
    from torchmagic.core.anomaly import AnomalyDetector, find_anomaly  # noqa: F401
    from torchmagic.core.bench import benchmark, compare_benchmarks  # noqa: F401
    from torchmagic.core.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
    from torchmagic.core.compile import CompileReport, explain_compile  # noqa: F401
    from torchmagic.core.device import device_report  # noqa: F401
    from torchmagic.core.errors import ForwardError, TorchMagicError  # noqa: F401
    from torchmagic.core.estimate import MemoryEstimate, estimate_memory  # noqa: F401
    from torchmagic.core.freeze import freeze, unfreeze  # noqa: F401
    from torchmagic.core.memory import (  # noqa: F401
        gpumem,
        measure_memory,
        memory_meter,
        record_memory_history,
        top_tensors,
    )
    from torchmagic.core.meta import MetaShapeReport, meta_shape  # noqa: F401
    from torchmagic.core.params import ParamReport, params  # noqa: F401
    from torchmagic.core.profile import profile  # noqa: F401
    from torchmagic.core.summary import ModelSummary, summary  # noqa: F401
    from torchmagic.core.tensor import tensor_info, tensor_report, tensor_stats, tensors  # noqa: F401
    from torchmagic.core.twin import meta_twin  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'torchmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext torchmagic``: register every magic (loading twice never doubles them)."""
    from torchmagic.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext torchmagic``: remove every magic and callback the extension added."""
    from torchmagic.magics import unload

    unload(ipython)


__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", *_API]
