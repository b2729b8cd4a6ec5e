"""Where things live: ``device_report(obj)`` for a module, a tensor, an optimizer or a state dict.

For a module: parameters, buffers and existing ``.grad`` tensors per device (tensors, elements,
bytes, dtypes); a model spread over several devices is flagged and the modules on each device
listed (a subtree entirely on one device is listed once, by its root). For an optimizer: the
devices of the parameters it holds and of its state (``exp_avg``...), with the state tensors that
sit on another device than their parameter (the classic "loaded the optimizer, then moved the
model" bug). Always: one line of accelerator availability (CUDA, MPS, default device).

Reading only: nothing is moved, and CUDA is not initialised just to name devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core._result import Result
from torchmagic.core.errors import TorchMagicError, a_type
from torchmagic.core.state import default_device
from torchmagic.core.weights import is_uninitialized, nbytes_of, numel_of

MAX_MODULES_LISTED = 8


@dataclass
class DeviceUsage:
    """Tensors of one role (``parameters``, ``buffers``, ``grads``, ``optimizer state`` ...) on one
    device."""

    role: str
    device: str
    tensors: int = 0
    elements: int = 0
    bytes: int = 0
    dtypes: list[str] = field(default_factory=list)


@dataclass
class DeviceReport(Result):
    """What ``%device`` shows."""

    _display_module = "torchmagic.display.device"

    name: str
    kind: str  # "module", "tensor", "optimizer", "state dict"
    type_name: str
    usage: list[DeviceUsage]
    devices: list[str]  # devices of the parameters/buffers/tensor itself (not grads or state)
    mixed: bool
    modules_by_device: dict[str, list[str]] = field(default_factory=dict)
    mismatched_state: list[str] = field(default_factory=list)
    availability: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def availability() -> str:
    """One line: CUDA (devices, names when CUDA is already initialised), MPS, default device."""
    parts = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        desc = f"CUDA: yes, {n} device{'s' if n != 1 else ''}"
        if torch.cuda.is_initialized():  # naming devices would otherwise initialise CUDA
            names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
            desc += f" ({', '.join(names)}), current cuda:{torch.cuda.current_device()}"
        parts.append(desc + f", CUDA {torch.version.cuda}")
    elif torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        parts.append("CUDA: no (this torch build has no CUDA)")
    else:
        parts.append("CUDA: no (built with CUDA, no device visible)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        parts.append("MPS: yes")
    elif mps is not None and mps.is_built():
        parts.append("MPS: built, not available")
    else:
        parts.append("MPS: no")
    parts.append(f"default device: {default_device()}")
    return " | ".join(parts)


def _add(usage: dict[tuple[str, str], DeviceUsage], role: str, t: torch.Tensor) -> None:
    key = (role, str(t.device))
    u = usage.get(key)
    if u is None:
        u = usage[key] = DeviceUsage(role=role, device=str(t.device))
    u.tensors += 1
    u.elements += numel_of(t)  # an uninitialized (lazy) parameter: 0, noted in the report
    u.bytes += nbytes_of(t)
    dt = str(t.dtype).replace("torch.", "")
    if dt not in u.dtypes:
        u.dtypes.append(dt)


_ROLE_ORDER = ("tensor", "grad", "parameters", "buffers", "grads", "tensors", "optimizer state")


def _sorted(usage: dict[tuple[str, str], DeviceUsage]) -> list[DeviceUsage]:
    return sorted(usage.values(), key=lambda u: (_ROLE_ORDER.index(u.role), -u.bytes, u.device))


def _modules_by_device(model: nn.Module) -> dict[str, list[str]]:
    """Modules per device: a subtree entirely on one device is listed once, by its root."""
    subtree: dict[int, set[str]] = {}

    def devices_of(m: nn.Module) -> set[str]:
        key = id(m)
        if key not in subtree:
            own = {str(t.device) for t in [*m.parameters(recurse=False),
                                           *m.buffers(recurse=False)]}
            for child in m.children():
                own |= devices_of(child)
            subtree[key] = own
        return subtree[key]

    out: dict[str, list[str]] = {}

    def walk(m: nn.Module, path: str) -> None:
        devs = devices_of(m)
        label = path or "(root)"
        if len(devs) == 1:
            out.setdefault(next(iter(devs)), []).append(label)
            return
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            lst = out.setdefault(str(t.device), [])
            own = f"{label} (own tensors)"
            if own not in lst:
                lst.append(own)
        for name, child in m.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return out


def _flag_mixed(report: DeviceReport) -> None:
    devs = report.devices
    if len(devs) <= 1:
        return
    report.mixed = True
    real = [d for d in devs if d != "meta"]
    if len(real) > 1:
        report.warnings.append(
            f"MIXED DEVICES: {', '.join(devs)}. A forward that combines them fails with "
            "'Expected all tensors to be on the same device' unless the model moves data "
            "between devices on purpose (pipeline / manual model parallelism)")
    if "meta" in devs:
        report.warnings.append(
            "some tensors are on meta: they have shapes but no values; materialise them with "
            "model.to_empty(device=...) and load weights (or load_state_dict(..., assign=True))")


def _module_report(model: nn.Module, name: str) -> DeviceReport:
    usage: dict[tuple[str, str], DeviceUsage] = {}
    for p in model.parameters():
        _add(usage, "parameters", p)
    for b in model.buffers():
        _add(usage, "buffers", b)
    for p in model.parameters():
        if p.grad is not None:
            _add(usage, "grads", p.grad)
    devs = sorted({u.device for u in usage.values() if u.role != "grads"})
    report = DeviceReport(name=name, kind="module", type_name=type(model).__name__,
                          usage=_sorted(usage), devices=devs, mixed=False)
    if not usage:
        report.notes.append(f"{name} has no parameters or buffers")
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if is_uninitialized(t)]
    if lazy:
        shown = ", ".join(lazy[:4]) + (" ..." if len(lazy) > 4 else "")
        report.notes.append(f"{len(lazy)} uninitialized tensors of lazy modules ({shown}): their "
                            "device is where a first forward will create them; no elements yet")
    _flag_mixed(report)
    if report.mixed:
        report.modules_by_device = _modules_by_device(model)
    bad_grads = sum(1 for p in model.parameters() if p.grad is not None and p.grad.device != p.device)
    if bad_grads:
        report.warnings.append(f"{bad_grads} parameters have a .grad on another device than "
                               "the parameter itself")
    return report


def _tensor_report(t: torch.Tensor, name: str) -> DeviceReport:
    usage: dict[tuple[str, str], DeviceUsage] = {}
    _add(usage, "tensor", t)
    if (t.is_leaf or t.retains_grad) and t.grad is not None:
        _add(usage, "grad", t.grad)
    report = DeviceReport(name=name, kind="tensor", type_name=type(t).__name__,
                          usage=_sorted(usage), devices=[str(t.device)], mixed=False)
    if t.device.type == "cpu":
        try:
            pinned = t.is_pinned()
        except RuntimeError:  # no accelerator to pin for
            pinned = False
        report.notes.append("pinned (page-locked) memory: fast, async copies to the GPU"
                            if pinned else "pageable CPU memory (not pinned)")
    return report


def _optimizer_report(opt: torch.optim.Optimizer, name: str) -> DeviceReport:
    usage: dict[tuple[str, str], DeviceUsage] = {}
    seen: set[int] = set()
    params = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                _add(usage, "parameters", p)
    mismatched: list[str] = []
    scalars = 0
    index = {id(p): i for i, p in enumerate(params)}
    for p, st in opt.state.items():
        if not isinstance(st, Mapping):
            continue
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                continue
            _add(usage, "optimizer state", v)
            if v.dim() == 0:
                scalars += 1  # e.g. Adam's 'step' counter lives on the CPU by design
                continue
            if isinstance(p, torch.Tensor) and v.device != p.device:
                mismatched.append(f"param {index.get(id(p), '?')} ({tuple(p.shape)}) on "
                                  f"{p.device}: state '{key}' on {v.device}")
    devs = sorted({u.device for u in usage.values() if u.role == "parameters"})
    report = DeviceReport(name=name, kind="optimizer", type_name=type(opt).__name__,
                          usage=_sorted(usage), devices=devs, mixed=False,
                          mismatched_state=mismatched)
    _flag_mixed(report)
    if not opt.state:
        report.notes.append("no optimizer state yet: it is created at the first step(), "
                            "on each parameter's device")
    if scalars:
        report.notes.append(f"{scalars} scalar state tensors (e.g. 'step') may live on the CPU "
                            "by design")
    if mismatched:
        report.warnings.append(
            f"{len(mismatched)} optimizer state tensors are on another device than their "
            "parameter (moved the model after building/loading the optimizer?); step() will "
            "fail or copy: rebuild the optimizer after model.to(...), or load its state_dict "
            "after moving the model")
    return report


def _mapping_report(d: Mapping[Any, Any], name: str) -> DeviceReport:
    usage: dict[tuple[str, str], DeviceUsage] = {}
    for v in _iter_tensors(d.values()):
        _add(usage, "tensors", v)
    devs = sorted({u.device for u in usage.values()})
    report = DeviceReport(name=name, kind="state dict", type_name=type(d).__name__,
                          usage=_sorted(usage), devices=devs, mixed=False)
    _flag_mixed(report)
    return report


def _iter_tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, Mapping):
            yield from _iter_tensors(v.values())
        elif isinstance(v, (list, tuple)):
            yield from _iter_tensors(v)


def device_report(obj: Any, name: str = "object") -> DeviceReport:
    """Where ``obj`` (module, tensor, optimizer, or dict of tensors) lives; see the module doc.

    Raises :class:`TorchMagicError` for anything else.
    """
    if isinstance(obj, nn.Module):
        report = _module_report(obj, name)
    elif isinstance(obj, torch.Tensor):
        report = _tensor_report(obj, name)
    elif isinstance(obj, torch.optim.Optimizer):
        report = _optimizer_report(obj, name)
    elif isinstance(obj, Mapping) and any(True for _ in _iter_tensors(obj.values())):
        report = _mapping_report(obj, name)
    else:
        raise TorchMagicError(f"{name} is {a_type(obj)}; expected an nn.Module, a "
                              "tensor, an optimizer or a dict of tensors (state_dict)")
    report.availability = availability()
    return report
