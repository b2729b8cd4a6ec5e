"""``estimate_cell(source, namespace)``: the peak memory of the user's own code (a training-step
cell: forward, loss, backward, ``opt.step()``, micro-steps of gradient accumulation...) on fake
twins of everything it touches. Nothing real is allocated, run or changed.

The cell runs the way ``%%meta_shape --fake`` runs it (:func:`torchmagic.core.meta.meta_shape`:
a copy of the namespace where the models and tensors the code uses are fake twins, ``FakeTensorMode``
with a ``ShapeEnv`` so ``.item()`` continues as a symbol, global state restored, names not written
back), with additions made through its ``_setup`` hook:

- optimizers the code uses (by name, also through notebook functions it calls) are twins over the
  twin parameters, their state twinned too, and LR schedulers twins over the optimizer twins
  (``%%meta_shape``'s isolation: :func:`torchmagic.core.twin.twin_optimizer`); an optimizer
  without state yet gets it from one step on zero gradients first, so the cell is measured as any
  step after the first (``first_step=True`` measures it as the very first step);
- scalar tensors (an optimizer's step count) become constant fakes, so code reading them works;
- torch's ``MemTracker`` (:mod:`torchmagic.core.estimate_trace`) tracks the run: the twins present
  at the start count as parameters, buffers, gradients, optimizer state and inputs; what the cell
  makes as activations, temporaries, gradients and optimizer state.

A tensor whose size depends on data (``x[mask]``, ``nonzero``) has a symbolic size: its memory
cannot be known, and the estimate says so in one line naming the cell line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.estimate import MemoryEstimate, fill_from_trace, judge
from torchmagic.core.estimate_devices import DEFAULT_RESERVE, parse_bytes, resolve_capacity
from torchmagic.core.estimate_trace import PHASES, collect_trace, tracker_class
from torchmagic.core.estimate_whatif import sharding_alternative, sharding_note
from torchmagic.core.state import quiet_fake_tensor_log


class DataDependentSize(RuntimeError):
    """A tensor's size depends on values: its memory cannot be estimated on fake tensors."""


