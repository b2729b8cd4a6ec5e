"""Graphs and graph breaks of a ``torch.compile`` run, in the user's words and places.

:class:`Recorder` is the backend handed to dynamo: like ``torch._dynamo.explain`` (it uses the same
``_explain_graph_detail`` bookkeeping) it records every FX graph dynamo captures and, for graphs that
end in a graph break, dynamo's ``GraphCompileReason``; then it hands the graph to the real backend
(inductor, aot_eager, ...) and times that code generation, or runs the graph as captured
(``explain`` mode: tracing only).

:class:`Locator` turns a stack frame into a :class:`Place`: the cell line, or ``file:line`` inside
the module whose method it is, named by its path as ``%summary`` names it (``model.blocks.0.attn``).
The innermost frame comes from dynamo's reason (``user_stack``); the frames that called it are read
from the live Python stack while the backend runs, where each frame's ``self`` identifies the module
instance. :func:`parse_reason` splits dynamo's text into a title, the plain-words explanation, the
hints (torch's own suggestions) and the graph-break id (``GB0170``, documented on pytorch's graph
break site), and sorts it into a :data:`KINDS` kind.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RESUME = re.compile(r"torch_dynamo_resume_in_(?P<fn>.+)_at_(?P<line>\d+)$")
_GB_URL = re.compile(r"(https?://\S+/(gb\d+)\.html)", re.IGNORECASE)

#: Kinds of graph break, from dynamo's graph-break type.
KINDS = {
    "print": "a print or logging call (Python I/O runs outside the graph)",
    "item": "Tensor.item() / .tolist(): a tensor value turned into a Python number",
    "data-dependent branch": "an if/while on a tensor's value (the branch depends on data)",
    "dynamic shape op": "an op whose output shape depends on the data (nonzero, unique, masks)",
    "unsupported builtin": "a Python builtin dynamo cannot trace",
    "untraceable call": "a call into code dynamo does not trace (skipped or C functions)",
    "other": "another construct dynamo does not support",
}


@dataclass
class Place:
    """A place in the user's code: file, line, function and source text; ``in_cell`` for the
    cell itself; ``modules`` the module paths whose method this frame runs (one per instance
    when several modules share the class) and their ``module_class``."""

    filename: str
    line: int
    function: str
    code: str = ""
    in_cell: bool = False
    modules: list[str] = field(default_factory=list)
    module_class: str | None = None

    def where(self) -> str:
        """``cell line 3`` or ``models.py:57 in Block.forward (model.blocks.0)``."""
        if self.in_cell:
            return f"cell line {self.line}"
        name = short_file(self.filename)
        fn = self.function
        if self.module_class and "." not in fn:
            fn = f"{self.module_class}.{fn}"
        out = f"{name}:{self.line} in {fn}"
        if self.modules:
            shown = self.modules[0] + (f" and {len(self.modules) - 1} more"
                                       if len(self.modules) > 1 else "")
            out += f" ({shown})"
        return out


@dataclass
class GraphBreak:
    """One graph break as ``torch._dynamo.explain`` lists it (``break_reasons``), in plain words.

    ``title`` is dynamo's graph-break type, ``explanation`` its plain-words reason, ``hints`` its
    suggestions, ``gb_id``/``url`` the entry on pytorch's graph-break site, ``kind`` one of
    :data:`KINDS`. ``place`` is the innermost user frame, ``cell_line`` the cell line that was
    running, ``stack`` every user frame from the outermost in. ``graph`` is the 1-based graph that
    this break ended, ``run`` the call (1-based) during which it happened."""

    index: int
    kind: str
    title: str
    explanation: str
    hints: list[str]
    gb_id: str | None
    url: str | None
    place: Place | None
    cell_line: int | None
    stack: list[Place]
    reason: str
    graph: int
    run: int

    def where(self) -> str:
        if self.place is None:
            return "unknown place"
        out = self.place.where()
        if self.cell_line is not None and not self.place.in_cell:
            out = f"cell line {self.cell_line} -> {out}"
        return out


@dataclass
class GraphInfo:
    """One captured FX graph: the frame it came from, its ops, and how it ends (a graph break's
    title, or ``return``). ``ops`` counts call_function, call_method and call_module nodes
    (``explain``'s ``op_count`` counts call_function only); ``op_names`` the most frequent ones.
    ``compile_id``: dynamo's ``frame/n`` (as its logs write it); ``run``: the call (1-based);
    ``recompile``: the compile of a recompilation in this run (its guard failure is among the
    report's recompiles). ``codegen_seconds``: time in the backend (code generation; None in
    explain mode)."""

    index: int
    compile_id: str
    function: str
    ops: int
    op_names: list[tuple[str, int]]
    ends: str
    place: Place | None
    run: int
    recompile: bool
    codegen_seconds: float | None
    break_index: int | None = None  # the GraphBreak (1-based) this graph ends with
    break_kind: str | None = None   # its :data:`KINDS` kind (also in recompiled calls)


def parse_reason(reason: str) -> dict[str, Any]:
    """dynamo's reason text -> ``title``, ``explanation``, ``hints``, ``gb_id``, ``url``, ``kind``."""
    lines = [ln.rstrip() for ln in str(reason).splitlines()]
    title = lines[0].strip() if lines else ""
    explanation = ""
    hints: list[str] = []
    current: list[str] | None = None
    for ln in lines[1:]:
        s = ln.strip()
        if s.startswith("Explanation:"):
            explanation = s.removeprefix("Explanation:").strip()
            current = None
        elif s.startswith("Hint:"):
            hints.append(s.removeprefix("Hint:").strip())
            current = hints
        elif s.startswith(("Developer debug context", "For more details")) or not s:
            current = None
        elif current is hints and hints:
            hints[-1] += " " + s
        elif current is None and explanation and not hints and s and not s.startswith("#"):
            if ln.startswith("  ") and not ln.startswith("      "):
                explanation += " " + s
    url_match = _GB_URL.search(reason)
    url = url_match.group(1) if url_match else None
    gb_id = url_match.group(2).upper() if url_match else None
    if not explanation and title.startswith("generic_jump"):
        explanation = "a branch (if/while) on a tensor's value"
    return {"title": title, "explanation": explanation or title, "hints": hints,
            "gb_id": gb_id, "url": url, "kind": classify(title, explanation)}


def classify(title: str, explanation: str = "") -> str:
    """The :data:`KINDS` kind of a graph break from its title and explanation."""
    t = title.lower()
    e = explanation.lower()
    if "builtin operator" in t:
        if re.search(r"`(print|input)`", e):
            return "print"
        return "unsupported builtin"
    if "logging" in t or "logging" in e and "print" in e:
        return "print"
    if "item()" in t or ".tolist" in t or "tensor.item" in e:
        return "item"
    if "data-dependent branching" in t or t.startswith("generic_jump"):
        return "data-dependent branch"
    if "dynamic shape operator" in t or "data-dependent" in t:
        return "dynamic shape op"
    if "skip" in t or "skipped" in e or "unsupported function call" in t or \
            "unsupported method call" in t or "non-traceable" in e or "call_function" in t:
        return "untraceable call"
    return "other"


def display_function(name: str) -> str:
    """``torch_dynamo_resume_in_forward_at_8`` -> ``forward (resumed after line 8)``."""
    m = _RESUME.match(name)
    if m:
        inner = display_function(m.group("fn"))
        return f"{inner} (resumed after line {m.group('line')})"
    return name


_IPYTHON_INPUT = re.compile(r"^<ipython-input-(\d+)-[0-9a-f]+>$")


def short_file(filename: str) -> str:
    """``/a/b/models.py`` -> ``models.py``; IPython's ``<ipython-input-7-3fa2...>`` -> ``In [7]``."""
    m = _IPYTHON_INPUT.match(filename)
    return f"In [{m.group(1)}]" if m else os.path.basename(filename)


def original_function(name: str) -> str:
    """``torch_dynamo_resume_in_forward_at_8`` -> ``forward`` (the function in the source)."""
    while True:
        m = _RESUME.match(name)
        if not m:
            return name
        name = m.group("fn")


def norm_path(filename: str) -> str:
    """An absolute path for real files; pseudo-files (``<ipython-input-3-...>``) as they are."""
    return filename if filename.startswith("<") else os.path.abspath(filename)


def _user_file(filename: str) -> bool:
    f = norm_path(filename)
    if f.startswith(_TORCH_DIR) or f.startswith("<eval_with_key") or f.startswith("<frozen"):
        return False
    return True


def _last_line(code: Any) -> int:
    try:
        return max((ln for _, _, ln in code.co_lines() if ln), default=code.co_firstlineno)
    except Exception:  # noqa: BLE001 - exotic code objects
        return code.co_firstlineno


class Locator:
    """Maps frames to :class:`Place` s for the modules in ``roots`` (name -> module) and a cell
    (``cell_filename``/``cell_source``). Build it once per report."""

    def __init__(self, roots: Mapping[str, nn.Module] | None = None,
                 cell_filename: str | None = None, cell_source: str = "",
                 stop_files: tuple[str, ...] = ()) -> None:
        self.cell_filename = cell_filename
        self.cell_lines = cell_source.splitlines()
        self.stop_files = tuple(stop_files)
        self.paths: dict[int, str] = {}
        self.modules: list[tuple[str, nn.Module]] = []
        for root, mod in (roots or {}).items():
            for sub, m in mod.named_modules(remove_duplicate=False):
                path = f"{root}.{sub}" if sub else root
                self.paths.setdefault(id(m), path)
                self.modules.append((path, m))
        self._spans: dict[type, list[tuple[str, int, int, str]]] = {}

    def release(self) -> None:
        """Forget the modules: dynamo's guard managers (kept alive by weakref callbacks on
        long-lived objects such as classes) reference our ``guard_fail_fn``, which references
        this locator: the user's model must not stay alive through it."""
        self.modules = []
        self.paths = {}
        self._spans = {}

    def _class_spans(self, cls: type) -> list[tuple[str, int, int, str]]:
        spans = self._spans.get(cls)
        if spans is None:
            spans = []
            for klass in cls.__mro__:
                if klass is nn.Module or klass is object:
                    break
                for attr in vars(klass).values():
                    fn = getattr(attr, "__func__", attr)
                    code = getattr(fn, "__code__", None)
                    if code is not None:
                        spans.append((norm_path(code.co_filename), code.co_firstlineno,
                                      _last_line(code), klass.__name__))
            self._spans[cls] = spans
        return spans

    def owners(self, filename: str, line: int, within: nn.Module | None = None
               ) -> tuple[list[str], str | None]:
        """Module paths (and the class name) whose class defines code at ``filename:line``."""
        target = norm_path(filename)
        allowed: set[int] | None = None
        if within is not None:
            allowed = {id(m) for m in within.modules()}
        found: list[str] = []
        cls_name = None
        seen: set[int] = set()
        for path, mod in self.modules:
            if id(mod) in seen or (allowed is not None and id(mod) not in allowed):
                continue
            seen.add(id(mod))
            for fname, first, last, klass in self._class_spans(type(mod)):
                if fname == target and first <= line <= last:
                    found.append(path)
                    cls_name = klass
                    break
        return found, cls_name

    def source_line(self, filename: str, line: int) -> str:
        if filename == self.cell_filename:
            if 0 < line <= len(self.cell_lines):
                return self.cell_lines[line - 1].strip()
            return ""
        import linecache

        return linecache.getline(filename, line).strip()

    def place(self, filename: str, line: int, function: str,
              module: nn.Module | None = None, within: nn.Module | None = None) -> Place:
        """A :class:`Place`; ``module`` when the frame's ``self`` is known, else looked up by
        code location (restricted to modules inside ``within``)."""
        in_cell = filename == self.cell_filename
        modules: list[str] = []
        cls = None
        if not in_cell:
            if module is not None and id(module) in self.paths:
                modules = [self.paths[id(module)]]
                cls = type(module).__name__
            else:
                modules, cls = self.owners(filename, line, within)
        return Place(filename, line, original_function(function),
                     self.source_line(filename, line), in_cell, modules, cls)

    def live_callers(self, depth: int = 2) -> list[tuple[Place, nn.Module | None]]:
        """User frames on the Python stack right now (outermost first), up to the first frame of
        torchmagic's compile code: the callers of the frame dynamo is compiling."""
        out: list[tuple[Place, nn.Module | None]] = []
        frame = sys._getframe(depth)
        while frame is not None:
            filename = frame.f_code.co_filename
            path = norm_path(filename)
            if path.startswith(_HERE) or any(path.startswith(s) for s in self.stop_files):
                break
            if _user_file(filename):
                me = frame.f_locals.get("self") if frame.f_code.co_argcount else None
                module = me if isinstance(me, nn.Module) else None
                out.append((self.place(filename, frame.f_lineno, frame.f_code.co_name, module),
                            module))
            frame = frame.f_back  # type: ignore[assignment]
        out.reverse()
        return out

    def stack(self, frames: list[traceback.FrameSummary],
              callers: list[tuple[Place, nn.Module | None]],
              root_self: Any = None) -> list[Place]:
        """Callers from the live stack, then dynamo's user frames (innermost last).
        ``root_self``: the ``self`` of the frame dynamo compiled (the first of ``frames``)."""
        places = [p for p, _ in callers]
        within = next((m for _, m in reversed(callers) if m is not None), None)
        first = True
        for fs in frames:
            if not _user_file(fs.filename):
                continue
            module = root_self if first and isinstance(root_self, nn.Module) else None
            place = self.place(fs.filename, fs.lineno or 0, fs.name, module=module,
                               within=within)
            if module is not None and place.modules:
                within = module
            places.append(place)
            first = False
        return places


def compile_id_text(compile_id: Any) -> str:
    """dynamo's ``CompileId`` as its logs write it: ``frame/n`` (``n`` > 0: a recompile of the
    frame), ``""`` for None."""
    if compile_id is None:
        return ""
    return f"{compile_id.frame_id}/{compile_id.frame_compile_id}"


def current_compile_id() -> str:
    """The compile dynamo is running now (``frame/n``), or ``""`` outside one."""
    try:
        from torch._guards import CompileContext

        return compile_id_text(CompileContext.current_compile_id())
    except Exception:  # noqa: BLE001 - an internal change: the caller falls back
        return ""


def op_name(node: Any) -> str:
    target = node.target
    if node.op == "call_module":
        return str(target)
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    if name is None:
        name = str(target)
    overload = getattr(target, "_overloadpacket", None)
    if overload is not None:
        name = getattr(overload, "__name__", name)
    return name


class Recorder:
    """The backend handed to dynamo: records graphs and breaks, then compiles with ``inner``
    (a backend callable) or, when ``inner`` is None, runs each graph as captured."""

    def __init__(self, inner: Any, locator: Locator) -> None:
        self.inner = inner
        self.locator = locator
        self.graphs: list[GraphInfo] = []
        self.breaks: list[GraphBreak] = []
        self.run = 1
        self.recording = True  # False while timing: graphs compiled then are not reported
        self.codegen_seconds = 0.0
        self.extra_graphs = 0  # compiled while not recording (timing on copies)
        self._explain_state: tuple[list[Any], int, list[Any], list[Any]] = ([], 0, [], [])
        if inner is not None and hasattr(inner, "get_compiler_config"):
            self.get_compiler_config = inner.get_compiler_config
        if inner is not None and hasattr(inner, "backend_ctx_ctor"):
            self.backend_ctx_ctor = inner.backend_ctx_ctor

    @property
    def break_reasons(self) -> list[Any]:
        """dynamo's own ``GraphCompileReason`` objects, as ``explain`` collects them."""
        return self._explain_state[3]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if self.recording:
            self._record(gm)
        else:
            self.extra_graphs += 1
        if self.inner is None:
            return gm.forward
        start = time.perf_counter()
        try:
            return self.inner(gm, example_inputs)
        finally:
            spent = time.perf_counter() - start
            if self.recording:
                self.codegen_seconds += spent
                self.graphs[-1].codegen_seconds = spent

    def release(self) -> None:
        """Drop everything the run referenced (graphs, backend, modules)."""
        self._explain_state = ([], 0, [], [])
        self.inner = None
        self.locator.release()

    def _record(self, gm: torch.fx.GraphModule) -> None:
        from torch._dynamo.backends.debugging import _explain_graph_detail

        graphs, count, per_graph, reasons = self._explain_state
        n_reasons = len(reasons)
        _, graphs, count, per_graph, reasons = _explain_graph_detail(gm, graphs, count, per_graph,
                                                                     reasons)
        self._explain_state = (graphs, count, per_graph, reasons)
        compile_id = gm.meta.get("dynamo_compile_id") if hasattr(gm, "meta") else None
        cid = compile_id_text(compile_id) if compile_id is not None else current_compile_id()
        recompile = "/" in cid and cid.rsplit("/", 1)[1] != "0"
        nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method",
                                                       "call_module")]
        names = Counter(op_name(n) for n in nodes).most_common()
        reason = getattr(gm, "compile_subgraph_reason", None)
        callers = self.locator.live_callers(depth=3)
        user_stack = list(getattr(reason, "user_stack", None) or [])
        frame_self, frame_name = _compiled_frame()
        stack = self.locator.stack(user_stack, callers, frame_self)
        place = stack[-1] if stack else None
        code_name = frame_name or (user_stack[0].name if user_stack else
                                   (place.function if place else ""))
        function = display_function(code_name)
        is_break = len(reasons) > n_reasons
        ends = "return"
        if reason is not None and not is_break:
            ends = str(getattr(reason, "reason", "return")).splitlines()[0] or "return"
            ends = "return" if ends == "return_value" else ends
        index = len(self.graphs) + 1
        kind = None
        if is_break:
            info = parse_reason(reason.reason)  # type: ignore[union-attr]
            ends = info["title"]
            kind = info["kind"]
            cell_line = next((p.line for p in reversed(stack) if p.in_cell), None)
            self.breaks.append(GraphBreak(
                index=len(self.breaks) + 1, kind=info["kind"], title=info["title"],
                explanation=info["explanation"], hints=info["hints"], gb_id=info["gb_id"],
                url=info["url"], place=place, cell_line=cell_line, stack=stack,
                reason=str(reason.reason), graph=index, run=self.run))  # type: ignore[union-attr]
        self.graphs.append(GraphInfo(index, cid, function, len(nodes), names[:8], ends, place,
                                     self.run, recompile, None,
                                     len(self.breaks) if is_break else None, kind))


def _compiled_frame() -> tuple[Any, str | None]:
    """``self`` and the code name of the frame dynamo is compiling (its root translator holds
    the frame's locals and code)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if tx is None:
            return None, None
        return tx.f_locals.get("self"), tx.f_code.co_name
    except Exception:  # noqa: BLE001 - no translator (not tracing) or an internal change
        return None, None


def inner_backend(backend: str, mode: str | None, dynamic: bool | None,
                  options: dict[str, Any] | None = None) -> Any:
    """The backend callable ``torch.compile`` would build for ``backend``/``mode``."""
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, dynamic)
    return torch._TorchCompileWrapper(backend, mode, options, dynamic)


__all__ = ["KINDS", "GraphBreak", "GraphInfo", "Locator", "Place", "Recorder", "classify",
           "compile_id_text", "current_compile_id", "display_function", "inner_backend",
           "parse_reason"]
