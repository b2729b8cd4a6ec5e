"""Run ``torch.compile`` for a report without touching the user's compile state.

``torch._dynamo.explain`` starts and ends with ``torch._dynamo.reset()``, which throws away every
compiled function of the session: a model the user compiled before would compile again on its next
call. :class:`DynamoSandbox` does what ``explain`` needs without that:

- every compile it makes uses ``torch.compile(..., isolate_recompiles=True)``: its cache entries live
  in a region of their own (they neither reuse the user's entries, which are also guarded on another
  backend object, nor count against the user's ``recompile_limit``);
- on exit, the region's entries are dropped: ``reset_code`` on code objects that held nothing else
  (the cell, functions the user never compiled), otherwise each entry is invalidated the way dynamo
  invalidates an entry whose guarded object died (its guards then always fail and its compiled code
  is released; dynamo keeps the dead slot, which counts towards ``accumulated_recompile_limit``);
- process-wide bookkeeping a compile changes is put back: ``torch._dynamo.utils.counters``,
  ``guard_failures``, ``graph_break_reasons``, ``compilation_time_metrics``, the automatic-dynamic
  state of every code object (``torch._dynamo.pgo``: a shape our run saw change must not make the
  user's next compile dynamic; our run starts from an empty one, as ``explain`` after its reset
  does, so that sizes and values the user's own calls made dynamic do not change its graphs and
  breaks), the graph-break log de-duplication, ``warn_once`` caches and the
  backends dynamo keeps alive (``cached_backends``), so nothing of the run stays referenced;
- ``torch._dynamo.config`` and ``torch._inductor.config`` are restored to their values on entry.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

_REASON = "torchmagic's compile report is over (its compiled code is dropped)"


def _config_modules() -> list[Any]:
    mods = [sys.modules.get("torch._dynamo.config"), sys.modules.get("torch._inductor.config")]
    return [m for m in mods if m is not None and hasattr(m, "get_config_copy")]


class DynamoSandbox:
    """Context manager: compile with :meth:`compile` inside it; everything is put back on exit.

    ``regions`` holds the ``isolate_recompiles`` ids of the compiles made; ``backends`` the backend
    objects handed to dynamo (dropped from ``cached_backends`` on exit); ``codes`` extra code
    objects whose entries are dropped (the cell function's, also when dynamo never saw it).
    """

    def __init__(self) -> None:
        self.regions: list[int] = []
        self.backends: list[Any] = []
        self.codes: list[types.CodeType] = []
        self._saved: dict[str, Any] = {}
        self._configs: list[tuple[Any, dict[str, Any]]] = []
        self._scopes: list[tuple[dict[str, Any], set[str]]] = []
        self.keep: set[str] = set()  # names the caller's own code binds (a cell's assignments)
        self.invalidated = 0  # entries invalidated in code objects the user also compiled
        self.kept = 0  # entries this torch gave no way to invalidate
        self._modes: weakref.WeakSet[Any] = weakref.WeakSet()  # fake modes made inside
        self._mode_init: Any = None

    # -- entering ----------------------------------------------------------------------------------
    def __enter__(self) -> DynamoSandbox:
        import torch._dynamo  # noqa: F401 - loads dynamo (and its config) once
        import torch._dynamo.eval_frame as eval_frame
        import torch._dynamo.utils as dutils

        self._configs = [(m, m.get_config_copy()) for m in _config_modules()]
        s = self._saved
        s["counters"] = {k: Counter(v) for k, v in dutils.counters.items()}
        s["guard_failures"] = {k: list(v) for k, v in dutils.guard_failures.items()}
        s["graph_break_reasons"] = list(dutils.graph_break_reasons)
        s["time_metrics"] = {k: list(v) for k, v in dutils.compilation_time_metrics.items()}
        s["warn_once"] = set(getattr(dutils, "warn_once_cache", ()))
        pgo = _optional("torch._dynamo.pgo")
        if pgo is not None:  # automatic-dynamic state (torch 2.6+)
            s["code_state"] = copy.deepcopy(pgo._CODE_STATE)
            s["init_code_state"] = copy.deepcopy(pgo._INIT_CODE_STATE)
            fresh = getattr(pgo, "CodeState", None)
            if fresh is not None:  # our run starts as explain's (after its reset) would
                from collections import defaultdict

                pgo._CODE_STATE = defaultdict(fresh)
                pgo._INIT_CODE_STATE = defaultdict(fresh)
        checker = _dup_checker()
        if checker is not None:
            s["dup_checker"] = copy.copy(checker.set)
            checker.reset()  # our graph-break log lines are not hidden by the user's earlier ones
        s["cached_backends"] = set(getattr(eval_frame, "cached_backends", {}))
        self._watch_fake_modes()
        return self

    def _watch_fake_modes(self) -> None:
        """Note every ``FakeTensorMode`` made while the sandbox is open (dynamo makes one per
        compile attempt), so that leaving needs no scan of the garbage collector's objects
        (~0.1 s in a large session); ``FakeTensorMode.__init__`` is put back on exit."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        original = FakeTensorMode.__dict__["__init__"]
        modes = self._modes

        @functools.wraps(original)
        def init(mode: Any, *args: Any, **kwargs: Any) -> None:
            original(mode, *args, **kwargs)
            modes.add(mode)

        self._mode_init = original
        FakeTensorMode.__init__ = init  # type: ignore[method-assign]

    def watch_scope(self, scope: dict[str, Any]) -> None:
        """Remember the names in ``scope`` (globals of code about to be compiled): on exit, the
        dunder names dynamo added there (``__compiled_fn_*``, ``__builtins_dict___*``, ...,
        including those of abandoned tracing attempts, which dynamo never removes) are deleted."""
        if not any(s is scope for s, _ in self._scopes):
            self._scopes.append((scope, set(scope)))

    # -- compiling ---------------------------------------------------------------------------------
    def compile(self, fn: Any, backend: Any, *, fullgraph: bool = False,
                dynamic: bool | None = None,
                guard_fail_fn: Callable[[Any], None] | None = None) -> Any:
        """``torch.compile(fn, backend=backend, ...)`` in an isolated cache region of this sandbox
        (through ``torch._dynamo.optimize``, which also takes ``guard_fail_fn``: the reasons of
        every recompilation). Without isolated regions (torch before 2.12) the entries go to the
        shared cache and are found by their backend on exit."""
        import torch._dynamo

        self.backends.append(backend)
        kwargs: dict[str, Any] = {}
        if isolation_supported():
            kwargs["isolate_recompiles"] = True
        ctx = torch._dynamo.optimize(backend, nopython=fullgraph, dynamic=dynamic,
                                     guard_fail_fn=guard_fail_fn, **kwargs)
        compiled = ctx(fn)
        region = getattr(ctx, "_isolate_recompiles_id", None)
        if region is None:
            region = getattr(compiled, "_isolate_recompiles_id", -1)
        if region >= 0:
            self.regions.append(region)
        return compiled

    # -- leaving -----------------------------------------------------------------------------------
    def __exit__(self, *exc: object) -> None:
        try:
            self._drop_entries()
            self._clean_scopes()
            self._break_fake_cycles()
        finally:
            self._restore()

    def _break_fake_cycles(self) -> None:
        """Release what dynamo would keep of our compiles once their code is dropped.

        - every ``CheckFunctionManager`` no cache entry uses (ours, dropped; those a
          ``torch._dynamo.reset()`` orphaned), found through the ``weakref.finalize``
          callbacks that keep it: they sit on the objects its guards watch (classes,
          functions: they live for ever) and, through its C++ guard tree, keep the guarded
          objects alive (our copy of the model, hence the user's parameters). Its guards are
          replaced by a deleted marker and its finalizers detached. Guard managers of live cache
          entries (the user's compiled code) are not touched;
        - the fake modes made inside the sandbox: ``tracked_fakes`` is emptied; it only serves the compile that made the mode, which
          is over. Under grad mode a fake tensor's autograd graph (C++, invisible to the garbage
          collector) links fakes that hold their mode, whose ``tracked_fakes`` holds them
          (``torch._dynamo.explain`` and ``reset()`` leave them alive)."""
        from torch._dynamo.guards import DeletedGuardManagerWrapper

        live = _live_guard_managers()
        cfms = [c for c in _finalized_cfms()
                if not isinstance(getattr(c, "guard_manager", None), DeletedGuardManagerWrapper)
                and id(getattr(c, "guard_manager", None)) not in live]
        if cfms:
            _retire(cfms)
        for mode in list(self._modes):
            tracked = getattr(getattr(mode, "shape_env", None), "tracked_fakes", None)
            if isinstance(tracked, list):
                tracked.clear()

    def _clean_scopes(self) -> None:
        removed: set[tuple[int, str]] = set()
        for scope, before in self._scopes:
            for key in [k for k in scope if k not in before]:
                if key.startswith("__") and not key.startswith("__import_") and \
                        key != "__builtins__" and key not in self.keep:
                    scope.pop(key, None)
                    removed.add((id(scope), key))
        if removed:
            _forget_cleanup_hooks(removed)

    def _mine(self, code: types.CodeType) -> tuple[list[Any], int]:
        """(our cache entries in ``code``, how many entries it has in all)."""
        from torch._C._dynamo import eval_frame as c_eval_frame

        listed = c_eval_frame._debug_get_cache_entry_list(code)
        total_fn = getattr(c_eval_frame, "_get_total_cache_entry_count", None)
        total = total_fn(code) if total_fn is not None else len(listed)
        if self.regions:
            by_region = c_eval_frame._get_cache_entries_for_region
            return [e for r in self.regions for e in by_region(code, r)], total
        return [e for e in listed
                if any(_unwrap(getattr(e, "backend", None)) is _unwrap(b)
                       for b in self.backends)], total

    def _drop_entries(self) -> None:
        import torch._dynamo.convert_frame as convert_frame
        from torch._C._dynamo.eval_frame import reset_code

        codes = []
        for tracker in (convert_frame.input_codes, convert_frame.output_codes):
            for ref in list(tracker.seen):
                code = ref()
                if code is not None:
                    codes.append(code)
        codes.extend(self.codes)
        out_codes: list[types.CodeType] = []
        done: set[int] = set()
        for code in codes:
            if id(code) in done:
                continue
            done.add(id(code))
            mine, total = self._mine(code)
            if not mine:
                continue
            out_codes.extend(e.code for e in mine if getattr(e, "code", None) is not None)
            if total == len(mine):
                reset_code(code)  # nothing of the user's there: forget the code entirely
            else:
                for entry in mine:
                    self._invalidate(entry)
        _remove_installed_globals(out_codes)

    def _invalidate(self, entry: Any) -> None:
        try:
            from torch._dynamo.guards import DeletedGuardManagerWrapper

            manager = entry.guard_manager
            state = getattr(manager, "extra_state", None)
            owner = getattr(manager, "cache_entry", None)
            if state is None or owner is None or isinstance(manager, DeletedGuardManagerWrapper):
                return
            state.invalidate(owner, DeletedGuardManagerWrapper(_REASON))
            self.invalidated += 1
        except Exception:  # noqa: BLE001 - another torch's internals: the entry stays
            self.kept += 1

    def _restore(self) -> None:
        import torch._dynamo.eval_frame as eval_frame
        import torch._dynamo.utils as dutils

        if self._mode_init is not None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            FakeTensorMode.__init__ = self._mode_init  # type: ignore[method-assign]
            self._mode_init = None
        s = self._saved
        for module, values in self._configs:
            current = module.get_config_copy()
            for key, value in values.items():
                try:
                    same = key not in current or current[key] is value or current[key] == value
                except Exception:  # noqa: BLE001 - values that cannot be compared: put back
                    same = False
                if not same:
                    setattr(module, key, value)
        dutils.counters.clear()
        for key, value in s["counters"].items():
            dutils.counters[key] = Counter(value)
        dutils.guard_failures.clear()
        dutils.guard_failures.update({k: list(v) for k, v in s["guard_failures"].items()})
        dutils.graph_break_reasons[:] = s["graph_break_reasons"]
        dutils.compilation_time_metrics.clear()
        dutils.compilation_time_metrics.update(s["time_metrics"])
        if hasattr(dutils, "warn_once_cache"):
            dutils.warn_once_cache.clear()
            dutils.warn_once_cache.update(s["warn_once"])
        pgo = _optional("torch._dynamo.pgo")
        if pgo is not None and "code_state" in s:
            pgo._CODE_STATE = s["code_state"]
            pgo._INIT_CODE_STATE = s["init_code_state"]
        checker = _dup_checker()
        if checker is not None and "dup_checker" in s:
            checker.set = s["dup_checker"]
        cached = getattr(eval_frame, "cached_backends", {})
        for key in set(cached) - s["cached_backends"]:
            if any(cached[key] is b for b in self.backends):
                del cached[key]
        self.backends.clear()


def _unwrap(backend: Any) -> Any:
    """The callable behind torch.compile's backend wrappers."""
    for _ in range(4):
        inner = getattr(backend, "compiler_fn", None) or \
            getattr(backend, "_torchdynamo_orig_backend", None)
        if inner is None or inner is backend:
            return backend
        backend = inner
    return backend


def _finalized_cfms() -> list[Any]:
    """dynamo's ``CheckFunctionManager`` s that ``weakref.finalize`` callbacks keep alive."""
    import functools
    import weakref

    from torch._dynamo.guards import CheckFunctionManager

    out: dict[int, Any] = {}
    for info in list(getattr(weakref.finalize, "_registry", {}).values()):
        func = getattr(info, "func", None)
        owner = getattr(getattr(func, "func", None), "__self__", None) \
            if isinstance(func, functools.partial) else None
        if isinstance(owner, CheckFunctionManager):
            out[id(owner)] = owner
    return list(out.values())


def _live_guard_managers() -> set[int]:
    """ids of the guard managers of every cache entry of the code objects dynamo has seen."""
    import torch._dynamo.convert_frame as convert_frame
    from torch._C._dynamo import eval_frame as c_eval_frame

    out: set[int] = set()
    for tracker in (convert_frame.input_codes, convert_frame.output_codes):
        for ref in list(tracker.seen):
            code = ref()
            if code is not None:
                out.update(id(e.guard_manager)
                           for e in c_eval_frame._debug_get_cache_entry_list(code))
    return out


def _retire(cfms: list[Any]) -> None:
    """Drop the guards of dynamo's ``CheckFunctionManager`` s and detach their finalizers."""
    import functools
    import weakref

    from torch._dynamo.guards import DeletedGuardManagerWrapper

    ids = {id(c) for c in cfms}
    for cfm in cfms:
        cfm.guard_manager = DeletedGuardManagerWrapper(_REASON)
        cfm.output_graph = None
    registry = getattr(weakref.finalize, "_registry", {})
    for fin, info in list(registry.items()):
        func = getattr(info, "func", None)
        if isinstance(func, functools.partial) and \
                id(getattr(func.func, "__self__", None)) in ids:
            fin.detach()


def _optional(name: str) -> Any:
    """A torch module that older versions may lack (None then)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _dup_checker() -> Any:
    module = _optional("torch._dynamo.symbolic_convert")
    return getattr(module, "graph_break_dup_warning_checker", None)


def isolation_supported() -> bool:
    """Whether ``torch.compile`` has isolated cache regions (``isolate_recompiles``, 2.12+)."""
    import inspect

    import torch

    try:
        return "isolate_recompiles" in inspect.signature(torch.compile).parameters
    except (TypeError, ValueError):
        return False


def _remove_installed_globals(out_codes: list[types.CodeType]) -> None:
    """Delete the globals dynamo installed for our compiled code (``__compiled_fn_*``,
    ``__resume_at_*``, ``__builtins_dict__*``) from the frames' globals (the user's namespace for
    a cell), and unregister their cleanup: dynamo removes them only when the transformed code is
    freed, which a reset does not guarantee. (``__import_*`` module aliases stay, as torch leaves
    them: they are shared by every compile of that namespace.)"""
    import torch._dynamo.utils as dutils

    cleanup = getattr(dutils, "CleanupManager", None)
    if cleanup is None:
        return
    manager = cleanup.instance
    for code in out_codes:
        hooks = manager.values.get(id(code))
        if hooks is None:
            continue
        for hook in hooks:
            try:
                hook()
            except KeyError:  # already gone
                pass
        dutils.ExactWeakKeyDictionary._remove_id(manager, id(code))


def _forget_cleanup_hooks(removed: set[tuple[int, str]]) -> None:
    """Unregister dynamo's cleanup hooks for globals we deleted (each would otherwise raise a
    KeyError, printed as "Exception ignored", when its code object is finally freed)."""
    import torch._dynamo.utils as dutils

    cleanup = getattr(dutils, "CleanupManager", None)
    if cleanup is None:
        return
    manager = cleanup.instance
    for idx, hooks in list(manager.values.items()):
        kept = [h for h in hooks if (id(getattr(h, "scope", None)), getattr(h, "name", None))
                not in removed]
        if len(kept) == len(hooks):
            continue
        if kept:
            manager.values[idx] = kept
        else:
            dutils.ExactWeakKeyDictionary._remove_id(manager, idx)


def compile_metrics() -> dict[str, list[float]]:
    """A copy of ``torch._dynamo.utils.compilation_time_metrics`` (seconds per compile step)."""
    import torch._dynamo.utils as dutils

    return {k: list(v) for k, v in dutils.compilation_time_metrics.items()}


def counters_copy() -> dict[str, Counter[str]]:
    """A copy of ``torch._dynamo.utils.counters``."""
    import torch._dynamo.utils as dutils

    return {k: Counter(v) for k, v in dutils.counters.items()}


__all__ = ["DynamoSandbox", "compile_metrics", "counters_copy"]
