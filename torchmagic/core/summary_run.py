"""How ``%summary`` runs a forward without touching the user's model.

The forward always runs on a twin (:mod:`torchmagic.core.twin`), never on the user's modules:

- real weights: a *structural* twin (``shared_twin``): parameters share the user's storage (no
  weight copied), buffers are clones, and submodules, Python attributes and flags are the twin's
  own, so what the forward writes (BatchNorm running statistics, ``self.steps += 1``, caches, a
  lazy module materializing its parameters) stays in the twin;
- ``meta=True`` (or a model already on meta): a meta twin (no weight read, no memory);
- ``device=D``: a copy on ``D`` (``device_twin``) unless the model already lives there.

Twins are isolated by :mod:`torchmagic.core.isolation` (locks shared, containers and hooks'
side effects copied); a model holding something that can be neither copied nor shared (a generator,
an open file) is refused in one line naming it: the forward never runs on the user's own module.
Training flags follow ``mode`` (``same`` keeps each module's
own flag); everything runs under ``torch.no_grad()`` inside ``preserved_global_state()``;
``nn.MultiheadAttention``/``TransformerEncoderLayer`` fast paths are switched off for the run so
their submodules are visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError


@dataclass
class Plan:
    """Where and on what the forward runs."""

    run_model: nn.Module
    target: torch.device
    is_twin: bool = True
    meta: bool = False
    auto_meta: bool = False   # meta because the model itself is on meta (no meta=True given)
    notes: list[str] = field(default_factory=list)


def plan_run(model: nn.Module, meta: bool, device: Any) -> Plan:
    """Choose the twin the forward runs on (see the module docstring)."""
    from torchmagic.core.inputs import model_device, normal_device
    from torchmagic.core.twin import device_twin, is_meta_model, meta_twin, shared_twin

    auto = not meta and is_meta_model(model)
    meta = bool(meta) or auto
    dev = None
    if device is not None:
        dev = normal_device(device)
        if dev.type == "meta":
            meta = True
    if meta:
        if any(isinstance(v, torch.ScriptObject) for m in model.modules() for v in vars(m).values()):
            raise TorchMagicError(
                f"{type(model).__name__} holds packed quantized weights (torch.ao quantized "
                "modules), which only run on the CPU: run without meta=True")
        return Plan(meta_twin(model), torch.device("meta"), meta=True, auto_meta=auto,
                    notes=["ran on a meta twin: no weights read, no memory used"])
    if dev is not None:
        devices = {t.device for t in [*model.parameters(), *model.buffers()]}
        if devices and devices != {dev}:
            return Plan(device_twin(model, dev), dev,
                        notes=[f"ran on a copy of the model on {dev}"])
    target = dev if dev is not None else model_device(model)
    try:
        return Plan(shared_twin(model), target)
    except TorchMagicError:
        raise  # IsolationError: names the attribute that cannot be isolated, and why
    except Exception as exc:  # noqa: BLE001 - e.g. a __deepcopy__ of the user's that raises
        msg = " ".join(str(exc).split())[:160]
        raise TorchMagicError(
            f"{type(model).__name__} could not be copied to run on a twin ({type(exc).__name__}: "
            f"{msg}); the forward never runs on the model itself, whose Python attributes it "
            "could change") from None


@dataclass
class Run:
    """A traced forward: the module calls, their FLOPs, and the user's exception if it failed."""

    tracer: Any
    counter: Any
    error: BaseException | None = None


def run_forward(plan: Plan, user_model: nn.Module, mode: str, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Run:
    """Run ``plan.run_model(*args, **kwargs)`` traced (module calls, keyword inputs, FLOPs).
    The user's exception is kept in ``Run.error``; KeyboardInterrupt propagates. Global torch
    state and the user's training flags are restored on every exit."""
    from torchmagic.core.flops import flop_counter
    from torchmagic.core.meta_gaps import MetaKernelGaps
    from torchmagic.core.state import preserved_global_state, preserved_training_flags, set_mode
    from torchmagic.core.tracing import ModuleTracer, trace_modules

    run_model = plan.run_model
    tracer = ModuleTracer(run_model)
    if run_model is not user_model:  # a forward may reach the user's modules from outside self
        for name, mod in user_model.named_modules(remove_duplicate=False):
            tracer.names.setdefault(id(mod), name)
    counter = flop_counter(tracer)
    run = Run(tracer, counter)
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    with preserved_global_state(), preserved_training_flags(user_model):
        try:
            torch.set_grad_enabled(False)
            if mha is not None:
                mha.set_fastpath_enabled(False)
            set_mode(run_model, mode)
            if plan.is_twin:
                with tracer.watch_kwargs(run_model), trace_modules(tracer), MetaKernelGaps(), \
                        counter:
                    run_model(*args, **kwargs)
            else:
                from torch.func import functional_call

                buffers = {n: b.clone() for n, b in run_model.named_buffers()}
                with trace_modules(tracer), counter:
                    functional_call(run_model, buffers, args, kwargs, tie_weights=True,
                                    strict=False)
        except Exception as exc:  # the user's forward failed: reported, not raised as is
            run.error = exc
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fast)
    return run


_META_HINTS = ("meta tensor", "cannot copy out of meta", "on the expected device meta",
               "is not on the expected device", "data-dependent", "meta device")
