"""torchinfo's own table beside ``%summary``'s (``--torchinfo``), for comparison.

torchinfo runs on a twin inside ``preserved_global_state``: it moves models to its device, resets
training flags, consumes the global RNG and caches every model it saw; none of that reaches the
user. Its table is fitted to a width (the terminal's, from ``display.format.text_width()``, unless
given): fewer, narrower columns, then layer names without their variable names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

_COLUMNS = {"input": "input_size", "output": "output_size", "params": "num_params",
            "percent": "params_percent", "macs": "mult_adds", "flops": "mult_adds",
            "kernel": "kernel_size", "trainable": "trainable"}
_ORDER = ("input_size", "output_size", "num_params", "params_percent", "kernel_size",
          "mult_adds", "trainable")
_PREFER = ("input_size", "output_size", "num_params", "mult_adds", "params_percent", "trainable",
           "kernel_size")


def _width(stats: Any) -> int:
    return max((len(line) for line in str(stats).splitlines()), default=0)


def _fit(stats: Any, width: int) -> str:
    """Re-render torchinfo's ``ModelStatistics`` within ``width`` columns where it can: narrower
    columns (down to their content), then no variable names, then fewer columns."""
    fmt = stats.formatting
    text = str(stats)
    if _width(stats) <= width:
        return text
    for step in ("narrow", "names", "drop"):
        if step == "narrow":
            n = len(fmt.col_names)
            room = (width - fmt.layer_name_width) // max(1, n) - 1
            fmt.col_width = max(10, min(fmt.col_width, room))
        elif step == "names" and fmt.show_var_name:
            fmt.show_var_name = False
            fmt.layer_name_width = 40
            fmt.set_layer_name_width(stats.summary_list)
            n = len(fmt.col_names)
            fmt.col_width = max(10, min(25, (width - fmt.layer_name_width) // max(1, n) - 1))
        elif step == "drop":
            while len(fmt.col_names) > 1 and _width(stats) > width:
                names = list(fmt.col_names)
                worst = max(names, key=lambda c: _PREFER.index(c.value)
                            if c.value in _PREFER else 99)
                names.remove(worst)
                fmt.col_names = tuple(names)
        if _width(stats) <= width:
            break
    return str(stats)


def torchinfo_table(model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any],
                    depth: int, mode: str, device: torch.device | None, meta: bool,
                    cols: list[str] | None, width: int | None = None) -> str:
    """torchinfo's own table for the same inputs and settings (see the module docstring); its
    own failure is returned as a one-line text, never raised."""
    try:
        import torchinfo
        from torchinfo import torchinfo as ti
    except Exception as exc:  # noqa: BLE001 - torchinfo missing or broken (e.g. numpy absent)
        return f"torchinfo is not available: {type(exc).__name__}: {exc}"
    from torchmagic.core.state import preserved_global_state
    from torchmagic.core.summary import DEFAULT_COLUMNS
    from torchmagic.core.twin import meta_twin, shared_twin

    if width is None:
        from torchmagic.display.format import text_width

        width = text_width()
    wanted = cols or list(DEFAULT_COLUMNS)
    col_names: list[str] = []
    for c in wanted:
        name = _COLUMNS.get(c)
        if name and name not in col_names and (args is not None or c in ("params", "percent",
                                                                          "kernel", "trainable")):
            col_names.append(name)
    if not col_names:
        col_names = ["num_params"]
    # the 4 columns most worth comparing when more were asked for
    if len(col_names) > 4:
        col_names = sorted(col_names, key=_PREFER.index)[:4]
        col_names = [c for c in _ORDER if c in col_names]
    col_width = max(10, min(25, (width - 40) // len(col_names) - 1))
    ti_mode = mode if mode != "same" else ("train" if model.training else "eval")
    cache = ti._cached_forward_pass
    key = type(model).__name__
    had, prev = key in cache, cache.get(key)
    try:
        with preserved_global_state():
            copy = meta_twin(model) if meta else shared_twin(model)
            call_kwargs: dict[str, Any] = {}
            if args is None:
                data = None
            elif kwargs and not args:
                data = kwargs
            else:
                data = list(args)
                clash = {"input_size", "input_data", "depth", "device", "mode", "dtypes",
                         "col_names", "verbose", "batch_dim", "row_settings", "col_width",
                         "cache_forward_pass"} & set(kwargs)
                if clash:
                    return (f"torchinfo cannot pass keyword input {sorted(clash)[0]!r} to the "
                            "model (it is one of its own options)")
                call_kwargs = kwargs
            stats = torchinfo.summary(copy, input_data=data, depth=depth, col_names=col_names,
                                      mode=ti_mode, device=device, verbose=0,
                                      row_settings=["var_names"], col_width=col_width,
                                      **call_kwargs)
            text = _fit(stats, width)
    except Exception as exc:  # noqa: BLE001 - torchinfo's own failure is reported, not raised
        text = f"torchinfo failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        if had:
            cache[key] = prev
        else:
            cache.pop(key, None)
    note = "(torchinfo 'same' mode does not exist: ran in the root module's mode)" \
        if mode == "same" and args is not None else ""
    return text + ("\n" + note if note else "")


__all__ = ["torchinfo_table"]
