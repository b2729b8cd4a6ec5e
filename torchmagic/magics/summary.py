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
from torchmagic.magics._base import (
    TorchMagics,
    as_flags,
    flag_names,
    input_arguments,
    parse,
    user_errors,
)


@magics_class
class SummaryMagics(TorchMagics):
    """``%summary`` and ``%params``."""

    @magic_arguments()
    @input_arguments
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
    @argument("--depth", type=int, default=None, help="deepest module level shown (default 3)")
    @argument("model", metavar="MODEL", help="an nn.Module (any expression)")
    @argument("inputs", nargs="*", metavar="INPUTS",
              help="shapes like (1,3,32,32) (several allowed), or tensors / an argument tuple "
                   "(every element positional) / a dict or tokenizer output (keyword arguments, "
                   "as model(**batch)) from the namespace; name=EXPR adds a keyword argument "
                   "(also beside shapes)")
    @line_magic
    def summary(self, line: str) -> None:
        """One row per module (down to --depth): input and output shapes, parameters (tied weights
        counted once), % of total, forward FLOPs (torch's counter plus SDPA on CPU, fused
        attention, mixture-of-experts grouped matmuls, quantized kernels and recurrent layers;
        ops that cannot be counted are listed under NOT COUNTED), output bytes, kernel size; then
        totals (parameters, trainable/frozen, bytes by dtype, buffers, activations, FLOPs and
        MACs).

        INPUTS: shapes, or values from the namespace. A tuple written out is the argument list
        (every element positional: ``(feats,)`` passes a dict as one argument); a dict or a
        tokenizer's ``BatchEncoding`` is keyword arguments (``model(**batch)``); ``name=EXPR``
        adds a keyword argument, also beside shapes (``(1,3,224,224) return_dict=False``).
        ``--args EXPR`` / ``--kwargs EXPR`` give them explicitly. Options go anywhere on the line.

        The model is never changed: the forward runs on a twin (flags, buffers, Python
        attributes, hooks, RNG and global torch state are the same afterwards; lazy modules stay
        lazy). Quantized modules count their packed weights; lazy ones without INPUTS are listed
        as uninitialized. With no INPUTS only parameters are listed. A failing forward shows the
        table up to the failure and one line naming the failing module.

        Examples::

            %summary cnn (1,3,32,32)
            %summary gpt (2,128) --dtypes long --depth 2
            %summary gpt ids --meta
            %summary bert batch                       # batch = tokenizer(...): keyword arguments
            %summary encoder (feats,)                 # forward(self, features): one dict argument
            %summary vit (3,224,224) output_attentions=True --batch-dim 0
            %summary model (1,10) --columns params,flops -o s
        """
        from torchmagic.core.summary import summary

        if not line.strip():
            raise UsageError("%summary: give a model, e.g. %summary model (1,3,32,32) "
                             "(see %summary? for every option)")
        args = parse(self.summary, line)
        result = None
        with user_errors("%summary"), flag_names():
            model = self.evaluate(args.model, "model")
            values, given = self.model_inputs(args)
            depth = self.cfg.depth if args.depth is None else args.depth
            self.check_output_name(args.output)  # before anything runs or changes
            try:
                result = summary(model, *values, **given, depth=depth, mode=args.mode, device=args.device, meta=args.meta,
                                 columns=args.columns, torchinfo=args.torchinfo,
                                 memory=args.memory)
            except ForwardError as exc:
                if exc.partial is not None:
                    exc.partial.error = as_flags(exc.partial.error or "") or None
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
        separately. Reads metadata only: works on meta models of any size. Quantized modules
        count their packed weights (true bytes by dtype, e.g. qint8); tensor-subclass and float8
        weights count the bytes they store; lazy modules' uninitialized parameters are named,
        not counted as 0.

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
