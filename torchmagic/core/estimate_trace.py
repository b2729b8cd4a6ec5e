"""Tracing a training step or an inference on fake tensors with torch's ``MemTracker``.

Nothing here allocates memory for the model: the user's model is copied into a *fake twin* (every
parameter and buffer a ``FakeTensor`` of one ``FakeTensorMode``: shapes, dtypes and devices, no
data), the inputs become fake tensors of the same mode, the optimizer is created over the twin's
parameters inside the mode, and the step runs under
``torch.distributed._tools.mem_tracker.MemTracker``, which attributes every live byte to parameters,
buffers, gradients, optimizer state, activations, temporaries or "other" (here: the inputs). Its
figures on fake tensors are the ones it measures on real tensors (the tests compare the two), with
one change of label: ``MemTracker`` files everything ``optimizer.step()`` allocates as optimizer
state; here what the step allocates is a temporary (Adam's ``_foreach_sqrt`` of ``exp_avg_sq``, the
size of the parameters) and only the tensors ``optimizer.state`` holds when the step ends
(``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``) are optimizer state, from the op that
made them on. The totals are ``MemTracker``'s.

:class:`StepTracker` is ``MemTracker`` plus what the report needs: the live bytes by kind after
every op (the timeline), where the peak happened (phase, innermost module, op), and the activation
bytes held by each module at the moment activations peak (where checkpointing pays). It drops
what the report does not use and costs most: ``MemTracker``'s per-module peak snapshots (a scan of
every module seen so far after every op, quadratic in model depth: a 70B Llama step took 100 s)
and its DTensor handling; the bytes by kind are ``MemTracker``'s own but for the step's
temporaries (the tests compare them with a plain ``MemTracker`` and ``optimizer.state``).

The step (``train=True``): forward, loss, backward, optimizer step, ``zero_grad(set_to_none=True)``;
the output and the loss stay referenced until the step ends, as in a training loop's body. The
optimizer is fresh, so its state is made inside ``step()`` (torch's optimizers make all of it in
``_init_group``, before any update); :func:`collect_trace` counts that state from the start, which
gives the step of any iteration after the first (checked against a real warm-up step in the tests).
Inference: forward under ``torch.no_grad()``, output kept to the end.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.estimate_setup import OptimizerSpec, apply_checkpointing, compute_loss
from torchmagic.core.twin import fake_inputs, fake_like, fake_model

# MemTracker's reference types -> the kinds torchmagic reports (in this order)
KINDS = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "temporaries",
         "inputs")
KIND_LABELS = {"parameters": "parameters", "buffers": "buffers", "gradients": "gradients",
               "optimizer_state": "optimizer state", "activations": "activations",
               "temporaries": "temporaries", "inputs": "inputs and other tensors"}
_REF_NAMES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")
PHASES = ("setup", "forward", "loss", "backward", "optimizer step")
_PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
_STEP = _PHASE_INDEX["optimizer step"]
HEARTBEAT_OPS = 512      # a trace's heartbeat (progress) every this many ops


# ---------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------
class _NoHandle:
    """Stands for a hook handle never registered (frozen parameters)."""

    def remove(self) -> None:
        return None


_NO_HANDLE = _NoHandle()


@functools.lru_cache(maxsize=1)
def tracker_class() -> type:
    """:class:`StepTracker` (built on first use: ``torch.distributed`` is imported only then)."""
    try:
        from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
    except Exception as exc:  # noqa: BLE001 - a torch build without torch.distributed
        raise TorchMagicError(
            f"memory estimates use torch's MemTracker (torch.distributed._tools.mem_tracker, "
            f"torch >= 2.5); this torch {torch.__version__} cannot import it "
            f"({type(exc).__name__}: {exc})") from None

    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils._pytree import tree_flatten, tree_map_only

    class LeakFreeModTracker(ModTracker):
        """``ModTracker`` whose backward hooks do not outlive the step. Its pre-forward hook
        registers ``register_multi_grad_hook(inputs, ...)``, whose closure holds the inputs'
        ``grad_fn`` nodes while the nodes hold the closure: a cycle through C++ that Python's
        garbage collector cannot see, which kept every module input's graph (and parameters)
        alive for good. The ``grad_fns`` lists of those closures are emptied when the tracker
        exits (:meth:`release`)."""

        def __init__(self) -> None:
            super().__init__()
            self._grad_fn_lists: list[list[Any]] = []

        def _fw_pre_hook(self, mod: nn.Module, input: Any) -> None:
            super()._fw_pre_hook(mod, input)
            if self.is_bw:
                return
            for t in tree_flatten(input)[0]:
                hooks = getattr(t, "_backward_hooks", None) if isinstance(t, torch.Tensor) \
                    else None
                if not hooks:
                    continue
                fn = next(reversed(hooks.values()))
                code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
                for var, cell in zip(code.co_freevars if code else (), cells or ()):
                    if var == "grad_fns" and isinstance(cell.cell_contents, list):
                        self._grad_fn_lists.append(cell.cell_contents)

        def release(self) -> None:
            for grad_fns in self._grad_fn_lists:
                grad_fns.clear()
            self._grad_fn_lists.clear()

    refs = [_MemRefType(v) for v in _REF_NAMES]
    act, opt_ref, temp_ref = _MemRefType.ACT, _MemRefType.OPT, _MemRefType.TEMP
    prim_device = torch.ops.prim.device.default
    meta_device = torch.device("meta")
    from torch._subclasses.fake_tensor import FakeTensor as fake_tensor_cls

    class StepTracker(MemTracker):
        """``MemTracker`` that also records the timeline, the peak's place and activations by
        module. ``names``: root modules -> the names their submodules are reported under."""

        def __init__(self, names: dict[nn.Module, str] | None = None) -> None:
            super().__init__()
            self.label = "setup"              # the driver's phase; backward/optimizer detected
            self.samples: list[tuple[int, ...]] = []   # (phase, total, *KINDS bytes) per op
            # phase index -> (total, sample index, module, op) of that phase's largest sample
            self.phase_max: dict[int, tuple[int, int, str | None, str | None]] = {}
            self.act_peak = 0
            self.act_peak_phase = ""
            self.act_peak_modules: dict[str | None, int] = {}
            self._act_live: dict[str | None, int] = {}
            self._act_total = 0
            self._func: Any = None
            # optimizer state made inside a step: (first sample holding it, first sample after
            # the step relabelled it optimizer state, bytes); see _update_snap
            self.state_made: list[tuple[int, int, int]] = []
            # samples of the optimizer step: index -> (module, op) (the step's peak can move
            # once the state made inside it is counted from the start, see collect_trace)
            self.step_where: dict[int, tuple[str | None, str | None]] = {}
            self.backward_end: int | None = None   # the sample taken when backward ended
            self.heartbeat: Callable[[int, str], None] | None = None
            self._mod_tracker = LeakFreeModTracker()
            for mod, name in (names or {}).items():
                self._mod_tracker._known_modules[mod] = name

        # -- where we are ---------------------------------------------------------------------
        def phase(self) -> str:
            if self._in_opt:
                return "optimizer step"
            if self._mod_tracker.is_bw:
                return "backward"
            return self.label

        def module_now(self) -> str | None:
            best = None
            for name in self._mod_tracker.parents:
                if name != "Global" and (best is None or name.count(".") > best.count(".")):
                    best = name
            return best

        # -- MemTracker overrides -------------------------------------------------------------
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            # MemTracker's own, without what torchmagic never meets (DTensor propagation, fake
            # collectives under a second fake mode), which costs a third of the tracing time
            if func is prim_device:   # a device query (autograd asks it per node): no memory
                t = args[0] if len(args) == 1 else None
                if type(t) is fake_tensor_cls:
                    # FakeTensor's own answer (fake_tensor._device_handler), without a trip
                    # through the fake mode's dispatch: a tenth of a trace's time
                    return meta_device if t.fake_mode.in_kernel_invocation else t.fake_device
                return func(*args, **(kwargs or {}))
            if any(getattr(t, "__name__", "") == "DTensor" for t in types):
                return NotImplemented
            self._func = func
            res = func(*args, **(kwargs or {}))
            if self._in_opt:
                # MemTracker labels everything a step allocates optimizer state; it is a
                # temporary (exp_avg_sq's sqrt) until the step ends, when MemTracker's post-step
                # hook relabels the tensors held in optimizer.state (see _update_snap)
                reftype = temp_ref
            elif self._mod_tracker.is_bw and not self._in_ac:
                reftype = temp_ref
            else:
                reftype = act
            track = self._track
            if isinstance(res, torch.Tensor):
                track(reftype, res)
            elif isinstance(res, (tuple, list)):
                for t in res:
                    if isinstance(t, torch.Tensor):
                        track(reftype, t)
                    elif isinstance(t, (tuple, list, dict)):
                        tree_map_only(torch.Tensor, functools.partial(track, reftype), t)
            self._update_peak_stats(None)
            return res

        def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                         old_reftype: Any = None) -> None:
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
            kind = u_type.name
            if self._in_opt:
                if kind == "ADD":
                    # made inside the step: a temporary; or state met first by the post-step hook
                    winfo._tm_born = len(self.samples)
                    if winfo.reftype == opt_ref:
                        self.state_made.append((len(self.samples), len(self.samples),
                                                winfo.mem_consumed))
                elif kind == "REF" and old_reftype == temp_ref and winfo.reftype == opt_ref and \
                        hasattr(winfo, "_tm_born"):
                    # the post-step hook found it in optimizer.state: state from its birth on
                    self.state_made.append((winfo._tm_born, len(self.samples),
                                            winfo.mem_consumed))
            if kind == "ADD":
                if winfo.reftype == act:
                    winfo._tm_module = self.module_now()
                    self._act(winfo._tm_module, winfo.mem_consumed)
            elif kind == "DEL":
                if winfo.reftype == act:
                    self._act(getattr(winfo, "_tm_module", None), -winfo.mem_consumed)
            elif kind == "REF":
                if old_reftype == act:
                    self._act(getattr(winfo, "_tm_module", None), -winfo.mem_consumed)
                if winfo.reftype == act:
                    if not hasattr(winfo, "_tm_module"):
                        winfo._tm_module = self.module_now()
                    self._act(winfo._tm_module, winfo.mem_consumed)
            elif kind == "SIZE" and winfo.reftype == act and old_mem_consumed is not None:
                self._act(getattr(winfo, "_tm_module", None),
                          winfo.mem_consumed - old_mem_consumed)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # MemTracker's own also keeps per-module peak snapshots (walking every module seen
            # so far after every op: quadratic in depth); torchmagic reports the step's peak
            curr = self._curr_mem_snap
            for dev, snap in curr.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)
            self.sample()

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            # a root module called again (micro-steps of gradient accumulation in a cell):
            # MemTracker refuses ("multiple iterative calls"); its per-module stats start over
            if not self._mod_tracker.is_bw and module in self.memory_tracking:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module: nn.Module,
                                             install_grad_hooks: bool = True) -> tuple[int, int]:
            # MemTracker hooks every parameter for its gradient, and register_hook raises on a
            # frozen one (requires_grad=False): mark those as hooked already
            if install_grad_hooks:
                for p in module.parameters():
                    if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                        self._param_to_grad_hook_handles[p] = (_NO_HANDLE, _NO_HANDLE)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def __exit__(self, *args: Any) -> None:
            super().__exit__(*args)
            if self._depth == 0:
                self._mod_tracker.release()

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            return None   # per-module backward snapshots only: not reported

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            return None

        # -- our records ----------------------------------------------------------------------
        def _act(self, module: str | None, delta: int) -> None:
            self._act_live[module] = self._act_live.get(module, 0) + delta
            self._act_total += delta

        def sample(self) -> None:
            """Record the live bytes by kind now (called after every op, and by the driver)."""
            kinds = [0] * len(refs)
            total = 0
            for snap in self._curr_mem_snap.values():
                total += snap[_TOTAL_KEY]
                for i, ref in enumerate(refs):
                    kinds[i] += snap.get(ref, 0)
            phase = self.phase()
            index = _PHASE_INDEX.get(phase, 0)
            self.samples.append((index, total, *kinds))
            if self.heartbeat is not None and len(self.samples) % HEARTBEAT_OPS == 0:
                self.heartbeat(len(self.samples), phase)
            best = self.phase_max.get(index)
            if index == _STEP:
                where = (self.module_now(), self.op_now())
                self.step_where[len(self.samples) - 1] = where
                if best is None or total > best[0]:
                    self.phase_max[index] = (total, len(self.samples) - 1, *where)
            elif best is None or total > best[0]:
                self.phase_max[index] = (total, len(self.samples) - 1, self.module_now(),
                                         self.op_now())
            if self._act_total > self.act_peak:
                self.act_peak = self._act_total
                self.act_peak_phase = phase
                self.act_peak_modules = {k: v for k, v in self._act_live.items() if v > 0}

        def op_now(self) -> str | None:
            func = self._func
            return str(func.overloadpacket) if func is not None and \
                hasattr(func, "overloadpacket") else None

        def device_peaks(self) -> dict[str, int]:
            return {str(dev): int(v) for dev, v in self._peak_mem.items()}

    return StepTracker


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------
@dataclass
class StepSpec:
    """What to trace."""

    train: bool = False
    optimizer: OptimizerSpec | None = None
    foreach: bool | None = None          # None: the optimizer's own default on this device
    dtype: torch.dtype | None = None      # weights (and floating inputs) cast to it
    amp: torch.dtype | None = None        # autocast dtype
    checkpointing: bool = False
    loss: Any = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Trace:
    """What one traced step found (bytes)."""

    peak_bytes: int
    by_kind: dict[str, int]
    peak_phase: str
    peak_module: str | None
    peak_op: str | None
    samples: list[tuple[int, ...]]
    peak_sample: int
    phase_peaks: dict[str, int]
    act_peak: int
    act_peak_phase: str
    act_by_module: dict[str, int]
    by_device: dict[str, int]
    loss: str = ""
    notes: list[str] = field(default_factory=list)
    step_start: int | None = None      # the first sample of the optimizer step (None: no step)
    backward_end: int | None = None    # the sample taken when backward ended (None: no backward)
    seconds: float = 0.0               # wall time of the trace


def _optimizer_failure(label: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "DataDependentOutput" in type(exc).__name__ or "_local_scalar_dense" in text:
        return (f"{label} reads values in its step (.item() on a parameter or a norm), and the "
                "estimate runs on fake tensors, which have shapes but no values; estimate with "
                "another optimizer (e.g. adamw, sgd) or measure a real step with %gpumem")
    return f"{label}.step() failed on the fake parameters: {type(exc).__name__}: {text[:200]}"


def _forward_failure(exc: BaseException, tracer: Any, name: str) -> ForwardError:
    from torchmagic.core.tracing import describe_failure

    call = tracer.failing_call
    module = tracer.module_of(call) if call is not None else None
    text = str(exc)
    kind = type(exc).__name__
    if "DataDependentOutput" in kind or "DynamicOutputShape" in kind or \
            "GuardOnDataDependent" in kind or "_local_scalar_dense" in text:
        why = RuntimeError(
            "reads tensor values (.item(), .tolist(), an if on a tensor, or an op whose output "
            "size depends on values such as nonzero or x[mask]); the estimate runs on fake "
            "tensors, which have shapes but no values. Use %%estimate on a cell that avoids the "
            "read, or %%meta_shape --fake to see where it happens")
        return ForwardError(describe_failure(call, why, module) if call else str(why),
                            original=exc, module_path=call.path if call else None,
                            module_class=call.cls if call else None)
    if call is None:
        msg = f"{name}: {kind}: {' '.join(text.split())[:300]}"
    else:
        msg = describe_failure(call, exc, module)
    from torchmagic.core.tracing import format_shapes

    return ForwardError(msg, original=exc, module_path=call.path if call else None,
                        module_class=call.cls if call else None,
                        input_shapes=format_shapes(call.input_shapes) if call else None)


def trace_step(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], spec: StepSpec,
               name: str = "model", optimizer_step: bool = True,
               heartbeat: Callable[[int, str], None] | None = None) -> Trace:
    """Trace one step of ``model`` on fake tensors (see the module docstring).

    ``args``/``kwargs``: the inputs (real or meta tensors; only their shapes and dtypes are read).
    ``optimizer_step=False`` (training): forward, loss and backward only, no optimizer (see
    :func:`torchmagic.core.estimate_whatif.peak_with_step`). ``heartbeat(ops, phase)`` is called
    every :data:`HEARTBEAT_OPS` ops (progress of a long trace).
    Raises :class:`ForwardError` naming the failing module when the model fails, and
    :class:`TorchMagicError` for unusable settings. Global torch state is restored on every path.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchmagic.core.meta_gaps import MetaKernelGaps
    from torchmagic.core.state import preserved_global_state, quiet_fake_tensor_log
    from torchmagic.core.tracing import ModuleTracer, trace_modules

    started = time.perf_counter()
    cls = tracker_class()
    notes: list[str] = []
    with preserved_global_state(), quiet_fake_tensor_log():
        mode = FakeTensorMode()
        fake = fake_model(model, mode, spec.device, spec.dtype)
        fake.train(spec.train)
        if spec.checkpointing:
            notes.append(apply_checkpointing(fake))
        f_args, f_kwargs = fake_inputs((args, kwargs), mode, spec.device, spec.dtype)
        trainable = [p for p in fake.parameters() if p.requires_grad]
        opt = None
        if spec.train:
            if not trainable:
                raise TorchMagicError("the model has no trainable parameters (all requires_grad="
                                      "False): a training step updates nothing; estimate the "
                                      "inference instead")
            assert spec.optimizer is not None
            if optimizer_step:
                with mode:
                    opt = spec.optimizer.make(trainable, spec.foreach)
        tracker = cls({fake: name})
        tracker.heartbeat = heartbeat
        from torch.utils._pytree import tree_flatten

        tracker.track_external(*[t for t in tree_flatten((f_args, f_kwargs))[0]
                                 if isinstance(t, torch.Tensor)])
        tracker.track_external(fake)
        if opt is not None:
            tracker.track_external(opt)
        mtracer = ModuleTracer({name: fake})
        amp = torch.autocast(spec.device.type, dtype=spec.amp) if spec.amp is not None \
            else contextlib.nullcontext()
        loss_desc = ""
        try:
            with mode, MetaKernelGaps(), tracker, trace_modules(mtracer):
                tracker.sample()
                tracker.label = "forward"
                with torch.set_grad_enabled(spec.train):
                    with amp:
                        out = fake(*f_args, **f_kwargs)
                        if spec.train:
                            tracker.label = "loss"
                            loss, loss_desc = compute_loss(out, f_args, f_kwargs, spec.loss)
                    tracker.sample()
                    if spec.train:
                        tracker.label = "backward"
                        loss.backward()
                        tracker.sample()
                        tracker.backward_end = len(tracker.samples) - 1
                        if opt is not None:
                            tracker.label = "optimizer step"   # also ops around the hooks
                            try:
                                opt.step()
                            except Exception as exc:  # noqa: BLE001 - the optimizer's own step
                                raise TorchMagicError(_optimizer_failure(spec.optimizer.label,
                                                                         exc)) from None
                            tracker.sample()
                            opt.zero_grad(set_to_none=True)
                        del loss
                    del out
                tracker.sample()
        except (TorchMagicError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise _forward_failure(exc, mtracer, name) from exc
    trace = collect_trace(tracker, loss_desc, notes, steady_state=spec.train)
    trace.seconds = time.perf_counter() - started
    return trace


def trace_optimizer_step(model: nn.Module, spec: StepSpec) -> Trace:
    """Trace ``spec.optimizer``'s step alone, on fake twins of ``model``'s trainable parameters
    (in ``spec.dtype`` when given) with gradients, as in any step after the first (its state
    counted from the start): what the step holds and allocates, without a forward or backward.
    The samples are all in the optimizer step; the first is the level before it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchmagic.core.state import preserved_global_state, quiet_fake_tensor_log

    started = time.perf_counter()
    assert spec.optimizer is not None
    with preserved_global_state(), quiet_fake_tensor_log():
        mode = FakeTensorMode()
        unique = {id(p): p for p in model.parameters() if p.requires_grad}
        params = [fake_like(p, mode, spec.device, spec.dtype) for p in unique.values()]
        with mode:
            for p in params:
                p.grad = torch.zeros_like(p)
            opt = spec.optimizer.make(params, spec.foreach)
        tracker = tracker_class()({})
        tracker.track_external(*params, *[p.grad for p in params])
        tracker.track_external(opt)
        with mode, tracker:
            tracker.label = "optimizer step"
            tracker.sample()
            try:
                opt.step()
            except Exception as exc:  # noqa: BLE001 - the optimizer's own step
                raise TorchMagicError(_optimizer_failure(spec.optimizer.label, exc)) from None
            tracker.sample()
    trace = collect_trace(tracker, "", [], steady_state=True)
    trace.seconds = time.perf_counter() - started
    return trace


def collect_trace(tracker: Any, loss_desc: str, notes: list[str],
                  steady_state: bool = False) -> Trace:
    """The :class:`Trace` of a finished tracker.

    What a step allocates is a temporary until the step ends; the tensors left in
    ``optimizer.state`` then (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``) are
    optimizer state from the op that made them on (``StepTracker.state_made``): torch's
    ``MemTracker`` itself files every allocation of the step as optimizer state, so its
    ``_foreach_sqrt`` temporary of Adam (the size of the parameters) counted as state; the totals
    are the same.

    ``steady_state``: the step was an optimizer's first (its state is made inside ``step()``,
    before any update: torch's optimizers create all of it in ``_init_group``); every sample
    before the op that made a state tensor gets that tensor added (optimizer state and total), as
    in any later step, where the state exists from the start."""
    samples = tracker.samples
    n = len(samples)
    i_opt = 2 + KINDS.index("optimizer_state")
    i_tmp = 2 + KINDS.index("temporaries")
    made = list(getattr(tracker, "state_made", ()))
    move = [0] * (n + 1)      # bytes of state filed as temporaries (moved to optimizer state)
    add = [0] * (n + 1)       # bytes of state not made yet (steady state: added)
    added = 0
    for born, relabelled, size in made:
        born, relabelled = min(born, n), min(relabelled, n)
        move[born] += size
        move[relabelled] -= size
        if steady_state:
            add[0] += size
            add[born] -= size
            added += size
    if made:
        fixed = []
        m = a = 0
        for i, s in enumerate(samples):
            m += move[i]
            a += add[i]
            fixed.append(_shift(s, i_opt, i_tmp, m, a) if m or a else s)
        samples = fixed
    # each phase's largest sample (the first of equals): samples only move up by the state not
    # made yet, uniformly before the step, so only the step's own maximum can move
    where = dict(getattr(tracker, "step_where", {}))
    phase_best: dict[int, tuple[int, int, str | None, str | None]] = {}
    for index, (total, sample, module, op) in tracker.phase_max.items():
        if index == _STEP and added:
            best_i = max((i for i, s in enumerate(samples) if s[0] == _STEP),
                         key=lambda i: (samples[i][1], -i))
            module, op = where.get(best_i, (module, op))
            phase_best[index] = (samples[best_i][1], best_i, module, op)
        else:
            phase_best[index] = (samples[sample][1] if 0 <= sample < n else total, sample,
                                 module, op)
    phase_peaks: dict[str, int] = {}
    best: tuple[int, int, str | None, str | None, str] | None = None
    for index in phase_best:   # in the order the phases came
        total, sample, module, op = phase_best[index]
        phase_peaks[PHASES[index]] = int(total)
        if best is None or total > best[0]:
            best = (total, sample, module, op, PHASES[index])
    if best is None:
        best = (0, -1, None, None, "setup")
    peak = samples[best[1]] if best[1] >= 0 else (0, 0, *[0] * len(KINDS))
    by_kind = dict(zip(KINDS, (int(v) for v in peak[2:])))
    act = {(k or "(outside modules)"): int(v) for k, v in tracker.act_peak_modules.items()}
    if added:
        notes = [*notes, f"optimizer state made during the step ({added:,} bytes) counted from "
                         "the start, as in any step after the first"]
    step_start = next((i for i, s in enumerate(samples) if s[0] == _STEP), None)
    return Trace(peak_bytes=int(best[0]), by_kind=by_kind, peak_phase=best[4],
                 peak_module=best[2], peak_op=best[3], samples=samples, peak_sample=best[1],
                 phase_peaks=phase_peaks, act_peak=int(tracker.act_peak),
                 act_peak_phase=tracker.act_peak_phase, act_by_module=act,
                 by_device=tracker.device_peaks(), loss=loss_desc, notes=notes,
                 step_start=step_start, backward_end=getattr(tracker, "backward_end", None))


def _shift(s: tuple[int, ...], i_opt: int, i_tmp: int, moved: int, added: int
           ) -> tuple[int, ...]:
    """Sample ``s`` with ``moved`` bytes filed under temporaries moved to optimizer state and
    ``added`` bytes of optimizer state added (to the total too)."""
    out = list(s)
    out[1] += added
    out[i_opt] += moved + added
    out[i_tmp] -= moved
    return tuple(out)


__all__ = ["KINDS", "KIND_LABELS", "PHASES", "StepSpec", "Trace", "collect_trace",
           "trace_optimizer_step", "trace_step", "tracker_class"]
