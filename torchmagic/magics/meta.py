"""``%%meta_shape``: run a cell on the meta device (or fake tensors) and show every shape it makes.

The cell runs in a copy of the namespace where the models and tensors it uses are meta twins; its
names are not written back (``-o VAR`` stores the report). A failure shows the partial report, then
a one-line error naming the cell line, the module and the op.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.magics._base import TorchMagics, one_line, parse, user_errors


@magics_class
class MetaShapeMagics(TorchMagics):
    """``%%meta_shape [--depth N] [--fake] [--no-fold] [-o VAR]``."""

    @magic_arguments()
    @argument("--depth", type=int, default=None, metavar="N",
              help="module calls shown down to N levels below the calls the cell makes "
                   "(default: %%config TorchMagic.depth, 3)")
    @argument("--fake", action="store_true",
              help="run under FakeTensorMode with a ShapeEnv: data-dependent sizes (nonzero, "
                   "masks, unique, .item()) continue as symbols such as (u0, 4)")
    @argument("--no-fold", dest="no_fold", action="store_true",
              help="list every call of repeated blocks instead of folding them (layers.0-31 ×32)")
    @argument("-o", dest="output", metavar="VAR",
              help="store the report object in VAR (also when the cell fails)")
    @cell_magic
    def meta_shape(self, line: str, cell: str) -> None:
        """Run the cell on PyTorch's meta device and report shapes, not values.

        For each assignment and the last expression: name, type, shape, dtype (modules: parameter
        count); and the tree of module calls with input -> output shapes. Models and tensors from
        the notebook run as meta twins (no weight copied, tied weights kept), factory calls
        allocate nothing (a 70B model built in the cell costs no memory), and nothing the cell
        assigns is written back. Global torch state (default device, grad mode, RNG) is restored.

        A shape mismatch names the line, module and op. Code that reads values (.item(),
        masks, nonzero, unique), which meta tensors lack, runs again on fake tensors (as --fake
        asks from the start): data-dependent sizes continue as symbols (u0), and a note says
        so; a Python branch on such a value stops with the reason.
        """
        from torchmagic.core.errors import ForwardError
        from torchmagic.core.meta import meta_shape

        args = parse(self.meta_shape, line)
        depth = self.cfg.depth if args.depth is None else args.depth
        if depth < 0:
            raise UsageError(f"%%meta_shape: --depth must be >= 0; got {depth}")
        with user_errors("%%meta_shape"):
            self.check_output_name(args.output)
            source = self.transform(cell)
            try:
                report = meta_shape(source, self.shell.user_ns, depth=depth, fake=args.fake,
                                    fold=not args.no_fold, _flag="--fake")
            except ForwardError as exc:
                partial: Any = exc.partial
                if partial is not None:
                    self.store(args.output, partial)
                    self.show(partial)
                raise UsageError(f"%%meta_shape: {one_line(str(exc))}") from None
            self.store(args.output, report)
        self.show(report)


MAGICS = [MetaShapeMagics]
