"""``%%detect_anomaly``: run a cell and say where its first NaN/Inf was born, forward and backward."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.magics._base import TorchMagics, parse, user_errors


@magics_class
class AnomalyMagics(TorchMagics):
    """The ``%%detect_anomaly`` cell magic."""

    @magic_arguments()
    @argument("--no-forward", action="store_true",
              help="Do not check forward ops (only anomaly mode in backward).")
    @argument("--no-backward", action="store_true",
              help="Do not turn on autograd anomaly mode nor check backward ops.")
    @argument("--first", type=int, default=1, metavar="N",
              help="List the first N ops where NaN/Inf was born (default 1: the origin).")
    @cell_magic
    def detect_anomaly(self, line: str, cell: str) -> Any:
        """Run the cell; report the first op that produced NaN/Inf (op, module, cell line) and the
        autograd node that produced NaN/Inf gradients (with the forward line that created it).

        The cell runs for real in the notebook's namespace (its assignments stay); the value of its
        last expression is shown as usual. A clean run prints one line. If the cell raises for
        another reason, the report is shown and the exception re-raised unchanged. Anomaly mode,
        warnings filters and every hook the check installs are restored afterwards.

        Usage: ``%%detect_anomaly [--no-forward] [--no-backward] [--first N]``
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        from torchmagic.core.anomaly import AnomalyDetector
        from torchmagic.core.execution import compile_user_cell, run_compiled

        args = parse(self.detect_anomaly, line)
        if args.first < 1:
            raise UsageError(f"%%detect_anomaly: --first must be 1 or more; got {args.first}")
        source = self.transform(cell)
        with user_errors("%%detect_anomaly"):
            compiled = compile_user_cell(source, "detect_anomaly", "check")
        ns = self.shell.user_ns
        with user_errors("%%detect_anomaly"):
            detector = AnomalyDetector(ns, cell_filename=compiled.filename,
                                       forward=not args.no_forward, backward=not args.no_backward,
                                       first=args.first)

        def cell() -> Any:
            __tracebackhide__ = True
            return run_compiled(compiled, ns)

        return self.run_and_report(detector, cell, lambda: detector.report)


MAGICS = [AnomalyMagics]
