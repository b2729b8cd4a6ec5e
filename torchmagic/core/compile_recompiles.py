"""Recompilations: which guard failed, why, and what torch suggests.

dynamo calls ``guard_fail_fn`` (a hook of ``torch._dynamo.optimize``) with a ``GuardFail`` for every
cached entry whose guards fail before it compiles a frame again; the reason is the text
``TORCH_LOGS=recompiles`` prints (``"1/0: tensor 'x' size mismatch at index 0. expected 2, actual
3"``), once per recompilation (one ``Recompiling function`` record). It does so inside the new
compile, whose id (``1/1``) :class:`GuardLog` records with the cell line and module that were
running: one recompilation is the failures sharing that id, and the graph it captures (if any)
carries the same id. :func:`recompiles` groups them into :class:`Recompile` s and classifies each: a
tensor's shape, dtype, device or ``requires_grad``, a Python value (an ``int`` attribute of a
module, an argument), a global, an object's identity, global torch state (grad mode, autocast).

Suggestions are torch's own where it has one (its ``HINT``, e.g. ``allow_unspec_int_on_nn_module``
for a module's int counter) and ``torch._dynamo.mark_dynamic`` / ``dynamic=True`` for shapes; each
comes as a line of code the tests run to check it removes the recompile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torchmagic.core.compile_graphs import Locator, Place, display_function

#: Kinds of recompilation (the guard that failed).
KINDS = {
    "shape": "a tensor's size or stride changed",
    "dtype": "a tensor's dtype changed",
    "device": "a tensor's device changed",
    "requires_grad": "a tensor's requires_grad changed",
    "value": "a Python value the code reads changed (an int/float/bool or a module attribute)",
    "global": "a global variable changed",
    "identity": "a different object was passed (another module, function or object)",
    "global state": "grad mode, autocast or another global torch setting changed",
    "other": "another guard failed",
}

_ID = re.compile(r"^\s*(?P<id>\d+/\d+):\s*")
_HINT = re.compile(r"\(HINT:\s*(?P<hint>.*?)\)\s*$")
_TENSOR = re.compile(r"tensor '(?P<name>[^']+)' (?P<what>[a-z_ ]+?) mismatch(?: at index "
                     r"(?P<index>\d+))?")
_FILE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')
_GLOBAL = re.compile(r"^G\[['\"][^'\"]+['\"]\]\s*(==|!=|is\b|<|>)")
_G_NAME = re.compile(r"G\[['\"]([^'\"]+)['\"]\]")
_CODE_HINT = re.compile(r"(torch\._dynamo\.config\.\w+\s*=\s*\w+)")


@dataclass
class GuardFailure:
    """One ``GuardFail`` as dynamo reported it, with where it happened."""

    run: int
    code: Any  # the code object whose cached entry failed
    reason: str
    callers: list[Place]
    compile_id: str = ""  # the compile dynamo started for this recompilation ("1/1")


@dataclass
class Recompile:
    """One recompilation of a frame.

    ``function``/``place``: the frame (its first line); ``cell_line`` the cell line running then;
    ``kind`` one of :data:`KINDS`; ``guard`` the failed check (``"s.calls == 2"``, ``"tensor 'x'
    size mismatch at index 0. expected 2, actual 3"``); ``hint`` torch's own hint; ``suggestion``
    plain words and ``code`` a line to run; ``reasons`` every entry's failure (dynamo checks each
    cached entry, most recent first); ``frames`` every frame recompiled for the same failed guard
    in that call (a forward split by graph breaks recompiles each piece); ``compile_ids`` the
    compiles dynamo started for it (``frame/n`` as in its logs and ``GraphInfo.compile_id``), one
    per frame recompilation; ``count`` the frame recompilations (``Recompiling function`` records
    of ``TORCH_LOGS=recompiles``)."""

    index: int
    run: int
    function: str
    place: Place | None
    cell_line: int | None
    kind: str
    guard: str
    hint: str | None
    suggestion: str | None
    code: str | None
    reasons: list[str] = field(default_factory=list)
    source_line: str | None = None  # the user line that created the failing guard
    frames: list[str] = field(default_factory=list)  # every frame recompiled for this cause
    compile_ids: list[str] = field(default_factory=list)
    count: int = 1  # frame recompilations for this cause ("Recompiling function" records)

    def where(self) -> str:
        out = self.place.where() if self.place is not None else self.function
        if self.cell_line is not None and not (self.place and self.place.in_cell):
            out = f"cell line {self.cell_line} -> {out}"
        return out


class GuardLog:
    """The ``guard_fail_fn`` given to dynamo: records each failure with the live call site."""

    def __init__(self, locator: Locator) -> None:
        self.locator = locator
        self.failures: list[GuardFailure] = []
        self.run = 1
        self.recording = True

    def __call__(self, fail: Any) -> None:
        if not self.recording:
            return
        from torchmagic.core.compile_graphs import current_compile_id

        callers = [p for p, _ in self.locator.live_callers(depth=2)]
        self.failures.append(GuardFailure(self.run, getattr(fail, "orig_code", None),
                                          str(getattr(fail, "reason", fail)), callers,
                                          current_compile_id()))


def _strip(reason: str) -> tuple[str, str, str | None, str | None]:
    """-> (compile id, guard text, hint, user source line)."""
    lines = reason.splitlines()
    first = lines[0] if lines else ""
    m = _ID.match(first)
    cid = m.group("id") if m else ""
    rest = first[m.end():] if m else first
    hint = None
    hm = _HINT.search(rest)
    if hm:
        hint = hm.group("hint").strip()
        rest = rest[:hm.start()]
    guard, _, comment = rest.partition("  #")
    source = comment.split("  #")[0].strip() or None if comment else None
    guard = guard.strip()
    if not guard:
        guard = rest.strip()
    return cid, guard, hint, source


def classify(guard: str) -> str:
    """The :data:`KINDS` kind of a failed guard's text."""
    g = guard.lower()
    tm = _TENSOR.search(guard)
    if tm:
        what = tm.group("what")
        if what in ("size", "stride"):
            return "shape"
        if what in ("dtype", "device", "requires_grad"):
            return what
    if "size mismatch" in g or "stride mismatch" in g or ".size()" in g or "sym_size" in g:
        return "shape"
    if "dtype" in g:
        return "dtype"
    if "device" in g:
        return "device"
    if "requires_grad" in g:
        return "requires_grad"
    if "global_state" in g or "grad_mode" in g or "autocast" in g or "torch_function_mode" in g:
        return "global state"
    if "___check_obj_id" in g or "id_match" in g or "___check_type_id" in g:
        return "identity"
    if _GLOBAL.match(guard.strip()):
        return "global"  # the global variable itself (an attribute of a global object: value)
    if re.search(r"==|!=|<=|>=|<|>", guard):
        return "value"
    return "other"


