"""``%tensor EXPR [EXPR ...]``, ``%tensors`` and ``%device OBJ``: what a tensor is and where things
live. Read-only: none of them changes a tensor, a module or torch's global state."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import TorchMagicError
from torchmagic.magics._base import TorchMagics, parse, user_errors


def _expressions(tokens: list[str]) -> list[str]:
    """Tokens as expressions; ``x + 1`` (split on spaces) is put back together as one."""
    import ast

    def ok(src: str) -> bool:
        try:
            ast.parse(src, mode="eval")
        except SyntaxError:
            return False
        return True

    if all(ok(t) for t in tokens):
        return tokens
    joined = " ".join(tokens)
    return [joined] if ok(joined) else tokens


@magics_class
class TensorMagics(TorchMagics):
    """``%tensor``, ``%tensors`` and ``%device``."""

    def namespace(self) -> dict[str, Any]:
        """The user's variables, without IPython's hidden ones and ``_`` names (like ``%whos``)."""
        hidden = getattr(self.shell, "user_ns_hidden", {})
        return {k: v for k, v in self.shell.user_ns.items()
                if not k.startswith("_") and (k not in hidden or hidden[k] is not v)}

    @magic_arguments()
    @argument("-o", dest="output", metavar="VAR", help="also store the result object in VAR")
    @argument("--no-stats", action="store_true",
              help="skip the value statistics (metadata and storage sharing only)")
    @argument("exprs", nargs="+", metavar="EXPR", help="tensor expressions, e.g. x  x.view(-1)  w.grad")
    @line_magic
    def tensor(self, line: str) -> None:
        """Describe tensors: shape, dtype, device, autograd state, stride, contiguity, storage
        (offset, size, and "view of `x`" for tensors sharing memory with others in the namespace)
        and value statistics (min, max, mean, std over finite values; NaN / Inf / zero counts),
        computed on the tensor's device with one host synchronisation.

        Several expressions are shown side by side: ``%tensor x x.view(-1) x.t().reshape(-1)``.
        Meta and fake tensors show shape information only.
        """
        from torchmagic.core.errors import a_type
        from torchmagic.core.tensor import tensor_report

        args = parse(self.tensor, line)
        with user_errors("%tensor"):
            values = {}
            for expr in _expressions(args.exprs):
                value = self.evaluate(expr, "tensor expression")
                if not isinstance(value, _torch().Tensor):
                    hint = " (no gradient yet: run backward() first)" if value is None and \
                        expr.endswith(".grad") else ""
                    what = "None" if value is None else a_type(value)
                    raise TorchMagicError(f"{expr} is {what}, not a tensor{hint}")
                values[expr] = value
            result = tensor_report(values, self.namespace(), stats=not args.no_stats)
            self.store(args.output, result)
        self.show(result)

    @magic_arguments()
    @argument("-o", dest="output", metavar="VAR", help="also store the result object in VAR")
    @argument("--no-check", action="store_true",
              help="skip the NaN/Inf check (one pass over each tensor's values)")
    @line_magic
    def tensors(self, line: str) -> None:
        """Every tensor bound to a name (``%whos`` for tensors): name, shape, dtype, device, bytes,
        requires_grad, NaN/Inf flag and view-of relationships, largest first; the total counts
        shared memory once. Parameters inside modules are listed only when bound to a name."""
        from torchmagic.core.tensor import tensors

        args = parse(self.tensors, line)
        with user_errors("%tensors"):
            result = tensors(self.namespace(), check_values=not args.no_check)
            self.store(args.output, result)
        self.show(result)

    @magic_arguments()
    @argument("-o", dest="output", metavar="VAR", help="also store the result object in VAR")
    @argument("expr", nargs="+", metavar="OBJ", help="a model, tensor, optimizer or state_dict")
    @line_magic
    def device(self, line: str) -> None:
        """Where a model's parameters and buffers live (devices with counts and bytes; a model on
        several devices is flagged with the modules on each), where a tensor or an optimizer's
        state lives, and one line of CUDA / MPS availability."""
        from torchmagic.core.device import device_report

        args = parse(self.device, line)
        expr = " ".join(args.expr)
        with user_errors("%device"):
            value = self.evaluate(expr, "model, tensor or optimizer")
            result = device_report(value, expr)
            self.store(args.output, result)
        self.show(result)


def _torch() -> Any:
    import torch

    return torch


MAGICS = [TensorMagics]
