"""What a traced step is made of besides its fake twins (:mod:`torchmagic.core.twin`) and what
:mod:`torchmagic.core.estimate_trace` runs: the optimizer (by name, class or factory),
activation checkpointing of the repeated blocks, and the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchmagic.core.errors import TorchMagicError

# ---------------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------------
_OPTIMIZER_ALIASES = {"sgd-momentum": ("SGD", {"momentum": 0.9}),
                      "sgdm": ("SGD", {"momentum": 0.9}),
                      "sgd-nesterov": ("SGD", {"momentum": 0.9, "nesterov": True})}


def optimizer_classes() -> dict[str, type]:
    """Every ``torch.optim`` optimizer class by lower-case name."""
    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and \
                obj is not torch.optim.Optimizer:
            out[name.lower()] = obj
    return out


@dataclass
class OptimizerSpec:
    """How to make the optimizer: a class and keyword arguments, or a factory ``f(params)``."""

    label: str                      # "AdamW", "SGD(momentum=0.9)"
    cls: type | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: Callable[[list[torch.Tensor]], Any] | None = None

    def make(self, params: list[torch.Tensor], foreach: bool | None) -> torch.optim.Optimizer:
        if self.factory is not None:
            opt = self.factory(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TorchMagicError(f"the optimizer factory returned {type(opt).__name__}, not "
                                      "a torch.optim.Optimizer")
            return opt
        assert self.cls is not None
        kwargs = dict(self.kwargs)
        if foreach is not None and "foreach" not in kwargs and \
                "foreach" in inspect.signature(self.cls.__init__).parameters:
            kwargs["foreach"] = foreach
        try:
            return self.cls(params, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TorchMagicError(f"cannot create {self.label}: {exc}") from None


def optimizer_spec(optimizer: Any, kwargs: Mapping[str, Any] | None = None) -> OptimizerSpec:
    """``"adamw"``, ``"sgd-momentum"``, any ``torch.optim`` class name (any case), an optimizer
    class, or a callable ``f(params) -> Optimizer`` -> :class:`OptimizerSpec`."""
    kwargs = dict(kwargs or {})
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls, extra = optimizer, {}
    elif isinstance(optimizer, str):
        key = optimizer.strip().lower().replace("_", "-")
        if key in _OPTIMIZER_ALIASES:
            name, extra = _OPTIMIZER_ALIASES[key]
            cls = getattr(torch.optim, name)
        else:
            classes = optimizer_classes()
            cls = classes.get(key.replace("-", ""))
            extra = {}
            if cls is None:
                names = sorted({c.__name__.lower() for c in classes.values()
                                if c.__name__ != "LBFGS"} | set(_OPTIMIZER_ALIASES))
                raise TorchMagicError(f"unknown optimizer {optimizer!r}: torch.optim has no such "
                                      f"class (valid: {', '.join(names)})")
    elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        label = getattr(optimizer, "__name__", type(optimizer).__name__)
        return OptimizerSpec(label=f"{label}(params)", factory=optimizer)
    else:
        raise TorchMagicError(f"optimizer must be a torch.optim class name (adamw, sgd, ...), a "
                              f"class, or a function of the parameters; got "
                              f"{type(optimizer).__name__}")
    if cls.__name__ == "LBFGS":
        raise TorchMagicError("LBFGS steps with a closure that re-runs the model; estimate it with "
                              "%%estimate on your own training cell")
    merged = {**extra, **kwargs}
    label = cls.__name__ + (f"({', '.join(f'{k}={v}' for k, v in merged.items())})"
                            if merged else "")
    return OptimizerSpec(label=label, cls=cls, kwargs=merged)


# ---------------------------------------------------------------------------------------------
# checkpointing, loss
# ---------------------------------------------------------------------------------------------
def repeated_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The largest group of repeated blocks: the ``ModuleList``/``Sequential`` (at any depth)
    whose children are two or more modules of one class, with the most parameters."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if not any(True for _ in children[0].parameters()):
            continue
        size = sum(p.numel() for c in children for p in c.parameters())
        if best is None or size > best[0]:
            best = (size, name, children)
    return None if best is None else (best[1], best[2])


def apply_checkpointing(model: nn.Module) -> str:
    """Wrap each repeated block of the (twin) ``model`` in ``torch.utils.checkpoint`` (non
    reentrant): its activations are recomputed in backward instead of kept. Returns a
    description; raises :class:`TorchMagicError` when the model has no repeated blocks."""
    from torch.utils.checkpoint import checkpoint

    found = repeated_blocks(model)
    if found is None:
        raise TorchMagicError("--checkpointing wraps each repeated block (a ModuleList or "
                              "Sequential of layers of one class) and this model has none")
    name, blocks = found
    for block in blocks:
        forward = block.forward

        def wrapped(*args: Any, __forward: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(__forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped  # the twin's own attribute; the user's model is not touched
    return (f"activation checkpointing: each of the {len(blocks)} {type(blocks[0]).__name__} "
            f"blocks in {name or '(root)'} (torch.utils.checkpoint, non-reentrant)")


LOSSES = ("auto", "mean", "cross_entropy")


def first_float_output(out: Any) -> torch.Tensor | None:
    from torchmagic.core.tracing import _tensor_leaves

    for t in _tensor_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            return t
    return None


def compute_loss(out: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 loss: Any) -> tuple[torch.Tensor, str]:
    """The scalar to back-propagate from ``out`` and how it was made (see ``estimate_memory``)."""
    import torch.nn.functional as F

    if callable(loss):
        value = loss(out)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            raise TorchMagicError("the loss function must return a one-element tensor that "
                                  "requires grad")
        return value, f"{getattr(loss, '__name__', 'loss')}(output)"
    if loss == "auto":
        own = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if isinstance(own, torch.Tensor) and own.numel() == 1 and own.requires_grad:
            return own, "the model's own loss (output.loss)"
    logits = first_float_output(out)
    if logits is None:
        raise TorchMagicError("the model's output holds no floating tensor that requires grad: "
                              "nothing to back-propagate (are all parameters frozen?)")
    if loss in ("auto", "cross_entropy"):
        ids = None
        for t in [kwargs.get("input_ids"), *args, *kwargs.values()]:
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and \
                    not t.is_complex() and t.dtype != torch.bool:
                ids = t
                break
        if ids is not None and logits.dim() == ids.dim() + 1 and \
                tuple(logits.shape[:-1]) == tuple(ids.shape):
            value = F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())
            return value, "cross-entropy of the logits (in float32) against the input ids"
        if loss == "cross_entropy":
            raise TorchMagicError("loss cross_entropy needs integer inputs (token ids) of shape "
                                  "(batch, ...) and logits of shape (batch, ..., classes)")
    return logits.float().mean(), "mean of the output (in float32)"


__all__ = ["LOSSES", "OptimizerSpec", "apply_checkpointing", "compute_loss", "first_float_output",
           "optimizer_classes", "optimizer_spec", "repeated_blocks"]
