"""Results of ``%%detect_anomaly`` and where user code is: frames, cell lines, module names."""

from __future__ import annotations

import re
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn

from torchmagic.core._result import Result

_FRAME_RE = re.compile(r'^\s*File "(.+)", line (\d+), in (.+)$')
_LIBRARY_PARTS = ("/torch/", "/torchmagic/", "/IPython/", "/ipykernel/", "/traitlets/",
                  "/tornado/", "/zmq/", "/jupyter_client/", "/_pytest/", "/pluggy/")
_STDLIB = tuple(p.replace("\\", "/") for p in {sysconfig.get_paths().get("stdlib", "@"),
                                               sysconfig.get_paths().get("platstdlib", "@")})


# -- results --------------------------------------------------------------------------------------
@dataclass
class Frame:
    """One line of user code: a cell line (``cell=True``) or a line in a user file."""

    filename: str
    line: int
    function: str
    source: str
    cell: bool = False

    def label(self) -> str:
        if self.cell:
            return f"cell line {self.line}"
        name = self.filename.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name}:{self.line} in {self.function}"


@dataclass
class OpEvent:
    """An op whose floating output held NaN or Inf."""

    index: int                           # op number in the run (0-based, forward and backward)
    op: str                              # "aten.log"
    phase: str                           # "forward" or "backward"
    nan: int                             # NaN count in the outputs
    inf: int                             # Inf count in the outputs
    input_nan: bool                      # some floating input already held NaN
    input_inf: bool                      # some floating input already held Inf
    explicit_inf: bool                   # the op was given a ±inf scalar (a mask)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    module_path: str | None = None       # innermost running module ("mlp.2"), None outside modules
    module_class: str | None = None
    node: str | None = None              # autograd node running it (backward)
    cell_line: Frame | None = None       # the cell line running when it happened
    where: Frame | None = None           # innermost user frame (e.g. a forward in a user file)
    forward_trace: list[Frame] = field(default_factory=list)  # backward: forward line(s) of node
    _call: int | None = None             # index of the module call (resolved to a name at the end)

    @property
    def inputs_held(self) -> str:
        """What the op's floating inputs held: ``"finite inputs"``, ``"inputs holding Inf"``,
        ``"inputs holding NaN"`` or ``"inputs holding NaN and Inf"`` (as the report says it)."""
        held = [w for w, on in (("NaN", self.input_nan), ("Inf", self.input_inf)) if on]
        return "inputs holding " + " and ".join(held) if held else "finite inputs"

    @property
    def born(self) -> bool:
        """True when this op produced a NaN its inputs did not hold (from finite inputs, or a NaN
        from Inf: ``cos(inf)``, ``inf - inf``), or an Inf from finite inputs (an Inf from a mask
        does not count). :attr:`inputs_held` says which."""
        if self.nan and not self.input_nan:
            return True
        return bool(self.inf and not self.input_nan and not self.input_inf
                    and not self.explicit_inf)


@dataclass
class SpreadEntry:
    """A module whose output became non-finite after the origin."""

    module_path: str
    module_class: str
    calls: int
    nan: int
    inf: int
    output_shapes: list[tuple[int, ...]]


@dataclass
class BackwardFinding:
    """The autograd node that produced NaN/Inf gradients, and the forward line that created it."""

    node: str                            # "SqrtBackward0"
    kind: str                            # "NaN" or "Inf"
    message: str                         # torch's message, or ours for Inf gradients
    output_index: int | None = None
    op: str | None = None                # the aten op inside the node (from the dispatch check)
    forward_trace: list[Frame] = field(default_factory=list)  # user frames, outermost first
    raised: bool = False                 # anomaly mode raised (the cell stopped at backward)

    @property
    def forward_line(self) -> Frame | None:
        """The innermost user frame of the forward call that created the node."""
        return self.forward_trace[-1] if self.forward_trace else None

    @property
    def cell_line(self) -> Frame | None:
        cells = [f for f in self.forward_trace if f.cell]
        return cells[-1] if cells else None


