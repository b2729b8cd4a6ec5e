"""``%gpumem``: memory per device and for the CPU process; ``%%gpumem`` per cell; ``--watch`` after
every cell; ``--top [N]`` for the largest live tensors; ``--snapshot FILE`` for PyTorch's memory viewer.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.magics._base import TorchMagics, one_line, parse, user_errors

_CELL_ONLY = "--device, --keep-peaks, --snapshot and -o"


class GpumemWatch:
    """State of ``--watch`` and of an armed line ``--snapshot``; its bound methods ``pre_run_cell`` and
    ``post_run_cell`` are the only callbacks registered, at most once each.

    A cell run inside a cell (a nested ``run_cell``) is not reported separately: the outer cell's
    line includes it.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.watching = False
        self.device: str | None = None
        self.keep_peaks = False
        self.snapshot_path: str | None = None
        self.snapshot_depth: int | None = None
        self.stack: list[Any] = []
        self.live: Any = None
        self.registered = False
        self.last: Any = None  # the last cell's CellMemory

    # -- registration ------------------------------------------------------------------------
    def _sync(self) -> None:
        want = self.watching or self.snapshot_path is not None
        events = self.shell.events
        if want and not self.registered:
            events.register("pre_run_cell", self.pre_run_cell)
            events.register("post_run_cell", self.post_run_cell)
            self.registered = True
        elif not want and self.registered:
            for name, fn in (("pre_run_cell", self.pre_run_cell),
                             ("post_run_cell", self.post_run_cell)):
                if fn in events.callbacks[name]:
                    events.unregister(name, fn)
            self.registered = False
            self.stack.clear()

    def detach(self) -> None:
        """Unregister the callbacks but keep the state (the meters of running cells included)."""
        events = self.shell.events
        for name, fn in (("pre_run_cell", self.pre_run_cell),
                         ("post_run_cell", self.post_run_cell)):
            while fn in events.callbacks[name]:
                events.unregister(name, fn)
        self.registered = False

    def watch(self, device: str | None, keep_peaks: bool) -> None:
        self.watching, self.device, self.keep_peaks = True, device, keep_peaks
        self._sync()

    def unwatch(self) -> bool:
        was = self.watching
        self.watching = False
        self._end_live()
        self._sync()
        return was

    def _end_live(self) -> None:
        """The live panel keeps its last state, as HTML (never a widget left behind)."""
        if self.live is not None:
            self.live.finish()
            self.live = None

    def arm_snapshot(self, path: str) -> None:
        self.snapshot_path = path
        self.snapshot_depth = None
        self._sync()

    def close(self) -> None:
        """Remove every callback (unload); stop a snapshot recording still running."""
        self.watching = False
        self._end_live()
        if self.snapshot_depth is not None:
            self._finish_snapshot()
        self.snapshot_path = None
        for meter in self.stack:
            if meter is not None:
                meter.stop()
        self._sync()
        self.stack.clear()

    # -- callbacks ---------------------------------------------------------------------------
    def pre_run_cell(self, info: Any = None) -> None:
        try:
            if self.snapshot_path is not None and self.snapshot_depth is None:
                from torchmagic.core.memory import start_memory_history

                start_memory_history()
                self.snapshot_depth = len(self.stack)
            meter = None
            if self.watching and not self.stack:
                from torchmagic.core.memory import memory_meter

                count = self.shell.execution_count
                if getattr(info, "store_history", False):
                    count -= 1  # IPython counts the cell before pre_run_cell
                label = f"In [{count}]"
                meter = memory_meter(self.device, reset_peaks=not self.keep_peaks, label=label)
                meter.start()
            self.stack.append(meter)
        except Exception as exc:  # a callback must never break the user's cell
            self._fail(exc)

    def post_run_cell(self, result: Any = None) -> None:
        if not self.stack:  # registered during this cell: nothing was started for it
            return
        try:
            meter = self.stack.pop()
            if self.snapshot_depth is not None and self.snapshot_depth == len(self.stack):
                self._finish_snapshot()
            if meter is not None:
                error = getattr(result, "error_in_exec", None) or getattr(
                    result, "error_before_exec", None)
                cell = meter.stop(error)
                count = getattr(result, "execution_count", None)
                if count:
                    cell.label = f"In [{count}]"
                self.last = cell
                self._report(cell)
        except Exception as exc:
            self._fail(exc)

    def _finish_snapshot(self) -> None:
        from torchmagic.core.memory import stop_memory_history

        path = self.snapshot_path
        self.snapshot_path = self.snapshot_depth = None
        self._sync()
        if path is not None:
            print(stop_memory_history(path))

    def _report(self, cell: Any) -> None:
        from torchmagic.display.memory import one_line as line_of

        print(line_of(cell))
        if self.live is not None:
            from torchmagic.core.memory import gpumem
            from torchmagic.display.memory import watch_html, watch_text

            report = gpumem(self.device)
            self.live.show({"text/plain": watch_text(report, cell),
                            "text/html": watch_html(report, cell)})

    def _fail(self, exc: BaseException) -> None:
        print(f"%gpumem --watch stopped: {type(exc).__name__}: {one_line(str(exc))}",
              file=sys.stderr)
        self.watching = False
        self.snapshot_path = self.snapshot_depth = None
        self._sync()


