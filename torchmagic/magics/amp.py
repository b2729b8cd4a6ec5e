"""``%%amp`` (run a cell under autocast, optionally with a dtype report) and ``%amp on|off``."""

from __future__ import annotations

import ast
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.magics._base import TorchMagics, parse, user_errors


def _names_in(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    seen: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in seen:
            seen.append(node.id)
    return seen


@magics_class
class AmpMagics(TorchMagics):
    """``%%amp`` and ``%amp on|off``."""

    def __init__(self, shell: Any, cfg: Any) -> None:
        super().__init__(shell, cfg)
        self._session: Any = None  # core.amp.AutocastSession, created on first %amp on

    # -- %amp on / off ---------------------------------------------------------------------------
    def _callbacks(self) -> list[tuple[str, Any]]:
        return [("pre_run_cell", self._session.pre), ("post_run_cell", self._session.post)]

    def _register(self) -> None:
        events = self.shell.events
        for name, fn in self._callbacks():
            if fn not in events.callbacks[name]:
                events.register(name, fn)

    def _unregister(self, names: tuple[str, ...] = ("pre_run_cell", "post_run_cell")) -> None:
        if self._session is None:
            return
        events = self.shell.events
        for name, fn in self._callbacks():
            while name in names and fn in events.callbacks[name]:
                events.unregister(name, fn)

    def _off(self) -> bool:
        """No autocast from the next cell on. ``pre`` goes at once; ``post`` stays registered
        until the cells running now (this one) have closed the contexts they opened."""
        if self._session is None:
            return False
        try:
            self._unregister(("pre_run_cell",))
        finally:
            was = self._session.stop(on_drained=self._unregister)
        return was

    def close(self) -> None:
        """Unloading the extension turns ``%amp on`` off (no autocast from the next cell on; a
        cell running now, e.g. the one unloading, keeps its context until it ends)."""
        if self._off():
            print("%amp on is off: torchmagic was unloaded (autocast off from the next cell)")

    def suspend(self) -> Any:
        """``%reload_ext``: hand the running session (and its open contexts) to the new instance."""
        if self._session is None or not self._session.active:
            self.close()
            return None
        self._unregister()
        session, self._session = self._session, None
        return session

    def resume(self, state: Any) -> str | None:
        self._session = state
        self._register()
        dt = str(state.dtype).replace("torch.", "")
        return f"%amp on ({state.device} {dt})"

    def _scaler_used(self, names: list[str], source: str) -> bool:
        """The cell builds a GradScaler or uses one bound to a name it mentions."""
        import torch

        if "GradScaler" in source:
            return True
        ns = self.shell.user_ns
        return any(isinstance(ns.get(n), torch.amp.GradScaler) for n in names)

    # -- the magic ---------------------------------------------------------------------------------
    @magic_arguments()
    @argument("action", nargs="?", default=None,
              help="%%amp on: autocast for every following cell; %%amp off: stop (line magic).")
    @argument("--dtype", default=None, help="bf16 or fp16 (default: bf16 where supported).")
    @argument("--device", default=None,
              help="cuda, cpu, mps or xpu (default: where the models in play live, else cuda if "
                   "available, else cpu).")
    @argument("--report", action="store_true",
              help="Show ops by output dtype, what stayed float32 and why, the result dtype.")
    @line_cell_magic
    def amp(self, line: str, cell: str | None = None) -> Any:
        """Run a cell under ``torch.autocast`` with checked settings, or keep autocast on.

        ``%%amp [--dtype bf16|fp16] [--device cuda|cpu|mps|xpu] [--report]`` runs the cell (its
        assignments stay; the last expression is shown). ``--report`` adds a table of ops by output
        dtype, the ops that stayed float32 and why, the result's dtype, and GradScaler advice when
        fp16 gradients were computed without a scaler. ``%amp on [--dtype ..] [--device ..]`` keeps
        autocast on for every following cell until ``%amp off`` (or unloading the extension), which
        restores the autocast state exactly. Combinations torch would silently ignore are refused.
        """
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        args = parse(self.amp, line)
        if cell is None:
            return self._line(args)
        if args.action is not None:
            raise UsageError(f"%%amp: unexpected {args.action!r}; the cell magic takes only "
                             "--dtype, --device and --report (%amp on|off is the line magic)")
        return self._cell(args, cell)

    def _line(self, args: Any) -> None:
        action = (args.action or "").lower()
        if action == "":
            if args.dtype or args.device or args.report:
                raise UsageError("%amp: say on or off: %amp on [--dtype bf16|fp16] [--device ..]")
            if self._session is not None and self._session.active:
                dt = str(self._session.dtype).replace("torch.", "")
                print(f"autocast is on for every cell: {self._session.device} {dt} "
                      "(%amp off to stop)")
            else:
                print("autocast is off (%amp on keeps it on for every cell; %%amp for one cell)")
            return None
        if action == "off":
            if args.dtype or args.device or args.report:
                raise UsageError("%amp off takes no options")
            was = self._off()
            print("autocast off: restored the autocast state from before %amp on" if was else
                  "autocast was not on (nothing to turn off)")
            return None
        if action != "on":
            raise UsageError(f"%amp: expected on or off, got {args.action!r} "
                             "(%amp on [--dtype bf16|fp16] [--device ..] / %amp off)")
        if args.report:
            raise UsageError("%amp on: --report applies to one cell; use %%amp --report")
        from torchmagic.core.amp import AutocastSession, models_in, resolve_amp

        with user_errors("%amp"):
            device, dtype = resolve_amp(args.device, args.dtype, models_in(self.shell.user_ns))
        if self._session is None:
            self._session = AutocastSession()
        self._session.start(device, dtype)
        self._register()
        dt = str(dtype).replace("torch.", "")
        print(f"autocast on for every following cell: {device} {dt} (%amp off to stop)")
        return None

    def _cell(self, args: Any, cell: str) -> Any:
        __tracebackhide__ = True  # IPython shows the user's frames, not ours
        from torchmagic.core.amp import AmpRun, models_in, resolve_amp
        from torchmagic.core.execution import compile_user_cell, run_compiled

        source = self.transform(cell)
        with user_errors("%%amp"):
            compiled = compile_user_cell(source, "amp", "run under autocast")
        names = _names_in(source)
        ns = self.shell.user_ns
        with user_errors("%%amp"):
            device, dtype = resolve_amp(args.device, args.dtype, models_in(ns, names))
        run = AmpRun(device, dtype, report=args.report)

        def cell() -> Any:
            __tracebackhide__ = True
            try:
                return run.set_result(run_compiled(compiled, ns))
            finally:
                run.scaler_used = self._scaler_used(names, source)

        return self.run_and_report(run, cell, lambda: run.report)


MAGICS = [AmpMagics]
