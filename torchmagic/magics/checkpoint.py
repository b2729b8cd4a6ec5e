"""``%checkpoint save MODEL PATH`` and ``%checkpoint load MODEL PATH``: atomic saves, safe loads."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import TorchMagicError
from torchmagic.magics._base import TorchMagics, one_line, parse, user_errors

_LOAD_ONLY = {"unsafe": "--unsafe", "map_location": "--map-location", "mmap": "--mmap",
              "assign": "--assign", "no_strict": "--no-strict", "strip_prefix": "--strip-prefix",
              "add_prefix": "--add-prefix", "key": "--key"}


@magics_class
class CheckpointMagics(TorchMagics):
    """``%checkpoint``."""

    @magic_arguments()
    @argument("action", choices=["save", "load"], help="save or load")
    @argument("model", help="the model (a name or expression in the notebook)")
    @argument("path", help="the checkpoint file ({var} and $var are expanded)")
    @argument("--optimizer", metavar="OPT", help="also save / restore this optimizer's state")
    @argument("--extra", nargs="+", action="extend", default=[], metavar="K=V",
              help="save: extra entries, V a Python expression (epoch=3 step=step note='x')")
    @argument("--unsafe", action="store_true",
              help="load: weights_only=False (unpickling can run arbitrary code; trusted files "
                   "only)")
    @argument("--map-location", metavar="DEVICE", help="load: device for the loaded tensors")
    @argument("--mmap", action="store_true", help="load: map the file instead of reading it")
    @argument("--assign", action="store_true",
              help="load: the model takes the loaded tensors (no copy; for meta models)")
    @argument("--no-strict", action="store_true",
              help="load: load the keys that match, skip the rest (and report them)")
    @argument("--strip-prefix", metavar="PREFIX",
              help="load: remove PREFIX from the checkpoint's keys (module. from DataParallel)")
    @argument("--add-prefix", metavar="PREFIX", help="load: add PREFIX to the checkpoint's keys")
    @argument("--key", metavar="KEY", help="load: the file's entry holding the state dict")
    @argument("-o", dest="output", metavar="VAR", help="also store the report in VAR")
    @line_magic
    def checkpoint(self, line: str) -> None:
        """Save or load a model checkpoint, safely.

        ``%checkpoint save model ckpt.pt [--optimizer opt] [--extra epoch=3 step=step]`` writes the
        state dict (plus optimizer state and extras) atomically: temp file, fsync, rename; an
        interrupted save keeps the previous file. Reports bytes and tensors written.

        ``%checkpoint load model ckpt.pt [--optimizer opt] [--map-location cpu] [--mmap] [--assign]
        [--no-strict] [--strip-prefix module.] [--unsafe]`` loads with ``weights_only=True`` (a
        pickle that would run code is refused), shows a diff of missing / unexpected /
        shape-mismatched keys (offering ``--strip-prefix module.`` for DataParallel checkpoints),
        leaves the model unchanged when the load fails, and says which device the model is on.
        """
        from torchmagic.core.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

        args = parse(self.checkpoint, line)
        with user_errors("%checkpoint"):
            self.check_output_name(args.output)  # before anything runs or changes
            model = self.evaluate(args.model, "model")
            opt = self.evaluate(args.optimizer, "optimizer") if args.optimizer else None
            if args.action == "save":
                used = [flag for attr, flag in _LOAD_ONLY.items() if getattr(args, attr)]
                if used:
                    raise TorchMagicError(f"{used[0]} applies to load, not save")
                extras = self._extras(args.extra)
                result: Any = save_checkpoint(model, args.path, optimizer=opt, extras=extras,
                                              name=args.model,
                                              optimizer_name=args.optimizer or "optimizer")
            else:
                if args.extra:
                    raise TorchMagicError("--extra applies to save; a load reports the file's "
                                          "extras (and -o VAR keeps them: VAR.extras)")
                try:
                    result = load_checkpoint(
                        model, args.path, optimizer=opt, map_location=args.map_location,
                        weights_only=not args.unsafe, mmap=args.mmap, assign=args.assign,
                        strict=not args.no_strict, strip_prefix=args.strip_prefix,
                        add_prefix=args.add_prefix, key=args.key, name=args.model,
                        optimizer_name=args.optimizer or "optimizer")
                except CheckpointMismatch as exc:
                    self.store(args.output, exc.report)
                    self.show(exc.report)  # the readable diff, then the one-line error
                    raise UsageError(f"%checkpoint: {one_line(str(exc))}") from None
            self.store(args.output, result)
        self.show(result)

    def _extras(self, items: list[str]) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for item in items:
            key, sep, expr = item.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier() or not expr.strip():
                raise TorchMagicError(f"--extra {item!r}: write KEY=VALUE, e.g. epoch=3 or "
                                      "note='warmup done'")
            try:
                extras[key] = self.evaluate(expr, f"--extra {key}")
            except TorchMagicError as exc:
                if not expr.strip().isidentifier():
                    raise
                # A bare word that is no variable: the user most likely meant a string.
                raise TorchMagicError(f"--extra {key}={expr}: {expr!r} is not a defined name; "
                                      f"values are Python expressions, so quote text: "
                                      f"{key}='{expr}'") from exc
        return extras


MAGICS = [CheckpointMagics]
