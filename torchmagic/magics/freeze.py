"""``%freeze MODEL[.sub.path ...] [--except PATH ...]`` and ``%unfreeze``: set ``requires_grad`` and
say exactly what changed. The one torchmagic magic that changes user state (``requires_grad`` only)."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import TorchMagicError
from torchmagic.magics._base import TorchMagics, parse, user_errors


def _arguments(func: Any) -> Any:
    func = argument("--except", dest="exclude", nargs="+", action="extend", default=[],
                    metavar="PATH",
                    help="submodules or parameters left as they are (model.head or head)")(func)
    func = argument("paths", nargs="+", metavar="MODEL[.sub.path]",
                    help="the model or submodules/parameters of it: model.encoder model.blocks[0]"
                    )(func)
    func = argument("-o", dest="output", metavar="VAR",
                    help="also store the report in VAR")(func)
    return magic_arguments()(func)


@magics_class
class FreezeMagics(TorchMagics):
    """``%freeze`` and ``%unfreeze``."""

    def _run(self, magic: str, line: str, requires_grad: bool) -> None:
        from torchmagic.core.freeze import resolve_root, set_requires_grad

        args = parse(getattr(self, magic), line)
        ns = self.shell.user_ns
        with user_errors(f"%{magic}"):
            self.check_output_name(args.output)  # before anything runs or changes
            roots = [resolve_root(ns, token) for token in args.paths]
            root_name, model, _ = roots[0]
            for other_name, other, _ in roots[1:]:
                if other is not model:
                    raise TorchMagicError(f"all paths must be in one model: {root_name} and "
                                          f"{other_name} are different modules (run the magic "
                                          "once per model)")
            paths = [rel for _, _, rel in roots]
            exclude = []
            for token in args.exclude:
                segs = token.replace("[", ".").split(".", 1)
                if segs[0] == root_name.split(".")[0]:
                    _, other, rel = resolve_root(ns, token)
                    if other is not model:
                        raise TorchMagicError(f"--except {token}: not a part of {root_name}")
                    exclude.append(rel)
                else:
                    exclude.append(token)  # relative to the model: --except head
            result = set_requires_grad(model, paths, requires_grad, exclude=exclude,
                                       name=root_name, namespace=ns)
            self.store(args.output, result)
        self.show(result)

    @_arguments
    @line_magic
    def freeze(self, line: str) -> None:
        """Set ``requires_grad=False`` on the parameters of the named model, submodules or
        parameters (``%freeze model.encoder --except model.encoder.norm``) and report exactly what
        changed: N parameters in M modules, trainable before and after. Warns about BatchNorm layers
        whose running statistics still update in train mode, frozen parameters holding a stale
        ``.grad``, and optimizers in the namespace that still hold the frozen parameters.
        Nothing but ``requires_grad`` changes, and it changes all or nothing."""
        self._run("freeze", line, False)

    @_arguments
    @line_magic
    def unfreeze(self, line: str) -> None:
        """Set ``requires_grad=True`` on the (floating point) parameters of the named model,
        submodules or parameters, with the same exact report as ``%freeze``; reminds when an
        optimizer of the model in the namespace does not hold the unfrozen parameters."""
        self._run("unfreeze", line, True)


MAGICS = [FreezeMagics]