@dataclass
class AnomalyReport(Result):
    """What ``find_anomaly`` / ``%%detect_anomaly`` found."""

    _display_module: ClassVar[str] = "torchmagic.display.anomaly"

    forward_checked: bool
    backward_checked: bool
    device: str = "cpu"
    forward_ops: int = 0                 # forward ops whose outputs were checked
    backward_ops: int = 0                # backward ops checked
    origin: OpEvent | None = None
    origin_kind: str | None = None       # "born" (from finite inputs) or "input" (already there)
    births: list[OpEvent] = field(default_factory=list)  # first N ops where NaN/Inf was born
    births_total: int = 0
    nonfinite_ops: int = 0               # forward ops with a NaN/Inf output
    spread: list[SpreadEntry] = field(default_factory=list)
    masks: int = 0                       # ops that wrote an explicit ±inf (masks, not anomalies)
    backward: BackwardFinding | None = None
    error: str | None = None             # the user's own exception (re-raised by callers)
    error_line: Frame | None = None
    first: int = 1

    @property
    def clean(self) -> bool:
        return self.origin is None and self.backward is None

    @property
    def summary(self) -> str:
        """One line: the verdict."""
        if self.clean:
            halves = [h for h, on in (("forward", self.forward_checked),
                                      ("backward", self.backward_checked)) if on]
            counts = f"checked {_ops(self.forward_ops, 'forward')}" if self.forward_checked \
                else "forward not checked"
            if self.backward_checked:
                counts += f", {_ops(self.backward_ops, 'backward')}" if self.backward_ops else \
                    "; no backward ran"
            else:
                counts += "; backward not checked"
            if self.masks:
                counts += f"; {self.masks} ±inf mask{'s' * (self.masks != 1)} ignored"
            return f"no NaN/Inf in {' or '.join(halves)} ({counts})"
        parts = []
        if self.origin is not None:
            o = self.origin
            what = "NaN" if o.nan else "Inf"
            where = f" in {o.module_path}" if o.module_path else ""
            line = f" at {o.cell_line.label()}" if o.cell_line else ""
            verb = "born in" if self.origin_kind == "born" else "entered through"
            held = f" from {o.inputs_held}" if self.origin_kind == "born" and (
                o.input_nan or o.input_inf) else ""
            parts.append(f"forward {what} {verb} {o.op}{held}{where}{line}")
        if self.backward is not None:
            b = self.backward
            fl = b.cell_line or b.forward_line
            parts.append(f"backward {b.kind} in {b.node}" + (f" (from {fl.label()})" if fl else ""))
        return "; ".join(parts)


def _ops(n: int, phase: str) -> str:
    return f"{n:,} {phase} op{'s' * (n != 1)}"


# -- locating user code -----------------------------------------------------------------------------
_lib_cache: dict[str, bool] = {}


def _is_library(filename: str) -> bool:
    hit = _lib_cache.get(filename)
    if hit is None:
        f = filename.replace("\\", "/")
        hit = (any(p in f for p in _LIBRARY_PARTS) or f.startswith("<frozen")
               or f.startswith("<string>") or any(f.startswith(s) for s in _STDLIB if s != "@"))
        _lib_cache[filename] = hit
    return hit


def _source(filename: str, line: int) -> str:
    import linecache

    return linecache.getline(filename, line).strip()


def _locate(cell_filename: str | None) -> tuple[Frame | None, Frame | None]:
    """(cell line, innermost user frame) of the code running now."""
    frame = sys._getframe(2)
    cell = where = None
    while frame is not None:
        fn = frame.f_code.co_filename
        if cell_filename is not None and fn == cell_filename:
            cell = Frame(fn, frame.f_lineno, frame.f_code.co_name, _source(fn, frame.f_lineno), True)
            if where is None:
                where = cell
            break
        if where is None and not _is_library(fn):
            where = Frame(fn, frame.f_lineno, frame.f_code.co_name, _source(fn, frame.f_lineno))
            if cell_filename is None:
                break
        frame = frame.f_back
    return cell, where


def parse_forward_trace(text: str | list[str], cell_filename: str | None) -> list[Frame]:
    """User frames (outermost first) of a forward traceback torch recorded in anomaly mode."""
    lines = "".join(text).splitlines() if isinstance(text, list) else text.splitlines()
    out: list[Frame] = []
    for i, ln in enumerate(lines):
        m = _FRAME_RE.match(ln)
        if not m:
            continue
        fn, lineno, func = m.group(1), int(m.group(2)), m.group(3).strip()
        is_cell = cell_filename is not None and fn == cell_filename
        if not is_cell and _is_library(fn):
            continue
        src = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME_RE.match(lines[i + 1]) \
            else _source(fn, lineno)
        if src.startswith("(Triggered internally"):
            src = _source(fn, lineno)
        out.append(Frame(fn, lineno, func, src, is_cell))
    # Frames outside (callers of) the cell are the notebook machinery that ran the cell.
    first_cell = next((i for i, f in enumerate(out) if f.cell), None)
    return out[first_cell:] if first_cell is not None else out


def module_names(namespace: Mapping[str, Any] | None) -> dict[str, nn.Module]:
    """The modules bound to public names in a namespace (``{"mlp": mlp}``), shortest names first."""
    if not namespace:
        return {}
    roots = {}
    for name in sorted(namespace, key=lambda n: (len(n), n)):
        if name.startswith("_") or name in ("In", "Out"):
            continue
        try:
            value = namespace[name]
        except Exception:  # noqa: BLE001 - exotic mappings
            continue
        if isinstance(value, nn.Module):
            roots[name] = value
    return roots


def _names_of(roots: Mapping[str, nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for prefix, root in roots.items():
        try:
            for name, mod in root.named_modules(remove_duplicate=False):
                names.setdefault(id(mod), ".".join(p for p in (prefix, name) if p))
        except Exception:  # noqa: BLE001 - a broken user module must not break the report
            continue
    return names


__all__ = ["AnomalyReport", "BackwardFinding", "Frame", "OpEvent", "SpreadEntry", "locate",
           "module_names", "names_of", "parse_forward_trace", "source_line"]
locate, names_of, source_line, is_library = _locate, _names_of, _source, _is_library
