"""The ``%%meta_shape`` runner: twins in a copy of the namespace, a torch-function mode that keeps
every op on meta (or fake) tensors, module-call tracing, and the failure explained in one line."""

from __future__ import annotations

import ast
import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.execution import cell_line_of
from torchmagic.core.meta_explain import classify, fold_calls, line_text, torch_message
from torchmagic.core.meta_gaps import MetaKernelGaps
from torchmagic.core.meta_namespace import NamespaceTwins, assigned_names, build_namespace
from torchmagic.core.meta_report import MetaShapeReport, describe_value
from torchmagic.core.state import preserved_global_state, quiet_fake_tensor_log
from torchmagic.core.tracing import (
    ModuleCall,
    ModuleTracer,
    describe_failure,
    format_shapes,
    tensor_shapes,
    trace_modules,
)
from torchmagic.core.twin import fake_tensor, meta_tensor

# ---------------------------------------------------------------------------------------------
# the torch-function mode: devices to meta, real tensors read as meta/fake
# ---------------------------------------------------------------------------------------------
_FAKE_KEY = getattr(torch._C, "_TorchDispatchModeKey", None)


def _usable(device: Any) -> bool:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return True
    if dev.type in ("cpu", "meta"):
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


class _Redirect(TorchFunctionMode):
    """Inside the run: factory calls and device moves land on meta (fake: on a usable device),
    and real tensors given to an op are replaced by meta/fake copies (so an op never computes on,
    or writes into, a real tensor). Records the op that raised."""

    def __init__(self, fake_mode: Any, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        from torch.utils._device import _device_constructors

        self.fake_mode = fake_mode
        self.convert = convert
        self.constructors = _device_constructors()
        self.memo: dict[int, torch.Tensor] = {}
        self.keep: list[torch.Tensor] = []
        self.real_reads = 0
        self.device_moves: set[str] = set()
        self.keep_real: set[int] = set()   # real tensors passed on as they are (batch_sizes)
        self.failed: tuple[BaseException, str, list[tuple[Any, ...]]] | None = None
        self._moves = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
        for name in ("mps", "xpu", "pin_memory"):
            fn = getattr(torch.Tensor, name, None)
            if fn is not None:
                self._moves.add(fn)
        if fake_mode is not None:
            from torch._subclasses.fake_tensor import FakeTensor

            self._is_real = lambda t: not isinstance(t, FakeTensor)
        else:
            self._is_real = lambda t: not t.is_meta

    # -- helpers -----------------------------------------------------------------------------
    def _target(self, device: Any) -> Any:
        if self.fake_mode is None:
            if device is not None and str(device) != "meta":
                self.device_moves.add(str(device))
            return torch.device("meta")
        if device is None or _usable(device):
            return device
        self.device_moves.add(str(device))
        return torch.device("cpu")

    def _fix(self, a: Any, writes: bool = False) -> Any:
        if isinstance(a, torch.Tensor):
            if self._is_real(a) and (writes or id(a) not in self.keep_real):
                out = self.memo.get(id(a))
                if out is None:
                    out = self.convert(a)
                    self.memo[id(a)] = out
                    self.keep.append(a)
                self.real_reads += 1
                return out
            return a
        if type(a) in (list, tuple) and a and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._fix(x, writes) for x in a)
        return a

    @staticmethod
    def _writes(func: Any, kwargs: dict[str, Any]) -> bool:
        """In-place ops, ``x[i] = v`` and ``out=``: kept real tensors must not reach them."""
        name = getattr(func, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or \
            name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or \
            "out" in kwargs

    def _on_kept(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True when every tensor the op gets is kept real metadata and the op cannot write."""
        if self._writes(func, kwargs):
            return False
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return bool(tensors) and all(id(t) in self.keep_real for t in tensors)

    def _move(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self_t = self._fix(args[0])
        if func is torch.Tensor.to:
            kw = dict(kwargs)
            copy_ = kw.pop("copy", False)
            device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args[1:], **kw)
            target = self._target(device) if device is not None else None
            out_kw: dict[str, Any] = {"copy": copy_, "non_blocking": non_blocking}
            if target is not None:
                out_kw["device"] = target
            if dtype is not None:
                out_kw["dtype"] = dtype
            if fmt is not None:
                out_kw["memory_format"] = fmt
            return torch.Tensor.to(self_t, **out_kw)
        name = getattr(func, "__name__", "")
        if self.fake_mode is None or (name in ("cuda", "mps", "xpu") and not _usable(name)):
            if name not in ("cpu", "pin_memory"):
                self.device_moves.add(name)
            return self_t
        return func(self_t, *args[1:], **kwargs)

    # -- the hook --------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types_: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)           # attribute reads: nothing to redirect
        if self.fake_mode is not None and torch._C._get_dispatch_mode(_FAKE_KEY.FAKE) is None:
            return func(*args, **kwargs)           # fake tensor internals at work
        try:
            if func in self._moves and args:
                return self._move(func, args, kwargs)
            if self.keep_real and self._on_kept(func, args, kwargs):
                # reads of kept metadata (packed.batch_sizes[0], int(...)): run for real, and
                # what they give is metadata too
                out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and self._is_real(t):
                        self.keep_real.add(id(t))
                        self.keep.append(t)
                return out
            if func in self.constructors or kwargs.get("device") is not None:
                kwargs = dict(kwargs)
                kwargs["device"] = self._target(kwargs.get("device"))
            writes = bool(self.keep_real) and self._writes(func, kwargs)
            args = tuple(self._fix(a, writes) for a in args)
            if kwargs:
                kwargs = {k: self._fix(v, writes) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        except Exception as exc:
            if self.failed is None or self.failed[0] is not exc:
                name = getattr(func, "__name__", None) or str(func)
                self.failed = (exc, name, tensor_shapes((args, kwargs)))
            raise


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, depth: int, fake: bool, fold: bool, flag: str) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise TorchMagicError(f"depth must be a whole number >= 0; got {depth!r}")
        self.depth, self.fake, self.fold, self.flag = depth, fake, fold, flag
        self.report = MetaShapeReport(mode="fake" if fake else "meta", depth=depth)
        self.fake_mode: Any = None
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            self.fake_mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
            fm = self.fake_mode
            self.convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: fake_tensor(t, fm)
        else:
            self.convert = meta_tensor
        self.tracer: ModuleTracer | None = None
        self.call_lines: dict[int, int | None] = {}
        self.filename = ""
        self.named: list[nn.Module] = []
        # %%estimate (``meta_shape(_setup=...)``): a context entered around the code, given the
        # twins of the run and the namespace the code sees (its memory tracker)
        self.around: Callable[[NamespaceTwins, dict[str, Any]], Any] | None = None

    # names of modules made by the code itself
    def register(self, name: str, obj: Any) -> None:
        assert self.tracer is not None
        mods: list[tuple[str, nn.Module]] = []
        if isinstance(obj, nn.Module):
            mods.append((name, obj))
        elif isinstance(obj, (list, tuple)) and len(obj) <= 1000:
            mods.extend((f"{name}[{i}]", v) for i, v in enumerate(obj) if isinstance(v, nn.Module))
        elif isinstance(obj, dict) and len(obj) <= 1000:
            mods.extend((f"{name}[{k!r}]", v) for k, v in obj.items() if isinstance(v, nn.Module))
        for prefix, mod in mods:
            if id(mod) in self.tracer.names and self.tracer.names[id(mod)] == prefix:
                continue
            self.named.append(mod)
            for sub_name, sub in mod.named_modules(remove_duplicate=False):
                full = ".".join(p for p in (prefix, sub_name) if p)
                self.tracer.names.setdefault(id(sub), full)

    def _on_enter(self, call: ModuleCall) -> None:
        if call.depth or not self.filename:
            return
        frame = sys._getframe(1)
        for _ in range(64):
            if frame is None:
                break
            if frame.f_code.co_filename == self.filename:
                self.call_lines[call.index] = frame.f_lineno
                break
            frame = frame.f_back

    # failures
    def failure(self, exc: BaseException, redirect: _Redirect, line: int | None,
                where: str) -> ForwardError:
        kind, why = classify(exc, self.fake, self.flag)
        assert self.tracer is not None
        call = self.tracer.failing_call
        module = self.tracer.module_of(call) if call is not None else None
        op_part = ""
        if redirect.failed is not None and redirect.failed[0] is exc:
            _, op, shapes = redirect.failed
            op_part = f"{op}: " if call is not None or not shapes else \
                f"{op} on {format_shapes(shapes)}: "
        if why is not None:
            detail = describe_failure(call, RuntimeError(why), module) if call is not None else why
        else:
            detail = describe_failure(call, RuntimeError(op_part + torch_message(exc)), module)
            if kind == "error":
                detail = f"{type(exc).__name__}: {detail}"
        text = line_text(self.filename, line) if self.filename else ""
        prefix = f"line {line}" if line is not None else where
        if text and (kind != "shape" or call is None):
            prefix += f" ({text})"
        message = f"{prefix}: {detail}"
        rep = self.report
        rep.error, rep.error_line, rep.error_kind = message, line, kind
        err = ForwardError(message, original=exc, partial=rep,
                           module_path=call.path if call else None,
                           module_class=call.cls if call else None,
                           input_shapes=format_shapes(call.input_shapes) if call else None)
        return err

    def finish(self, redirect: _Redirect | None, started: float) -> None:
        rep = self.report
        if self.tracer is not None:
            rep.total_calls = len(self.tracer.calls)
            rep.calls = fold_calls(self.tracer.calls, self.fold, self.call_lines)
        if redirect is not None:
            if redirect.device_moves:
                where = "meta" if not self.fake else "cpu"
                rep.notes.append("device arguments and moves ("
                                 + ", ".join(sorted(redirect.device_moves))
                                 + f") ran on {where}: shapes do not depend on the device")
            if redirect.real_reads:
                rep.notes.append(f"real tensors not bound to a used name (e.g. torch.from_numpy, "
                                 f"an attribute of an object) were read as {rep.mode} tensors in "
                                 f"{redirect.real_reads} op(s); they were not changed")
        rep.seconds = time.perf_counter() - started

    # the run itself
    def run(self, namespace: dict[str, Any], statements: list[tuple[ast.stmt, Any, bool]],
            used: set[str], where: str, call: Callable[[dict[str, Any]], Any] | None = None,
            new_ns: dict[str, Any] | None = None) -> MetaShapeReport:
        started = time.perf_counter()
        rep = self.report
        redirect: _Redirect | None = None
        with preserved_global_state(), warnings.catch_warnings(), quiet_fake_tensor_log():
            # torch.from_numpy on the read-only view of a user's array: harmless here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            new_ns = dict(namespace) if new_ns is None else new_ns
            twins = NamespaceTwins(self.convert, rep.mode, namespace, new_ns)
            build_namespace(namespace, used, twins, new_ns)
            rep.converted, rep.passed = twins.converted, twins.passed
            self.tracer = ModuleTracer(twins.roots)
            self.tracer.on_enter.append(self._on_enter)
            redirect = _Redirect(self.fake_mode, self.convert)
            redirect.keep_real = twins.keep_real
            line: int | None = None
            try:
                around = self.around(twins, new_ns) if self.around else contextlib.nullcontext()
                kw_hooks = contextlib.ExitStack()  # keyword inputs of the twins' calls
                for root in twins.roots.values():
                    kw_hooks.enter_context(self.tracer.watch_kwargs(root))
                with kw_hooks, self._modes(redirect), trace_modules(self.tracer), around:
                    if call is not None:
                        call(new_ns)
                    for stmt, code, is_expr in statements:
                        line = stmt.lineno
                        self.tracer.stack.clear()
                        redirect.failed = None
                        if is_expr:
                            value = eval(code, new_ns)  # noqa: S307 - the user's own code
                            if value is not None:
                                src = ast.get_source_segment(rep.source, stmt) or "<last expression>"
                                src = " ".join(src.split())
                                rep.values.append(describe_value(
                                    src if len(src) <= 40 else src[:39] + "…", value,
                                    stmt.lineno, last_expr=True))
                                self.register(src, value)
                            continue
                        exec(code, new_ns)  # noqa: S102
                        for name in assigned_names(stmt):
                            if name in new_ns:
                                rep.values.append(describe_value(name, new_ns[name], stmt.lineno))
                                self.register(name, new_ns[name])
            except KeyboardInterrupt:
                self.finish(redirect, started)
                rep.error, rep.error_line, rep.error_kind = "interrupted", line, "interrupt"
                raise
            except Exception as exc:
                tb = exc.__traceback__
                exact = cell_line_of(tb, self.filename) if self.filename else None
                err = self.failure(exc, redirect, exact or line, where)
                self.finish(redirect, started)
                raise err from exc
            self.finish(redirect, started)
        return rep

    def _modes(self, redirect: _Redirect) -> Any:
        stack = contextlib.ExitStack()
        if self.fake_mode is not None:
            stack.enter_context(self.fake_mode)
        # No ``with torch.device("meta")`` here: the redirect mode already sends every factory
        # call to meta, and torch's DeviceContext nests badly with a user's set_default_device
        # (its exit asserts "Found nested DeviceContext" when the cell calls set_default_device).
        stack.enter_context(redirect)
        stack.enter_context(MetaKernelGaps())  # meta kernels stricter than the real ones
        return _SafeExit(stack)


class _SafeExit:
    """Exit the modes; if the code rearranged the mode stack (``torch.set_default_device``), a
    mode's own exit may object: ``preserved_global_state`` puts the stack back in any case."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        try:
            self.stack.__exit__(*exc)
        except Exception:  # noqa: BLE001 - restored by preserved_global_state right after
            if exc[0] is None:
                return False
        return False