def _tensor_name(guard: str) -> tuple[str | None, int | None]:
    m = _TENSOR.search(guard)
    if not m:
        return None, None
    name = m.group("name")
    inner = re.search(r"\[['\"]([^'\"]+)['\"]\]$", name)
    if inner and name.startswith(("G[", "L[")):
        name = inner.group(1)
    index = m.group("index")
    return name, int(index) if index is not None else None


def suggest(kind: str, guard: str, hint: str | None) -> tuple[str | None, str | None]:
    """(plain-words suggestion, code to run) for a recompile, or (None, None)."""
    if hint:
        cm = _CODE_HINT.search(hint)
        return hint, cm.group(1) if cm else None
    if kind == "shape":
        name, index = _tensor_name(guard)
        if name and index is not None and name.isidentifier():
            code = f"torch._dynamo.mark_dynamic({name}, {index})"
            return (f"size {index} of {name} varies: call {code} on the tensor before its first "
                    "compiled call (or compile with dynamic=True, --dynamic) to compile one "
                    "dynamic-shape graph from the start; by default dynamo makes the size dynamic "
                    "on this recompile (automatic dynamic shapes)", code)
        return ("a size varies between calls: compile with dynamic=True (--dynamic) or mark the "
                "size with torch._dynamo.mark_dynamic(tensor, dim)", None)
    if kind == "dtype":
        return ("the dtype changed: cast inputs to one dtype (or expect one compiled graph per "
                "dtype)", None)
    if kind == "device":
        return "the device changed: keep inputs on one device", None
    if kind == "requires_grad":
        return ("requires_grad changed: call with the same requires_grad (or under the same "
                "torch.no_grad() setting) every time", None)
    if kind == "global state":
        return ("a global setting (grad mode, autocast, default dtype) differs from the first "
                "call: keep it the same around compiled calls", None)
    if kind == "global":
        return ("a global variable the code reads changed: pass it as an argument (a tensor if "
                "it varies often)", None)
    if kind == "value" and "___stack" in guard:
        return ("a Python value computed before a graph break (an .item() result, a size) is a "
                "constant of the code that resumes after the break: when it changes, that code "
                "recompiles; removing the graph break removes this recompile", None)
    if kind == "value":
        return ("a Python number the code reads changed: its value is baked into the compiled "
                "code; pass it as a tensor (torch.tensor(value)) if it changes often", None)
    if kind == "identity":
        return ("a different object (module instance, function) was used: each one compiles "
                "separately", None)
    return None, None