class _Setup:
    """What ``meta_shape(_setup=...)`` installs: the tensor converter (scalars as constants,
    gradients carried) and, around the code, the optimizer warm-up and the memory tracker. The
    twins themselves (models, tensors, optimizers with their state, LR schedulers) are made by
    ``%%meta_shape``'s own isolation (:mod:`torchmagic.core.meta_namespace`)."""

    def __init__(self, namespace: dict[str, Any], first_step: bool) -> None:
        self.namespace = namespace
        self.first_step = first_step
        self.cache: dict[int, Any] = {}
        self.keep: list[Any] = []
        self.labels: list[str] = []
        self.tracker: Any = None
        self.roots: dict[str, nn.Module] = {}
        self.mode: Any = None

    # the converter: each real tensor once, scalars as constants
    def convert(self, t: torch.Tensor) -> torch.Tensor:
        from torchmagic.core.twin import fake_tensor

        out = self.cache.get(id(t))
        if out is None:
            if t.numel() <= 1 and not t.requires_grad and not t.is_meta and \
                    t.device.type == "cpu" and not isinstance(t, nn.Parameter) and \
                    not t.is_quantized and t.layout == torch.strided:
                with torch.no_grad():
                    value = t.detach().clone()
                out = self.mode.fake_tensor_converter.from_real_tensor(self.mode, value,
                                                                       make_constant=True)
            else:
                out = fake_tensor(t, self.mode)
            self.cache[id(t)] = out
            self.keep.append(t)
            grad = t.grad if t.is_leaf else None
            if grad is not None and out.grad is None:
                # gradients present count too; not cached, so zero_grad() frees them
                out.grad = fake_tensor(grad, self.mode)
        return out

    def _optimizers(self, twins: Any, new_ns: dict[str, Any]) -> list[torch.optim.Optimizer]:
        """The optimizer twins, labelled; one without state gets it from a step on zero
        gradients (so the cell is measured as any step after the first), unless
        ``first_step``."""
        names = {id(v): k for k, v in new_ns.items() if isinstance(v, torch.optim.Optimizer)}
        found: dict[int, torch.optim.Optimizer] = {}
        for twin in list(twins.iso.memo.values()):
            if not isinstance(twin, torch.optim.Optimizer) or id(twin) in found:
                continue
            found[id(twin)] = twin
            name = names.get(id(twin))
            label = (f"{name}: " if name else "") + type(twin).__name__
            if not twin.state and not self.first_step:
                self._warm_up(twin)
                label += " (state made by one step on zero gradients, as from the second step on)"
            elif twin.state:
                label += " (its state twinned)"
            self.labels.append(label)
        return list(found.values())

    def _warm_up(self, opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        saved = [p.grad for p in params]
        try:
            with self.mode, torch.no_grad():
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
        except Exception as exc:  # noqa: BLE001 - the optimizer's own step
            from torchmagic.core.estimate_trace import _optimizer_failure

            raise TorchMagicError(_optimizer_failure(type(opt).__name__, exc)) from None
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def release(self) -> None:
        """Drop every reference to the user's objects (the runner that holds this object's
        methods sits in a reference cycle: without this, the user's tensors would wait for the
        garbage collector)."""
        self.namespace = {}
        self.cache.clear()
        self.keep.clear()

    def __call__(self, runner: Any) -> None:
        self.mode = runner.fake_mode
        runner.convert = self.convert
        runner.around = self.around

    @contextlib.contextmanager
    def around(self, twins: Any, new_ns: dict[str, Any]) -> Iterator[None]:
        from torch._subclasses.fake_tensor import FakeTensor

        optimizers = self._optimizers(twins, new_ns)
        self.roots = dict(twins.roots)
        tracker = tracker_class()({m: n for n, m in self.roots.items()})
        self.tracker = tracker
        tensors: dict[int, torch.Tensor] = {}
        for t in [*twins.iso.memo.values(), *self.cache.values()]:
            if isinstance(t, FakeTensor):
                tensors[id(t)] = t
        tracker.track_external(*tensors.values())
        for m in self.roots.values():
            tracker.track_external(m)
        for o in optimizers:
            tracker.track_external(o)
        _guard_sizes(tracker)
        with tracker:
            tracker.sample()
            tracker.label = "forward"
            yield
            tracker.sample()


def _guard_sizes(tracker: Any) -> None:
    """Make the tracker raise :class:`DataDependentSize` for a storage of symbolic size (instead
    of a guard error deep inside it)."""
    track = tracker._track

    def checked(reftype: Any, t: torch.Tensor) -> None:
        shape = tuple(t.shape)
        if any(isinstance(s, torch.SymInt) for s in shape):
            sizes = ", ".join(str(s) for s in shape)
            raise DataDependentSize(
                f"makes a tensor of size ({sizes}), which depends on the values (nonzero, a "
                "boolean mask, unique ...); fake tensors continue with symbolic sizes, but the "
                "memory of such a tensor cannot be known without the data: keep the sizes fixed "
                "(e.g. torch.where instead of x[mask]) or measure a real step with %%gpumem")
        track(reftype, t)

    tracker._track = checked


def estimate_cell(source: str, namespace: dict[str, Any], *, device: Any = None,
                  memory: Any = None, reserve: Any = None, what_if: bool | None = None,
                  top: int = 8, first_step: bool = False) -> MemoryEstimate:
    """The peak memory of running ``source`` (a cell, already transformed by IPython) in
    ``namespace``, on fake twins (see the module docstring); the user's objects are unchanged.

    ``device``/``memory``/``reserve``/``top`` as in :func:`~torchmagic.core.estimate.estimate_memory`;
    ``what_if``: add the sharding arithmetic (None: only when it does not fit); ``first_step``:
    do not make missing optimizer state before the cell (measure the very first step).

    Returns a :class:`~torchmagic.core.estimate.MemoryEstimate` (``what == "cell"``). Raises
    :class:`TorchMagicError` for bad input and :class:`ForwardError` (naming the cell line, module
    and op) when the code fails on fake tensors.
    """
    from torchmagic.core.meta import meta_shape

    started = time.perf_counter()
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise TorchMagicError(f"top must be a whole number >= 0; got {top!r}")
    res = DEFAULT_RESERVE if reserve is None else parse_bytes(reserve, "reserve")
    capacity = resolve_capacity(device, memory, reserve)
    setup = _Setup(namespace, first_step)
    try:
        with quiet_fake_tensor_log():
            report = meta_shape(source, namespace, depth=0, fake=True, _flag="%%estimate",
                                _setup=setup)
    except ForwardError as exc:
        original = exc.original
        if isinstance(original, DataDependentSize):
            line = exc.partial.error_line if exc.partial is not None else None
            where = f"line {line}: " if line is not None else ""
            raise ForwardError(f"{where}{original}", original=original) from None
        raise
    finally:
        setup.release()
    tracker = setup.tracker
    if tracker is None:  # pragma: no cover - meta_shape always enters ``around``
        raise TorchMagicError("the cell did not run")
    trace = collect_trace(tracker, "", [])
    roots = setup.roots
    params = {id(p): p for m in roots.values() for p in m.parameters()}
    models = [f"{n} ({type(m).__name__}, {sum(p.numel() for p in m.parameters()):,} params)"
              for n, m in roots.items()]
    settings = {"traced on": "fake tensors with symbolic sizes (FakeTensorMode + ShapeEnv), "
                             f"{len(source.splitlines())} cell lines"}
    if models:
        settings["models"] = "; ".join(models)
    if setup.labels:
        settings["optimizers"] = "; ".join(setup.labels)
    result = MemoryEstimate(what="cell", model="the cell", params=sum(p.numel()
                                                                         for p in params.values()),
                            settings=settings)
    blocks = None
    if roots:
        from torchmagic.core.estimate_setup import repeated_blocks

        root_name, biggest = max(roots.items(),
                                 key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        found = repeated_blocks(biggest)
        if found is not None:
            blocks = f"{root_name}.{found[0]}" if found[0] else root_name
    fill_from_trace(result, trace, top, blocks)
    result.notes.extend(report.converted)
    result.notes.extend(report.passed)
    result.notes.extend(report.notes)
    judge(result, capacity, res)
    train = any(PHASES[s[0]] == "backward" for s in trace.samples)
    want = what_if if what_if is not None else (result.verdict is not None
                                                and not result.verdict.fits)
    if want and roots:
        biggest = max(roots.values(), key=lambda m: sum(p.numel() for p in m.parameters()))
        usable = capacity.usable if capacity is not None else None
        alt = sharding_alternative(trace, biggest, None, train, usable)
        if alt is not None:
            result.alternatives.append(alt)
        else:
            why = sharding_note(trace, biggest, None, train, usable, result.fits)
            if why is not None:
                result.notes.append(why)
    result.seconds = time.perf_counter() - started
    result.trace_seconds = result.seconds   # one trace: the cell's
    return result


__all__ = ["DataDependentSize", "estimate_cell"]
