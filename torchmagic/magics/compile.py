"""``%%compile`` (a cell under ``torch.compile``, explained) and ``%compile MODEL INPUTS``."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import ForwardError, TorchMagicError, a_type
from torchmagic.magics._base import (
    INPUT_FLAGS,
    TorchMagics,
    flag_names,
    input_arguments,
    parse,
    user_errors,
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _dynamic(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise TorchMagicError(f"--dynamic takes true or false (or nothing: true); got {value!r}")


@magics_class
class CompileMagics(TorchMagics):
    """``%%compile`` and ``%compile``."""

    @magic_arguments()
    @input_arguments
    @argument("--backend", default="inductor", metavar="NAME",
              help="torch.compile backend (default inductor; aot_eager or eager isolate dynamo "
                   "from code generation)")
    @argument("--mode", metavar="MODE",
              help="inductor mode: default, reduce-overhead, max-autotune, "
                   "max-autotune-no-cudagraphs")
    @argument("--fullgraph", action="store_true",
              help="report where torch.compile(fullgraph=True) fails instead of failing")
    @argument("--dynamic", nargs="?", const="true", default=None, metavar="BOOL",
              help="dynamic=True (or --dynamic false) as torch.compile takes it")
    @argument("--explain", action="store_true",
              help="trace only: graphs and breaks without code generation (fast)")
    @argument("--bench", action="store_true",
              help="time eager and compiled (torch.utils.benchmark, after warm-up)")
    @argument("--check", action="store_true",
              help="compare eager and compiled outputs (max abs / rel difference)")
    @argument("--logs", metavar="NAMES",
              help="TORCH_LOGS names captured for this run, e.g. graph_breaks,recompiles,guards,"
                   "output_code")
    @argument("--runs", type=int, default=1, metavar="N",
              help="run the cell (call the model) N times: recompiles show up (default 1)")
    @argument("--min-time", type=float, default=0.2, metavar="S",
              help="--bench: blocked_autorange's minimum time per side in seconds (default 0.2)")
    @argument("--then", action="append", nargs="+", metavar="INPUTS",
              help="%%compile MODEL: one more call with these inputs (repeatable): a shape that "
                   "changes shows its recompile")
    @argument("-o", dest="output", metavar="VAR", help="also store the CompileReport in VAR")
    @argument("model", nargs="?", metavar="MODEL",
              help="%%compile: an nn.Module or a function (any expression)")
    @argument("inputs", nargs="*", metavar="INPUTS",
              help="%%compile: shapes like (1,3,32,32), or tensors / tuples / a dict of keyword "
                   "arguments, as %%summary takes them")
    @line_cell_magic
    def compile(self, line: str, cell: str | None = None) -> Any:
        """Compile with torch.compile and explain: graphs, graph breaks, recompiles, compile time,
        and with --bench the honest speed-up.

        ``%%compile [options]`` runs the cell compiled: the cell becomes one function over the
        namespace (models it calls are traced through); its assignments land in the namespace
        when it ends, as a normal cell's would (not when it raises); its last expression is
        returned. ``--runs N`` runs it N times. ``%compile MODEL INPUTS [options]`` compiles the
        model's forward with INPUTS as %summary takes them, on a private copy of the model
        (parameters shared, buffers and attributes copied): the model is unchanged. ``--then
        INPUTS`` adds a call with other inputs.

        The report: graph count and graph breaks as torch._dynamo.explain counts them, each
        break's reason in plain words with torch's hints and its place (the cell line, or
        file:line in the module's forward with the module's path); the ops of each graph;
        recompiles (which guard failed: shape, dtype, a Python value, a global) with
        suggestions; compile time as dynamo tracing + backend code generation; the first call's
        time. --bench: eager and compiled medians with torch.utils.benchmark, same threads,
        after warm-up, and how many calls repay compiling. --check: eager and compiled outputs,
        max abs / rel difference (inductor with fallback_random so random ops match). --logs:
        TORCH_LOGS artifacts captured for this run and shown folded (never on stderr).

        A cell's --bench/--check rerun it on a copy of the namespace taken before the run, with
        the modules it names replaced by private copies, output discarded; they are skipped (with
        a note) when the cell changed parameters, gradients or tensors in place (optimizer
        steps, backward, x.add_()). Changes the cell makes to torch._dynamo / torch._inductor
        config apply to this run only. Your own compiled functions keep their caches (no
        torch._dynamo.reset()), nothing compiled here is reused later, and global torch state is
        restored.

        Examples::

            %%compile --backend aot_eager
            y = model(x)

            %compile model (8,128) --dtypes long --bench
            %compile f x --then x_long --logs recompiles
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        from torchmagic.core.compile import explain_compile

        name = "%%compile" if cell is not None else "%compile"
        args = parse(self.compile, line)
        failed: ForwardError | None = None
        report = None
        with user_errors(name), flag_names():
            self.check_output_name(args.output)
            dynamic = _dynamic(args.dynamic)
            common = dict(backend=args.backend, mode=args.mode, fullgraph=args.fullgraph,
                          dynamic=dynamic, explain=args.explain, runs=args.runs,
                          bench=args.bench, check=args.check, logs=args.logs,
                          min_time=args.min_time)
            if cell is not None:
                if args.model is not None or args.inputs:
                    raise UsageError("%%compile: the cell magic takes only options; "
                                     "%compile MODEL INPUTS is the line magic")
                bad = [flag for flag, attr in (("--then", "then"), *INPUT_FLAGS)
                       if getattr(args, attr) is not None]
                if bad:
                    raise UsageError(f"%%compile: {', '.join(bad)} belong to %compile MODEL "
                                     "INPUTS")
                source = self.transform(cell)
                try:
                    report = explain_compile(source, namespace=self.shell.user_ns, **common)
                except ForwardError as exc:  # the cell raised: re-raised below, unchanged
                    failed = exc
            else:
                if args.model is None:
                    raise UsageError("%compile: give a model and its inputs, e.g. %compile model "
                                     "(1,3,32,32), or use %%compile on a cell (see %compile?)")
                target = self.evaluate(args.model, "model")
                if isinstance(target, str) or not callable(target):
                    raise TorchMagicError(f"{args.model} is {a_type(target)}: MODEL must be an "
                                          "nn.Module or a function (use %%compile for code)")
                values, given = self.model_inputs(args)
                calls = [self._then_call(tokens) for tokens in args.then or []]
                try:
                    report = explain_compile(target, *values, **given, calls=calls,
                                             name=args.model, **common)
                except ForwardError as exc:
                    raise TorchMagicError(str(exc)) from None
            if report is not None:
                self.store(args.output, report)
        if failed is not None:
            from torchmagic.magics.bench import reraise_user_error

            reraise_user_error(name, failed)
        assert report is not None
        self.show(report)
        return report.value if cell is not None else None

    def _then_call(self, tokens: list[str]) -> Any:
        shapes, values = self.parse_inputs(tokens)
        if shapes is not None:
            return shapes if len(shapes) > 1 else shapes[0]
        if len(values) == 1:
            return values[0]
        return tuple(values)


MAGICS = [CompileMagics]