@magics_class
class GpumemMagics(TorchMagics):
    """``%gpumem`` / ``%%gpumem``."""

    def __init__(self, shell: Any, cfg: Any) -> None:
        super().__init__(shell, cfg)
        self.watcher = GpumemWatch(shell)

    def close(self) -> None:
        if self.watcher.watching:
            print("%gpumem --watch is off: torchmagic was unloaded")
        self.watcher.close()

    def suspend(self) -> Any:
        """``%reload_ext``: hand ``--watch`` (and an armed ``--snapshot``) with the meter of the
        cell running now to the new instance, which registers the same callbacks again."""
        w = self.watcher
        if not (w.watching or w.snapshot_path is not None):
            self.close()
            return None
        w.detach()
        return w

    def resume(self, state: Any) -> str | None:
        self.watcher = state
        state.shell = self.shell
        state._sync()
        parts = []
        if state.watching:
            parts.append("%gpumem --watch" + (" --keep-peaks" if state.keep_peaks else ""))
        if state.snapshot_path is not None:
            parts.append(f"%gpumem --snapshot {state.snapshot_path}")
        return ", ".join(parts) or None

    @magic_arguments()
    @argument("--device", metavar="N", help="one device: a CUDA index (0), cuda:N, mps or cpu")
    @argument("--reset", action="store_true",
              help="reset the peak counters (CUDA peak allocated/reserved, CPU peak RSS) after "
              "reading them")
    @argument("-o", dest="output", metavar="VAR", help="also store the result in VAR")
    @argument("--watch", action="store_true",
              help="after every cell, one line: memory before/after/delta/peak per device")
    @argument("--unwatch", action="store_true", help="stop --watch")
    @argument("--top", nargs="?", const=10, default=None, type=int, metavar="N",
              help="the N (default 10) largest live tensors, grouped by device, with names")
    @argument("--snapshot", metavar="FILE",
              help="CUDA only: record memory history for the next cell (or this cell with "
              "%%%%gpumem) and write FILE for https://pytorch.org/memory_viz")
    @argument("--keep-peaks", action="store_true",
              help="with %%%%gpumem/--watch: do not reset torch's peak counters (a cell's peak is "
              "then exact only when it beats the earlier peak)")
    @line_cell_magic
    def gpumem(self, line: str, cell: str | None = None) -> Any:
        """Where the memory went.

        ``%gpumem``: per CUDA device name, compute capability, total, allocated, reserved, peak
        allocated/reserved since the last reset, free (driver) and reserved-but-unused; MPS figures
        where MPS is available; CPU RSS and peak RSS. Without CUDA it says so in one line.

        ``%%gpumem``: runs the cell (assignments land in the notebook, the last expression is
        returned) and reports before/after/delta/peak per device and for CPU. To measure a peak
        exactly, torch's CUDA peak counters (and Linux's peak RSS) are reset at the start of the
        cell; "your peak" keeps the value since your own last reset. ``--keep-peaks`` avoids the
        reset. ``empty_cache()`` is never called.

        ``%gpumem --watch`` / ``--unwatch``: the same after every cell, in one line.
        ``%gpumem --top [N]``: the N largest live tensors (views of one storage counted once).
        ``%gpumem --snapshot FILE``: CUDA memory history of the next cell for pytorch.org/memory_viz.
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        args = parse(self.gpumem, line)
        if cell is not None:
            return self._cell(args, cell)
        with user_errors("%gpumem"):
            return self._line(args)

    # -- line form ----------------------------------------------------------------------------
    def _line(self, args: Any) -> None:
        from torchmagic.core.errors import TorchMagicError
        from torchmagic.core.memory import check_snapshot_path, gpumem, parse_device, top_tensors

        actions = [name for name, on in (("--watch", args.watch), ("--unwatch", args.unwatch),
                                         ("--top", args.top is not None),
                                         ("--snapshot", args.snapshot is not None),
                                         ("--reset", args.reset)) if on]
        if len(actions) > 1:
            raise TorchMagicError(f"{' and '.join(actions)} cannot be combined: use one of "
                                  "--watch, --unwatch, --top, --snapshot, --reset at a time")
        if args.keep_peaks and not args.watch:
            raise TorchMagicError("--keep-peaks applies to %%gpumem (cell) and --watch only")
        if args.output and (args.watch or args.unwatch or args.snapshot):
            raise TorchMagicError("-o stores a report: use it with %gpumem, --top or %%gpumem")
        if args.watch:
            device = parse_device(args.device)
            if self.cfg.display != "text":
                self._start_live()
            self.watcher.watch(device, args.keep_peaks)
            from torchmagic.display.format import wrap_lines

            mode = "peaks not reset" if args.keep_peaks else "peaks reset per cell"
            print(wrap_lines(f"%gpumem --watch: on, one line after each cell ({mode}); "
                             "off: %gpumem --unwatch"))
            return
        if args.unwatch:
            if args.device is not None:
                raise TorchMagicError("--unwatch takes no --device")
            was = self.watcher.unwatch()
            print("%gpumem --watch: off" if was else "%gpumem --watch was not on")
            return
        if args.snapshot is not None:
            if args.device is not None:
                raise TorchMagicError("--snapshot records every CUDA device; it takes no --device")
            path = check_snapshot_path(args.snapshot)
            self.watcher.arm_snapshot(path)
            print(f"%gpumem --snapshot: recording CUDA memory history during the next cell; "
                  f"the snapshot goes to {path}")
            return
        if args.top is not None:
            result: Any = top_tensors(self.shell.user_ns, args.top, args.device)
        else:
            result = gpumem(args.device, reset=args.reset)
        self.store(args.output, result)
        self.show(result)
        return None

    def _start_live(self) -> None:
        """In a notebook, a panel under this cell that shows the memory after every cell
        (HTML updated in place: a saved notebook keeps the last state)."""
        from torchmagic.display import choose_mode

        if choose_mode() == "text":
            return
        from torchmagic.display.live import live

        self.watcher._end_live()
        self.watcher.live = live("%gpumem --watch")
        self.watcher.live.show({"text/plain": "%gpumem --watch: waiting for the next cell",
                                "text/html": "<b>%gpumem --watch</b>: waiting for the next cell"})

    # -- cell form ----------------------------------------------------------------------------
    def _cell(self, args: Any, cell: str) -> Any:
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        import contextlib

        from torchmagic.core.execution import compile_user_cell, run_compiled
        from torchmagic.core.memory import memory_meter, record_memory_history

        bad = [name for name, on in (("--watch", args.watch), ("--unwatch", args.unwatch),
                                     ("--top", args.top is not None), ("--reset", args.reset))
               if on]
        if bad:
            raise UsageError(f"%%gpumem: {', '.join(bad)} is a line option (%gpumem "
                             f"{bad[0]}); the cell form takes {_CELL_ONLY}")
        with user_errors("%%gpumem"):
            self.check_output_name(args.output)  # before anything runs or changes
            snap: Any = contextlib.nullcontext([])
            if args.snapshot is not None:
                snap = record_memory_history(args.snapshot)
            meter = memory_meter(args.device, reset_peaks=not args.keep_peaks,
                                 label=f"In [{max(self.shell.execution_count - 1, 1)}]")
        with user_errors("%%gpumem"):
            code = compile_user_cell(self.transform(cell), "gpumem", "measure")
        with user_errors("%%gpumem"):
            ctx = snap.__enter__()
        meter.start()
        try:
            value = run_compiled(code, self.shell.user_ns)
        except BaseException as exc:
            result = meter.stop(exc)
            snap.__exit__(None, None, None)
            self._show_cell(result, ctx, args.output)
            raise
        result = meter.stop()
        snap.__exit__(None, None, None)
        self._show_cell(result, ctx, args.output)
        return value

    def _show_cell(self, result: Any, snapshot_lines: list[str], output: str | None) -> None:
        self.store(output, result)
        self.show(result)
        for line in snapshot_lines:
            print(line)


MAGICS = [GpumemMagics]