def _same_lookup(group: list[GuardFailure], ids: set[str], f: GuardFailure) -> bool:
    """Whether failure ``f`` belongs to the recompilation ``group`` is collecting: the same new
    compile; without its id, the same frame and call and an entry not yet seen."""
    lead = group[0]
    if lead.compile_id and f.compile_id:
        return lead.compile_id == f.compile_id
    return lead.code is f.code and lead.run == f.run and _strip(f.reason)[0] not in ids


def recompiles(failures: list[GuardFailure], locator: Locator) -> list[Recompile]:
    """Group failures into recompilations (one per frame lookup), describe each, and merge the
    recompilations of one call for the same failed guard into one :class:`Recompile`."""
    groups: list[list[GuardFailure]] = []
    ids: list[set[str]] = []
    for f in failures:
        cid = _strip(f.reason)[0]
        if groups and _same_lookup(groups[-1], ids[-1], f):
            groups[-1].append(f)
            ids[-1].add(cid)
        else:
            groups.append([f])
            ids.append({cid})
    out: list[Recompile] = []
    for group in groups:
        # the most recently compiled entry is the closest to the new call: its failure leads
        def order(f: GuardFailure) -> int:
            cid = _strip(f.reason)[0]
            return int(cid.split("/")[1]) if "/" in cid else -1

        lead = max(group, key=order)
        _, guard, hint, source = _strip(lead.reason)
        kind = classify(guard)
        suggestion, code = suggest(kind, guard, hint)
        resumed = lead.code is not None and lead.code.co_name.startswith("torch_dynamo_resume_in")
        if resumed and kind in ("shape", "dtype", "device", "requires_grad") and not hint:
            # a tensor made before the graph break, passed to the code that resumes after it:
            # marking it is not something the user can do; the input's recompile says it all
            suggestion, code = ("this tensor was computed before a graph break and handed to the "
                                "code that resumes after it: it follows the input's change "
                                "(see the recompile of the function's own frame)"), None
        guard = _G_NAME.sub(r"\1", guard)  # G['counter'].n -> counter.n (as L[...] already is)
        obj = lead.code
        place = None
        function = ""
        if obj is not None:
            function = display_function(obj.co_name)
            place = locator.place(obj.co_filename, obj.co_firstlineno, obj.co_name)
            fm = _FILE.search(lead.reason)
            if fm:
                place = locator.place(fm.group("file"), int(fm.group("line")), fm.group("fn"))
        cell_line = next((p.line for p in reversed(lead.callers) if p.in_cell), None)
        if place is not None and place.in_cell:
            cell_line = place.line
        new_ids = [lead.compile_id] if lead.compile_id else []
        same = next((r for r in out if r.run == lead.run and r.guard == guard), None)
        if same is not None:  # one cause, several frames (a forward split by graph breaks)
            if function not in same.frames:
                same.frames.append(function)
            same.compile_ids += new_ids
            same.count += 1
            continue
        out.append(Recompile(len(out) + 1, lead.run, function, place, cell_line, kind, guard,
                             hint, suggestion, code,
                             [_G_NAME.sub(r"\1", _strip(f.reason)[1]) for f in group],
                             source, [function], new_ids))
    return out


__all__ = ["KINDS", "GuardFailure", "GuardLog", "Recompile", "classify", "recompiles",
           "suggest"]
