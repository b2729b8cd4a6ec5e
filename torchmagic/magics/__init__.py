"""IPython magics of torchmagic: one module per group; each defines ``MAGICS`` (its classes).

Modules are discovered in this package (names not starting with ``_``), so adding a magic group is
adding a module. Loading registers one instance of each class and the ``TorchMagic`` configurable;
unloading closes each instance (callbacks removed), removes its magics and puts the display mode
back to ``auto`` (results shown by plain-Python calls then pick their rendering themselves). Loading twice never
registers anything twice. ``%reload_ext torchmagic`` keeps what is switched on across cells (``%amp on``,
``%gpumem --watch``): each instance hands it over (``suspend``) to its successor (``resume``), which says
so in one line.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

_STATE_ATTR = "_torchmagic_state"
_CARRY_ATTR = "_torchmagic_carry"


def _reloading(shell: Any) -> bool:
    """True when this unload is the first half of ``%reload_ext`` (IPython's reload_extension)."""
    import sys

    manager = getattr(shell, "extension_manager", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "reload_extension" and frame.f_locals.get("self") is manager:
            return True
        frame = frame.f_back
    return False


def magic_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(shell: Any) -> None:
    from torchmagic import display
    from torchmagic.magics._base import TorchMagic

    if getattr(shell, _STATE_ATTR, None) is not None:
        unload(shell)  # a second load replaces the first: never doubles magics or callbacks
    cfg = TorchMagic(parent=shell)
    display.set_mode(cfg.display)
    instances = []
    for name in magic_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        for cls in getattr(module, "MAGICS", ()):
            inst = cls(shell, cfg)
            shell.register_magics(inst)
            instances.append(inst)
    shell.configurables.append(cfg)
    setattr(shell, _STATE_ATTR, {"cfg": cfg, "instances": instances})
    carried = getattr(shell, _CARRY_ATTR, None)
    if carried:
        setattr(shell, _CARRY_ATTR, None)
        kept = [inst.resume(carried[type(inst).__name__]) for inst in instances
                if type(inst).__name__ in carried]
        kept = [k for k in kept if k]
        if kept:
            print("%reload_ext torchmagic: kept " + "; ".join(kept))


def unload(shell: Any) -> None:
    state = getattr(shell, _STATE_ATTR, None)
    if state is None:
        return
    setattr(shell, _STATE_ATTR, None)
    manager = shell.magics_manager
    reloading = _reloading(shell)
    carried: dict[str, Any] = {}
    for inst in state["instances"]:
        try:
            if reloading:
                kept = inst.suspend()
                if kept is not None:
                    carried[type(inst).__name__] = kept
            else:
                inst.close()
        finally:
            for kind, table in inst.magics.items():
                for name in table:
                    registered = manager.magics[kind].get(name)
                    if getattr(registered, "__self__", None) is inst:
                        del manager.magics[kind][name]
            manager.registry.pop(type(inst).__name__, None)
    setattr(shell, _CARRY_ATTR, carried or None)
    if state["cfg"] in shell.configurables:
        shell.configurables.remove(state["cfg"])
    from torchmagic import display

    display.set_mode("auto")  # %config TorchMagic.display is gone with the extension