_VALUE_HINTS = ("item() cannot be called on meta", "cannot copy out of meta",
                "data-dependent", "nonzero", "meta tensors do not", "boolean value of tensor")


def reads_values(plan: Plan, error: BaseException | None) -> bool:
    """True when a meta run failed because the forward reads tensor values (``.item()``, a
    boolean test of a mask): the failure :func:`fake_retry` can get past."""
    if error is None or not plan.meta:
        return False
    low = str(error).lower()
    return any(h in low for h in _VALUE_HINTS)


def can_fake(model: nn.Module) -> bool:
    """False for models fake tensors cannot copy: uninitialized lazy or quantized tensors."""
    from torch.nn.parameter import UninitializedParameter

    return not any(isinstance(t, UninitializedParameter) or t.is_quantized
                   for t in [*model.parameters(), *model.buffers()])


def fake_retry(user_model: nn.Module, mode: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[Plan, Run] | None:
    """Run the forward again on fake tensors (``FakeTensorMode`` with a ``ShapeEnv``, on the
    CPU: no memory, no weights read), where a value read gives a symbolic value (``u0``)
    instead of failing. For a meta run that failed in :func:`reads_values` (a Hugging Face
    model given ``attention_mask``). Returns None when the model cannot have fake tensors
    (lazy or quantized modules: :func:`can_fake`) or the fake run fails as well (the meta failure
    is reported)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from torchmagic.core.state import quiet_fake_tensor_log
    from torchmagic.core.twin import fake_inputs, fake_model

    cpu = torch.device("cpu")
    fm = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    with quiet_fake_tensor_log():
        try:
            run_model = fake_model(user_model, fm, cpu)
            f_args, f_kwargs = fake_inputs((args, kwargs), fm, cpu, None)
        except Exception:  # noqa: BLE001 - what fake tensors cannot copy: the meta error stands
            return None
        plan = Plan(run_model, cpu, meta=True, notes=[
            "ran on a fake twin (FakeTensorMode): the forward reads tensor values (a mask's "
            "contents, .item()), which meta tensors lack; fake tensors give them symbolic "
            "values. No weights read, no memory used"])
        with fm:
            run = run_forward(plan, user_model, mode, f_args, f_kwargs)
    if run.error is not None:
        return None
    return plan, run


def failure_hint(run: Run, plan: Plan, default_dtypes: bool, split_list: bool,
                 kwargs: dict[str, Any], fake_failed: bool = False) -> str:
    """What the user can do about common failures, in plain-Python argument names (the magic
    translates them to its flags). ``fake_failed``: :func:`fake_retry` ran and failed too (no
    suggestion of fake tensors then)."""
    err = run.error
    low = str(err).lower()
    failing = run.tracer.failing_call
    if default_dtypes and ("'indices' to have one of the following scalar types" in low
                           or "expected scalar type long" in low
                           or "tensors used as indices must be" in low):
        return (" (inputs made from shapes are floating point unless told otherwise: give token "
                "ids an integer dtype with dtypes='long')")
    if split_list and isinstance(err, TypeError) and "positional argument" in low and \
            failing is not None and failing.parent is None:
        return (" (a list or tuple written out as the inputs is the argument list: each element "
                "is one positional argument; to pass the list as one argument, wrap it: (xs,) or "
                "args=(xs,))")
    if plan.meta and ("no fake impl or meta kernel" in low or "meta kernel registered" in low):
        import re

        op = re.search(r"(\w+::\w+)", str(err))
        return (f" ({'the model is on the meta device, ' if plan.auto_meta else 'meta=True: '}"
                f"{op.group(1) if op else 'an op of this forward'} has no meta kernel, so the "
                "forward cannot run on meta tensors"
                + ("" if plan.auto_meta else "; run on real weights without meta=True") + ")")
    if plan.meta and any(h in low for h in _META_HINTS):
        where = ("the model is on the meta device (no weights), so the forward ran on meta "
                 "tensors" if plan.auto_meta else "meta=True ran the forward on meta tensors")
        if any(h in low for h in _VALUE_HINTS):
            what = (f"{where}, which have shapes but no values, and this forward reads tensor "
                    "values (Tensor.item(), a boolean test, nonzero() or a mask's contents)")
            fixes = []
            masks = [k for k in kwargs if "mask" in k]
            if masks:
                fixes.append(f"leave out {', '.join(masks)} (the model builds its own mask from "
                             "the shapes)")
            if fake_failed:
                what += ("; fake tensors, which carry symbolic values, did not get past it "
                         "either (a branch on a value)")
            else:
                fixes.append("run it with fake tensors, which carry symbolic values "
                             "(torchmagic.meta_shape(code, fake=True))")
            if not plan.auto_meta:
                fixes.append("run on real weights without meta=True")
            return f" ({what}" + (f"; what works: {'; or '.join(fixes)})" if fixes else ")")
        return (f" ({where}: a forward that mixes devices cannot run on meta"
                + ("; move the model or inputs to one device" if plan.auto_meta
                   else "; run without meta=True") + ")")
    return ""


__all__ = ["Plan", "Run", "can_fake", "failure_hint", "fake_retry", "plan_run", "reads_values",
           "run_forward"]
