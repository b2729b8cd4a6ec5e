"""``%%benchmark`` (``torch.utils.benchmark.Timer`` done right) and ``%%profile`` (``torch.profiler``
over a cell)."""

from __future__ import annotations

import re
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import cell_magic, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import ForwardError
from torchmagic.magics._base import TorchMagics, parse, user_errors

_VALUE_OPTIONS = {"-n", "--min-time", "--threads", "--compare", "-o"}
_TOKEN = re.compile(r"(\S+)\s*")


def split_options(line: str) -> tuple[str, str]:
    """``"-n 5 --threads 2 x @ y"`` -> ``("-n 5 --threads 2", "x @ y")``: leading options of
    ``%benchmark``, then the statement (kept verbatim). ``--`` ends the options."""
    rest = line.strip()
    opts: list[str] = []
    while rest.startswith("-"):
        m = _TOKEN.match(rest)
        assert m is not None
        tok, rest = m.group(1), rest[m.end():]
        if tok == "--":
            break
        opts.append(tok)
        if tok in _VALUE_OPTIONS and rest:
            m = _TOKEN.match(rest)
            assert m is not None
            opts.append(m.group(1))
            rest = rest[m.end():]
    return " ".join(opts), rest


def reraise_user_error(magic: str, err: ForwardError) -> NoReturn:
    """Raise the exception the user's cell raised, unchanged (type, message, traceback), like a
    plain cell would; where a module's forward was running, a note names it and its input shapes."""
    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    orig = err.original
    if not isinstance(orig, Exception):
        raise UsageError(f"{magic}: {' '.join(str(err).split())}")
    if err.module_class:
        where = err.module_path or err.module_class
        note = (f"{magic}: raised in {where} ({err.module_class})"
                + (f" with input {err.input_shapes}" if err.input_shapes else ""))
        if note not in getattr(orig, "__notes__", ()):
            orig.add_note(note)
    raise orig


