"""``%summary MODEL [INPUTS] [options]`` and ``%params MODEL [options]``.

Both only parse the line, call :func:`torchmagic.core.summary.summary` /
:func:`torchmagic.core.params.params`, and display the result. torch is imported when a magic runs,
not when the extension loads.
"""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.magics._base import TorchMagics, parse, user_errors


@magics_class
class SummaryMagics(TorchMagics):
    """``%summary`` and ``%params``."""

    @magic_arguments()
    @argument("-o", dest="output", metavar="VAR", help="also store the ModelSummary in VAR")
    @argument("--memory", action="store_true",
              help="also the peak memory of an inference and of a training step (AdamW), "
                   "estimated on fake tensors (%%estimate for the breakdown)")
    @argument("--torchinfo", action="store_true",
              help="also show torchinfo's own table (same inputs and depth; run on a copy)")
    @argument("--columns", metavar="COLS",
              help="comma-separated columns: input, output, params, trainable, percent, flops, "
                   "macs, bytes, kernel, calls")
    @argument("--meta", action="store_true",
              help="run on a meta copy of the model: no weights read, no memory")
    @argument("--device", metavar="D", help="run on a copy of the model on device D (e.g. cuda)")
    @argument("--mode", choices=["same", "eval", "train"], default="same",
              help="training flags for the run: same (each module keeps its own; default), "
                   "eval or train")
    @argument("--dtypes", metavar="DTYPES",
              help="dtypes of shape inputs, comma-separated (e.g. long,float); integer inputs "
                   "are zeros, floating ones random")
    @argument("--depth", type=int, default=None, help="deepest module level shown (default 3)")
    @argument("model", metavar="MODEL", help="an nn.Module (any expression)")
    @argument("inputs", nargs="*", metavar="INPUTS",
              help="shapes like (1,3,32,32) (several allowed), or tensors / tuples of tensors / a "
                   "dict of keyword arguments from the namespace")
    @line_magic
    def summary(self, line: str) -> None:
        """One row per module (down to --depth): input and output shapes, parameters (tied weights
        counted once), % of total, forward FLOPs (torch's counter plus SDPA on CPU, fused
        attention and recurrent layers), output bytes, kernel size; then totals (parameters,
        trainable/frozen, bytes by dtype, buffers, activations, FLOPs and MACs).

        The model is never changed: flags, buffers (BatchNorm statistics), hooks, RNG and global
        torch state are the same afterwards. With no INPUTS only parameters are listed. A failing
        forward shows the table up to the failure and one line naming the failing module.

        Examples::

            %summary cnn (1,3,32,32)
            %summary gpt (2,128) --dtypes long --depth 2
            %summary gpt ids --meta
            %summary model (1,10) --columns params,flops -o s
        """
        from torchmagic.core.summary import summary

        if not line.strip():
            raise UsageError("%summary: give a model, e.g. %summary model (1,3,32,32) "
                             "(see %summary? for every option)")
        args = parse(self.summary, line)
        result = None
        with user_errors("%summary"):
            model = self.evaluate(args.model, "model")
            shapes, values = self.parse_inputs(args.inputs)
            depth = self.cfg.depth if args.depth is None else args.depth
            dtypes = [d for d in args.dtypes.split(",") if d.strip()] if args.dtypes else None
            if dtypes and not shapes:
                raise TorchMagicError("--dtypes applies to shape inputs like (2,16); tensors keep "
                                      "their own dtype")
            self.check_output_name(args.output)  # before anything runs or changes
            try:
                result = summary(model, *values, input_size=shapes, dtypes=dtypes, depth=depth,
                                 mode=args.mode, device=args.device, meta=args.meta,
                                 columns=args.columns, torchinfo=args.torchinfo,
                                 memory=args.memory)
            except ForwardError as exc:
                if exc.partial is not None:
                    self.store(args.output, exc.partial)
                    self.show(exc.partial)
                raise
            self.store(args.output, result)
        self.show(result)

    @magic_arguments()
    @argument("-o", dest="output", metavar="VAR", help="also store the ParamReport in VAR")
    @argument("--frozen", action="store_true", help="break down frozen parameters only")
    @argument("--trainable", action="store_true", help="break down trainable parameters only")
    @argument("--depth", type=int, default=None, help="deepest module level shown (default 3)")
    @argument("model", nargs="+", metavar="MODEL", help="an nn.Module (any expression)")
    @line_magic
    def params(self, line: str) -> None:
        """Parameters of a model: total, trainable and frozen (counts and %), bytes by dtype, the
        devices they live on (a WARNING when split across devices), a per-module breakdown down
        to --depth, tied parameters listed once with all their names, and buffers counted
        separately. Reads metadata only: works on meta models of any size.

        Examples::

            %params model
            %params model --depth 1 --trainable
        """
        from torchmagic.core.params import params

        if not line.strip():
            raise UsageError("%params: give a model, e.g. %params model (see %params? for options)")
        args = parse(self.params, line)
        with user_errors("%params"):
            if args.trainable and args.frozen:
                raise TorchMagicError("choose one of --trainable and --frozen")
            expr = " ".join(args.model)
            model = self.evaluate(expr, "model")
            depth = self.cfg.depth if args.depth is None else args.depth
            only = "trainable" if args.trainable else "frozen" if args.frozen else None
            result = params(model, depth=depth, only=only, name=expr)
            self.store(args.output, result)
        self.show(result)


MAGICS = [SummaryMagics]