@magics_class
class BenchMagics(TorchMagics):
    """``%%benchmark`` and ``%%profile``."""

    def __init__(self, shell: Any, cfg: Any) -> None:
        super().__init__(shell, cfg)
        self._compare: dict[str, Any] = {}  # --compare LABEL -> BenchResult (in order)

    def close(self) -> None:
        self._compare.clear()

    @magic_arguments()
    @argument("-n", dest="number", type=int, metavar="N",
              help="time exactly N single runs (after 1 warm-up); default: "
                   "Timer.blocked_autorange")
    @argument("--min-time", type=float, default=0.2, metavar="S",
              help="blocked_autorange's minimum total run time in seconds (default 0.2)")
    @argument("--threads", type=int, metavar="T",
              help="torch threads while timing (default: torch.get_num_threads(), not Timer's 1)")
    @argument("--compare", metavar="LABEL",
              help="add the result under LABEL to a comparison table kept across cells")
    @argument("--clear", action="store_true", help="empty the --compare table first")
    @argument("-o", dest="output", metavar="VAR", help="also store the result in VAR")
    @line_cell_magic
    def benchmark(self, line: str, cell: str | None = None) -> None:
        """Time the cell with ``torch.utils.benchmark.Timer`` and report median, IQR and runs.

        ``%%benchmark [-n N] [--min-time S] [--threads T] [--compare LABEL] [-o VAR]``. The cell runs
        with a copy of the namespace (its assignments do not leak; in-place changes to your
        objects are real, and reported), with ``torch.get_num_threads()`` threads unless
        ``--threads`` says otherwise, CUDA synchronised by Timer's clock. ``--compare LABEL`` adds
        the result to a table across cells (same label: replaced). Line form: ``%benchmark [opts]
        STATEMENT``; ``%benchmark`` alone shows the comparison table, ``%benchmark --clear``
        empties it.
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        from torchmagic.core.bench import benchmark, compare

        if cell is None:
            opts, statement = split_options(line)
        else:
            opts, statement = line, cell
        args = parse(self.benchmark, opts)
        if args.clear:
            self._compare.clear()
        if not statement.strip():
            if cell is not None:
                raise UsageError("%%benchmark: the cell is empty: put the code to time in it")
            if args.clear:
                print("benchmark comparison table cleared")
                return
            if not self._compare:
                raise UsageError("%benchmark: give a statement to time (%benchmark x @ y), or "
                                 "time cells with %%benchmark --compare LABEL to fill the table")
            self.show(compare(list(self._compare.values())))
            return
        name = "%%benchmark" if cell is not None else "%benchmark"
        if args.compare is not None and not args.compare.strip():
            raise UsageError(f"{name}: --compare needs a label")
        from torchmagic.display.live import live

        failed: ForwardError | None = None
        # a run longer than a second shows a live progress panel, replaced by the result
        with live(name + (f" {args.compare}" if args.compare else ""), delay=1.0) as panel:
            with user_errors(name):
                self.check_output_name(args.output)  # before anything runs or changes
                try:
                    result = benchmark(self.transform(statement), self.shell.user_ns,
                                       number=args.number, min_time=args.min_time,
                                       num_threads=args.threads, label=args.compare,
                                       progress=panel.update)
                except ForwardError as exc:  # the user's code raised: re-raised below, unchanged
                    failed = exc
                else:
                    self.store(args.output, result)
            if failed is None:
                shown: Any = result
                if args.compare:
                    self._compare.pop(args.compare, None)
                    self._compare[args.compare] = result
                    shown = compare(list(self._compare.values()), current=args.compare)
                panel.finish(shown)
            else:
                panel.stop(f"the code raised {type(failed.original).__name__}")
        if failed is not None:
            reraise_user_error(name, failed)

    @magic_arguments()
    @argument("--sort", metavar="KEY",
              help="self_cpu (default without CUDA), cpu_total, self_device (default with "
                   "CUDA), device_total, calls, self_memory, memory, name")
    @argument("--rows", type=int, default=15, metavar="N", help="top N rows (default 15)")
    @argument("--memory", action="store_true", help="record memory allocated by each op")
    @argument("--shapes", action="store_true", help="one row per op and input shapes")
    @argument("--trace", metavar="FILE", help="write a Chrome trace (ui.perfetto.dev)")
    @argument("--warmup", type=int, default=0, metavar="N",
              help="run the cell N times unprofiled first")
    @argument("-o", dest="output", metavar="VAR", help="also store the result in VAR")
    @cell_magic
    def profile(self, line: str, cell: str) -> Any:
        """Profile the cell with ``torch.profiler`` and show the top ops.

        ``%%profile [--sort KEY] [--rows N] [--memory] [--shapes] [--trace FILE] [--warmup N]``.
        The cell runs once in the notebook namespace (like a normal cell; its value is returned).
        The table shows self and total CPU time, calls, CUDA time when CUDA is available, memory
        with ``--memory`` and input shapes with ``--shapes``. ``--trace FILE`` writes a Chrome
        trace. The profiler's own log lines on stderr are kept out of the output.
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        from torchmagic.core.profile import profile

        args = parse(self.profile, line)
        if not cell.strip():
            raise UsageError("%%profile: the cell is empty: put the code to profile in it")
        holder: dict[str, Any] = {}
        failed: ForwardError | None = None
        with user_errors("%%profile"):
            self.check_output_name(args.output)  # before anything runs or changes
            try:
                result = profile(self.transform(cell), self.shell.user_ns, sort=args.sort,
                                 rows=args.rows, memory=args.memory, shapes=args.shapes,
                                 trace=args.trace, warmup=args.warmup, result_holder=holder)
            except ForwardError as exc:  # the user's cell raised: re-raised below, unchanged
                failed = exc
            else:
                self.store(args.output, result)
        if failed is not None:
            reraise_user_error("%%profile", failed)
        self.show(result)
        return holder.get("value")


MAGICS = [BenchMagics]
